// Command gobroker is the protocol of PROTOCOL.md (v1: streams, reports,
// leases, retries, dead letters) written as a Go developer would write it,
// for bench/gobench.py to measure broker.py against: net/http, one mutex
// over the dispatch table, a goroutine per stream writing its batches, rs/xid
// ids, and bbolt dead letters saved by one goroutine in group commits. Not
// in it: --durable, the dashboard, tokens, drain, halves, /touch.
//
//	gobroker --port 0 --db FILE [--lease-timeout 10] [--max-attempts 3]
//	         [--heartbeat 15] [--max-batchsize 100] [--seed 0]
//
// It prints "listening on http://HOST:PORT" once it serves; SIGTERM or
// SIGINT stops it after the dead letters waiting are saved.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/rs/xid"
	bolt "go.etcd.io/bbolt"
)

type message struct {
	id       string
	period   int
	attempts int
}

type batch struct {
	number   int64
	messages []*message
	timer    *time.Timer // the lease
}

type session struct {
	token   string
	size    int
	out     chan *batch   // the next batch for the stream's goroutine to write
	end     chan struct{} // closed when the broker ends the stream
	current *batch
	gone    bool
}

type deadLetter struct {
	ID       string `json:"id"`
	Period   int    `json:"period"`
	Attempts int    `json:"attempts"`
	Reason   string `json:"reason"`
	FailedAt string `json:"failed_at"`
}

type broker struct {
	mu          sync.Mutex
	rng         *rand.Rand
	sessions    map[string]*session
	free        []*session // in the order they became free
	retry       []*message
	workers     int64
	batches     int64
	lease       time.Duration
	heartbeat   time.Duration
	maxAttempts int
	maxBatch    int
	dead        chan deadLetter
	stopped     bool // dead is closed: nothing more is saved
}

// assignLocked gives a batch to each free worker while there are messages.
func (b *broker) assignLocked() {
	for len(b.free) > 0 {
		s := b.free[0]
		b.free = b.free[1:]
		b.batches++
		bt := &batch{number: b.batches, messages: make([]*message, 0, s.size)}
		for len(bt.messages) < s.size {
			var m *message
			if len(b.retry) > 0 {
				m, b.retry = b.retry[0], b.retry[1:]
			} else {
				m = &message{id: xid.New().String(), period: 1 + b.rng.Intn(1000)}
			}
			m.attempts++
			bt.messages = append(bt.messages, m)
		}
		s.current = bt
		bt.timer = time.AfterFunc(b.lease, func() { b.expire(s, bt) })
		s.out <- bt
	}
}

// failLocked counts a failed attempt: a retry, or a dead letter after the last.
func (b *broker) failLocked(m *message, reason string) bool {
	if m.attempts >= b.maxAttempts {
		if !b.stopped {
			b.dead <- deadLetter{m.id, m.period, m.attempts, reason,
				time.Now().UTC().Format(time.RFC3339Nano)}
		}
		return true
	}
	b.retry = append(b.retry, m)
	return false
}

func (b *broker) expire(s *session, bt *batch) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s.current != bt || s.gone {
		return
	}
	b.endLocked(s, "lease expired")
	close(s.end)
}

// endLocked removes a session; the batch it held fails this attempt.
func (b *broker) endLocked(s *session, reason string) {
	if s.gone {
		return
	}
	s.gone = true
	delete(b.sessions, s.token)
	for i, f := range b.free {
		if f == s {
			b.free = append(b.free[:i], b.free[i+1:]...)
			break
		}
	}
	if bt := s.current; bt != nil {
		bt.timer.Stop()
		s.current = nil
		for _, m := range bt.messages {
			b.failLocked(m, reason)
		}
		b.assignLocked()
	}
}

func (b *broker) task(w http.ResponseWriter, r *http.Request) {
	size, err := strconv.Atoi(r.URL.Query().Get("batchsize"))
	if err != nil || size < 1 || size > b.maxBatch {
		http.Error(w, `{"error":"batchsize must be an integer in 1..max"}`, http.StatusBadRequest)
		return
	}
	flusher := w.(http.Flusher)
	b.mu.Lock()
	b.workers++
	s := &session{token: fmt.Sprintf("w%d-%s", b.workers, xid.New().String()), size: size,
		out: make(chan *batch, 1), end: make(chan struct{})}
	b.sessions[s.token] = s
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.endLocked(s, "stream closed")
		b.mu.Unlock()
	}()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "retry: 2000\n\nevent: hello\ndata: {\"worker\":%q,\"batchsize\":%d,"+
		"\"lease_ms\":%d,\"heartbeat_ms\":%d}\n\n", s.token, size, b.lease.Milliseconds(),
		b.heartbeat.Milliseconds())
	flusher.Flush()
	b.mu.Lock()
	b.free = append(b.free, s)
	b.assignLocked()
	b.mu.Unlock()
	ping := time.NewTicker(b.heartbeat)
	defer ping.Stop()
	buf := make([]byte, 0, 4096)
	for {
		select {
		case <-r.Context().Done():
			return
		case <-s.end:
			io.WriteString(w, "event: bye\ndata: {\"reason\":\"lease expired\"}\n\n")
			return
		case bt := <-s.out:
			buf = buf[:0]
			for _, m := range bt.messages {
				buf = append(buf, `event: msg`+"\n"+`data: {"id":"`...)
				buf = append(buf, m.id...)
				buf = append(buf, `","period":`...)
				buf = strconv.AppendInt(buf, int64(m.period), 10)
				buf = append(buf, `,"attempt":`...)
				buf = strconv.AppendInt(buf, int64(m.attempts), 10)
				buf = append(buf, `,"batch":`...)
				buf = strconv.AppendInt(buf, bt.number, 10)
				buf = append(buf, `,"size":`...)
				buf = strconv.AppendInt(buf, int64(len(bt.messages)), 10)
				buf = append(buf, "}\n\n"...)
			}
			if _, err := w.Write(buf); err != nil {
				return
			}
			flusher.Flush()
		case <-ping.C:
			io.WriteString(w, ": ping\n\n")
			flusher.Flush()
		}
	}
}

