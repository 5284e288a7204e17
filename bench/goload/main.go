// Command goload loads a broker of PROTOCOL.md for bench/gobench.py: C
// workers, each with an event stream and a keep-alive connection for its
// reports, doing no work: a batch is reported as soon as its last message is
// read, less a share F of its ids, left unreported. Light on CPU (raw sockets,
// no JSON decoding) so that the broker, not the load, is what is measured.
//
//	goload -url http://127.0.0.1:8080 [-c 8] [-b 10] [-s 10] [-f 0.2] [-seed 1]
//
// It prints one JSON line: settled_per_s (done + dead, as the report answers
// count them), reports_per_s, p50_ms and p99_ms (from sending a report to
// reading the first message of that worker's next batch), errors, elapsed_s
// and client_cpu_s.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"syscall"
	"time"
)

type worker struct {
	addr     string
	size     int
	fail     float64
	rng      *rand.Rand
	deadline time.Time

	rep       net.Conn // keep-alive connection for reports
	repReader *bufio.Reader

	done, dead, reports, errors int64
	latencies                   []float64 // ms
}

func (w *worker) expired() bool { return !time.Now().Before(w.deadline) }

// text returns the string value of "key":"..." in a JSON object.
func text(data []byte, key string) []byte {
	i := bytes.Index(data, []byte(`"`+key+`":"`))
	if i < 0 {
		return nil
	}
	rest := data[i+len(key)+4:]
	if j := bytes.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return nil
}

// number returns the integer value of "key":N in a JSON object, or -1.
func number(data []byte, key string) int64 {
	i := bytes.Index(data, []byte(`"`+key+`":`))
	if i < 0 {
		return -1
	}
	n, digits := int64(0), 0
	for _, c := range data[i+len(key)+3:] {
		if c < '0' || c > '9' {
			break
		}
		n, digits = n*10+int64(c-'0'), digits+1
	}
	if digits == 0 {
		return -1
	}
	return n
}

func (w *worker) run(wg *sync.WaitGroup) {
	defer wg.Done()
	for !w.expired() {
		bye, err := w.stream()
		if bye {
			break
		}
		if err != nil && !w.expired() {
			w.errors++
			time.Sleep(50 * time.Millisecond)
		}
	}
	if w.rep != nil {
		w.rep.Close()
	}
}

// stream reads one event stream and reports its batches: (bye seen, error).
func (w *worker) stream() (bool, error) {
	conn, err := net.DialTimeout("tcp", w.addr, 5*time.Second)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	conn.SetDeadline(w.deadline)
	fmt.Fprintf(conn, "GET /task?batchsize=%d HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n",
		w.size, w.addr)
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 65536), nil)
	if err != nil {
		return false, err
	}
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("GET /task: %s", resp.Status)
	}
	body := bufio.NewReaderSize(resp.Body, 65536) // (chunked or not: net/http knows)
	var token, event string
	var sentAt time.Time
	batch, size := int64(-1), int64(0)
	ids := make([][]byte, 0, w.size)
	for {
		line, err := body.ReadSlice('\n')
		if err != nil {
			if w.expired() {
				return false, nil
			}
			return false, err
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0: // the end of an event
			if event == "msg" && size > 0 && int64(len(ids)) == size {
				sentAt = time.Now()
				if err := w.report(token, batch, ids); err != nil {
					return false, err
				}
				ids = ids[:0]
			}
			event = ""
		case line[0] == ':':
		case bytes.HasPrefix(line, []byte("event:")):
			event = string(bytes.TrimSpace(line[6:]))
			if event == "bye" {
				return true, nil
			}
		case bytes.HasPrefix(line, []byte("data:")):
			data := line[5:]
			if event == "hello" {
				token = url.QueryEscape(string(text(data, "worker")))
			} else if event == "msg" {
				id, no := text(data, "id"), number(data, "batch")
				if id == nil || no < 0 || (len(ids) > 0 && no != batch) {
					return false, fmt.Errorf("malformed message event: %s", data)
				}
				if len(ids) == 0 {
					batch, size = no, number(data, "size")
					if !sentAt.IsZero() {
						w.latencies = append(w.latencies, float64(time.Since(sentAt))/1e6)
						sentAt = time.Time{}
					}
				}
				ids = append(ids, append([]byte(nil), id...))
			}
		}
	}
}

// report POSTs the batch's ids (less the unreported share) on the keep-alive
// connection, once more on a new one if that fails, and counts the answer.
func (w *worker) report(token string, batch int64, ids [][]byte) error {
	body := []byte{'['}
	for _, id := range ids {
		if w.fail > 0 && w.rng.Float64() < w.fail {
			continue
		}
		if len(body) > 1 {
			body = append(body, ',')
		}
		body = append(append(append(body, '"'), id...), '"')
	}
	body = append(body, ']')
	request := fmt.Sprintf("POST /report?worker=%s&batch=%d HTTP/1.1\r\nHost: %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		token, batch, w.addr, len(body), body)
	var err error
	for try := 0; try < 2 && !w.expired(); try++ {
		if w.rep == nil {
			if w.rep, err = net.DialTimeout("tcp", w.addr, 5*time.Second); err != nil {
				w.rep = nil
				return err
			}
			w.rep.SetDeadline(w.deadline)
			w.repReader = bufio.NewReaderSize(w.rep, 4096)
		}
		var resp *http.Response
		var answer []byte
		if _, err = io.WriteString(w.rep, request); err == nil {
			if resp, err = http.ReadResponse(w.repReader, nil); err == nil {
				answer, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
		}
		if err != nil || resp.Close {
			w.rep.Close()
			w.rep = nil
		}
		if err != nil {
			continue
		}
		if resp.StatusCode != http.StatusOK {
			w.errors++
			return nil
		}
		w.reports++
		w.done += number(answer, "done")
		w.dead += number(answer, "dead")
		return nil
	}
	if w.expired() {
		return nil
	}
	return err
}

func main() {
	base := flag.String("url", "", "the broker, e.g. http://127.0.0.1:8080")
	count := flag.Int("c", 8, "workers")
	size := flag.Int("b", 10, "batchsize")
	seconds := flag.Float64("s", 10, "seconds to run")
	fail := flag.Float64("f", 0, "share of ids left unreported (0..1)")
	seed := flag.Int64("seed", 1, "seed for which ids go unreported")
	flag.Parse()
	u, err := url.Parse(*base)
	if err != nil || u.Host == "" || *count < 1 || *size < 1 || *seconds <= 0 || *fail < 0 || *fail > 1 {
		fmt.Fprintln(os.Stderr, "goload: give -url http://HOST:PORT and sane -c -b -s -f (see -h)")
		os.Exit(2)
	}
	start := time.Now()
	deadline := start.Add(time.Duration(*seconds * float64(time.Second)))
	workers := make([]*worker, *count)
	var wg sync.WaitGroup
	for i := range workers {
		workers[i] = &worker{addr: u.Host, size: *size, fail: *fail, deadline: deadline,
			rng: rand.New(rand.NewSource(*seed + int64(i)))}
		wg.Add(1)
		go workers[i].run(&wg)
	}
	wg.Wait()
	elapsed := time.Since(start)
	if limit := deadline.Sub(start); elapsed > limit {
		elapsed = limit
	}
	var done, dead, reports, errors int64
	var latencies []float64
	for _, w := range workers {
		done, dead, reports, errors = done+w.done, dead+w.dead, reports+w.reports, errors+w.errors
		latencies = append(latencies, w.latencies...)
	}
	sort.Float64s(latencies)
	quantile := func(q float64) float64 {
		if len(latencies) == 0 {
			return -1
		}
		return latencies[int(q*float64(len(latencies)-1))]
	}
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	cpu := time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
	secs := elapsed.Seconds()
	out, _ := json.Marshal(map[string]interface{}{
		"settled_per_s": float64(done+dead) / secs, "reports_per_s": float64(reports) / secs,
		"p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "errors": errors, "done": done,
		"dead": dead, "elapsed_s": secs, "client_cpu_s": cpu.Seconds()})
	fmt.Println(string(out))
}