type answer struct {
	Batch   int64    `json:"batch"`
	Done    int      `json:"done"`
	Retried int      `json:"retried"`
	Dead    int      `json:"dead"`
	Ignored []string `json:"ignored"`
}

func (b *broker) report(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	number, err := strconv.ParseInt(q.Get("batch"), 10, 64)
	var ids []string
	if err == nil {
		err = json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&ids)
	}
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"error":"give batch=N and a JSON array of ids"}`+"\n")
		return
	}
	b.mu.Lock()
	s := b.sessions[q.Get("worker")]
	if s == nil || s.current == nil || s.current.number != number {
		b.mu.Unlock()
		w.WriteHeader(http.StatusConflict)
		io.WriteString(w, `{"error":"no such batch in flight"}`+"\n")
		return
	}
	bt := s.current
	bt.timer.Stop()
	done := make(map[string]bool, len(ids))
	result := answer{Batch: number, Ignored: []string{}}
	for _, id := range ids {
		done[id] = true
	}
	for _, m := range bt.messages {
		if done[m.id] {
			result.Done++
			delete(done, m.id)
		} else if b.failLocked(m, "not reported") {
			result.Dead++
		} else {
			result.Retried++
		}
	}
	for _, id := range ids {
		if done[id] {
			result.Ignored = append(result.Ignored, id)
			delete(done, id)
		}
	}
	s.current = nil
	b.free = append(b.free, s)
	b.assignLocked()
	b.mu.Unlock()
	json.NewEncoder(w).Encode(result)
}

// saveDeadLetters writes dead letters to the db, as many as are waiting in one
// transaction (group commit).
func saveDeadLetters(db *bolt.DB, dead chan deadLetter, stopped chan struct{}) {
	defer close(stopped)
	for first := range dead {
		letters := []deadLetter{first}
	more:
		for {
			select {
			case d, ok := <-dead:
				if !ok {
					break more
				}
				letters = append(letters, d)
			default:
				break more
			}
		}
		err := db.Update(func(tx *bolt.Tx) error {
			bucket, err := tx.CreateBucketIfNotExists([]byte("failed"))
			if err != nil {
				return err
			}
			for _, d := range letters {
				value, _ := json.Marshal(d)
				if err := bucket.Put([]byte(d.ID), value); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			log.Printf("saving %d dead letters: %v", len(letters), err)
		}
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 8080, "port (0: any free one)")
	dbPath := flag.String("db", "gobroker.db", "bbolt file for dead letters")
	lease := flag.Float64("lease-timeout", 10, "seconds a batch may take")
	heartbeat := flag.Float64("heartbeat", 15, "seconds between pings")
	attempts := flag.Int("max-attempts", 3, "deliveries before a message is dead")
	maxBatch := flag.Int("max-batchsize", 100, "largest batchsize a worker may ask")
	seed := flag.Int64("seed", 0, "seed for the periods (0: from the clock)")
	flag.Parse()
	if *seed == 0 {
		*seed = time.Now().UnixNano()
	}
	db, err := bolt.Open(*dbPath, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		log.Fatalf("cannot open %s: %v", *dbPath, err)
	}
	b := &broker{rng: rand.New(rand.NewSource(*seed)), sessions: map[string]*session{},
		lease: time.Duration(*lease * float64(time.Second)), maxAttempts: *attempts,
		heartbeat: time.Duration(*heartbeat * float64(time.Second)), maxBatch: *maxBatch,
		dead: make(chan deadLetter, 65536)}
	saved := make(chan struct{})
	go saveDeadLetters(db, b.dead, saved)
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatalf("cannot listen: %v", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/task", b.task)
	mux.HandleFunc("/report", b.report)
	server := &http.Server{Handler: mux}
	go server.Serve(listener)
	fmt.Printf("listening on http://%s\n", listener.Addr())
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	listener.Close()
	b.mu.Lock()
	b.stopped = true
	close(b.dead)
	b.mu.Unlock()
	<-saved
	db.Close()
}
