// Command boltcheck drives the real Go bbolt and rs/xid libraries for the
// interop tests and benchmarks of this project. It is built by the tests
// (GOPATH mode, offline) against Debian's golang-github-coreos-bbolt-dev and
// golang-github-rs-xid-dev:
//
//	boltcheck check FILE            open read-write, run tx.Check(), print OK
//	boltcheck dump FILE             one JSON line per key, hex-encoded
//	boltcheck write FILE SHAPE      write a file of a named shape (see shapes)
//	boltcheck xid ID...             parse ids with xid.FromString, one JSON line each
//	boltcheck bench FILE NSINGLE NBULK   time the work of bench/bbolt_bench.py
//	boltcheck ops FILE              apply JSON-line operations from stdin (see ops)
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/rs/xid"
	bolt "go.etcd.io/bbolt"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "boltcheck: "+format+"\n", args...)
	os.Exit(2)
}

func openDB(path string, opts *bolt.Options) *bolt.DB {
	if opts == nil {
		opts = &bolt.Options{}
	}
	opts.Timeout = 10 * time.Second
	db, err := bolt.Open(path, 0600, opts)
	if err != nil {
		fail("open %s: %v", path, err)
	}
	return db
}

func check(path string) {
	db := openDB(path, nil)
	defer db.Close()
	problems := 0
	err := db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			fmt.Println(err)
			problems++
		}
		return nil
	})
	if err != nil {
		fail("view: %v", err)
	}
	if problems > 0 {
		fmt.Printf("%d problems found\n", problems)
		os.Exit(1)
	}
	fmt.Println("OK")
}

type record struct {
	Path  []string `json:"path"`
	Key   string   `json:"key"`
	Value *string  `json:"value"`
	Seq   *uint64  `json:"seq,omitempty"`
}

func dumpBucket(enc *json.Encoder, b *bolt.Bucket, path []string) {
	err := b.ForEach(func(k, v []byte) error {
		r := record{Path: path, Key: hex.EncodeToString(k)}
		if v == nil {
			child := b.Bucket(k)
			seq := child.Sequence()
			r.Seq = &seq
			if err := enc.Encode(r); err != nil {
				return err
			}
			sub := append(append([]string{}, path...), hex.EncodeToString(k))
			dumpBucket(enc, child, sub)
			return nil
		}
		value := hex.EncodeToString(v)
		r.Value = &value
		return enc.Encode(r)
	})
	if err != nil {
		fail("dump: %v", err)
	}
}

func dump(path string) {
	db := openDB(path, &bolt.Options{ReadOnly: true})
	defer db.Close()
	enc := json.NewEncoder(os.Stdout)
	err := db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			seq := b.Sequence()
			if err := enc.Encode(record{Path: []string{}, Key: hex.EncodeToString(name), Seq: &seq}); err != nil {
				return err
			}
			dumpBucket(enc, b, []string{hex.EncodeToString(name)})
			return nil
		})
	})
	if err != nil {
		fail("dump: %v", err)
	}
}

func key(i int) []byte { return []byte(fmt.Sprintf("key-%08d", i)) }

func value(i, size int) []byte {
	v := make([]byte, size)
	for j := range v {
		v[j] = byte((i*31 + j*7) % 251)
	}
	return v
}

func update(db *bolt.DB, fn func(tx *bolt.Tx) error) {
	if err := db.Update(fn); err != nil {
		fail("update: %v", err)
	}
}

// The shapes the interop tests ask of Go, to read back with bbolt_lite.
func write(path, shape string) {
	opts := &bolt.Options{}
	switch shape {
	case "nofreelistsync":
		opts.NoFreelistSync = true
	case "pagesize1k", "bigfreelist":
		opts.PageSize = 1024
	case "pagesize16k":
		opts.PageSize = 16384
	}
	db := openDB(path, opts)
	defer db.Close()
	switch shape {
	case "small", "pagesize1k", "pagesize16k":
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("small"))
			n := 10
			if shape != "small" {
				n = 3000
			}
			for i := 0; i < n; i++ {
				b.Put(key(i), value(i, 50))
			}
			return nil
		})
	case "many":
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("many"))
			for i := 0; i < 100000; i++ {
				b.Put(key(i), value(i, 20))
			}
			return nil
		})
	case "big":
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("big"))
			for i := 0; i < 20; i++ {
				b.Put(key(i), value(i, 10*1024))
			}
			b.Put([]byte("huge"), value(7, 1024*1024))
			return nil
		})
	case "churn", "nofreelistsync":
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("churn"))
			for i := 0; i < 20000; i++ {
				b.Put(key(i), value(i, 30))
			}
			return nil
		})
		for round := 0; round < 5; round++ {
			update(db, func(tx *bolt.Tx) error {
				b := tx.Bucket([]byte("churn"))
				for i := round; i < 20000; i += 10 {
					b.Delete(key(i))
				}
				return nil
			})
		}
	case "nested":
		update(db, func(tx *bolt.Tx) error {
			top, _ := tx.CreateBucket([]byte("top"))
			top.Put([]byte("k"), []byte("v"))
			for i := 0; i < 5; i++ {
				mid, _ := top.CreateBucket(key(i))
				mid.SetSequence(uint64(100 + i))
				for j := 0; j < 200*i; j++ {
					mid.Put(key(j), value(j, 40))
				}
				leaf, _ := mid.CreateBucket([]byte("deep"))
				leaf.Put([]byte("x"), value(i, 5))
			}
			return nil
		})
	case "inline":
		update(db, func(tx *bolt.Tx) error {
			for i := 0; i < 50; i++ {
				b, _ := tx.CreateBucket(key(i))
				b.Put([]byte("a"), value(i, 10))
				b.Put([]byte("b"), value(i, 20))
				if i%7 == 0 {
					b.NextSequence()
				}
			}
			_, err := tx.CreateBucket([]byte("empty"))
			return err
		})
	case "bigfreelist":
		// Over 0xFFFF free pages: the freelist page stores its count in its first id.
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("doomed"))
			for i := 0; i < 7000; i++ {
				b.Put(key(i), value(i, 10*1024))
			}
			return nil
		})
		update(db, func(tx *bolt.Tx) error { return tx.DeleteBucket([]byte("doomed")) })
		update(db, func(tx *bolt.Tx) error {
			b, _ := tx.CreateBucket([]byte("kept"))
			return b.Put([]byte("k"), []byte("v"))
		})
	default:
		fail("unknown shape %q", shape)
	}
}

func parseXids(ids []string) {
	enc := json.NewEncoder(os.Stdout)
	bad := false
	for _, s := range ids {
		id, err := xid.FromString(s)
		if err != nil {
			enc.Encode(map[string]interface{}{"id": s, "error": err.Error()})
			bad = true
			continue
		}
		enc.Encode(map[string]interface{}{
			"id": s, "string": id.String(), "time": id.Time().Unix(),
			"machine": hex.EncodeToString(id.Machine()), "pid": id.Pid(), "counter": id.Counter(),
		})
	}
	if bad {
		os.Exit(1)
	}
}

func bench(path string, nSingle, nBulk int) {
	os.Remove(path)
	db := openDB(path, nil)
	defer func() { db.Close() }() // db is reopened read-only below
	update(db, func(tx *bolt.Tx) error {
		_, err := tx.CreateBucket([]byte("bench"))
		return err
	})
	start := time.Now()
	for i := 0; i < nSingle; i++ {
		update(db, func(tx *bolt.Tx) error {
			return tx.Bucket([]byte("bench")).Put(key(i), value(i, 100))
		})
	}
	single := time.Since(start).Seconds()
	start = time.Now()
	update(db, func(tx *bolt.Tx) error {
		b, _ := tx.CreateBucket([]byte("bulk"))
		for i := 0; i < nBulk; i++ {
			b.Put(key(i*7919%nBulk), value(i, 100))
		}
		return nil
	})
	bulk := time.Since(start).Seconds()
	start = time.Now()
	update(db, func(tx *bolt.Tx) error {
		b, _ := tx.CreateBucket([]byte("sequential"))
		for i := 0; i < nBulk; i++ {
			b.Put(key(i), value(i, 100))
		}
		return nil
	})
	sequential := time.Since(start).Seconds()
	db.Close()
	db = openDB(path, &bolt.Options{ReadOnly: true})
	start = time.Now()
	count := 0
	db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("bulk")).ForEach(func(k, v []byte) error {
			count += len(k) + len(v)
			return nil
		})
	})
	readAll := time.Since(start).Seconds()
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"single_put_tx_s": single, "bulk_put_s": bulk, "sequential_put_s": sequential,
		"read_all_s": readAll, "bytes_read": count,
	})
}

// An operation of the differential test, one JSON line on stdin, and its
// result, one JSON line on stdout. Byte strings are hex; a missing key or
// value is null. Errors are named as test_bbolt_interop.py names bbolt_lite's.
type operation struct {
	Op     string  `json:"op"`
	Bucket string  `json:"bucket"`
	Key    string  `json:"key"`
	Value  *string `json:"value"`
	N      uint64  `json:"n"`
}

type result struct {
	K     *string        `json:"k"`
	V     *string        `json:"v"`
	N     *uint64        `json:"n,omitempty"`
	Stats map[string]int `json:"stats,omitempty"`
	Err   *string        `json:"err"`
}

var errorNames = map[error]string{
	bolt.ErrBucketExists: "bucket exists", bolt.ErrBucketNotFound: "bucket not found",
	bolt.ErrBucketNameRequired: "bucket name required", bolt.ErrTxClosed: "tx closed",
	bolt.ErrTxNotWritable: "tx not writable", bolt.ErrIncompatibleValue: "incompatible value",
	bolt.ErrKeyRequired: "key required", bolt.ErrKeyTooLarge: "key too large",
	bolt.ErrValueTooLarge: "value too large",
}

func hexOrNil(b []byte) *string {
	if b == nil {
		return nil
	}
	s := hex.EncodeToString(b)
	return &s
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		fail("bad hex %q", s)
	}
	return b
}

// ops applies operations to one open file: begin (writable or not),
// commit, rollback, and on a top-level bucket of the transaction: create,
// drop, put, delete, get, next_sequence, set_sequence, and a cursor per
// bucket (first, last, next, prev, seek, cursor_delete).
func ops(path string) {
	db := openDB(path, nil)
	defer db.Close()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<26)
	out := json.NewEncoder(os.Stdout)
	var tx *bolt.Tx
	cursors := map[string]*bolt.Cursor{}
	for in.Scan() {
		var op operation
		if err := json.Unmarshal(in.Bytes(), &op); err != nil {
			fail("bad operation %q: %v", in.Text(), err)
		}
		var r result
		var err error
		name := unhex(op.Bucket)
		closed := tx == nil || tx.DB() == nil // (Go panics on a closed tx's buckets)
		pair := func(k, v []byte) { r.K, r.V = hexOrNil(k), hexOrNil(v) }
		switch op.Op {
		case "begin":
			tx, err = db.Begin(op.N == 1)
			cursors = map[string]*bolt.Cursor{}
		case "commit":
			err = tx.Commit()
		case "rollback":
			err = tx.Rollback()
		default:
			if closed {
				err = bolt.ErrTxClosed
				break
			}
			if op.Op == "create" {
				_, err = tx.CreateBucket(name)
				break
			}
			if op.Op == "drop" {
				if err = tx.DeleteBucket(name); err == nil {
					delete(cursors, op.Bucket)
				}
				break
			}
			b := tx.Bucket(name)
			if b == nil {
				err = bolt.ErrBucketNotFound
				break
			}
			c := cursors[op.Bucket]
			if c == nil && len(op.Op) > 7 && op.Op[:7] == "cursor_" {
				c = b.Cursor()
				cursors[op.Bucket] = c
			}
			switch op.Op {
			case "put":
				value := []byte{}
				if op.Value != nil {
					value = unhex(*op.Value)
				}
				err = b.Put(unhex(op.Key), value)
			case "delete":
				err = b.Delete(unhex(op.Key))
			case "get":
				pair(nil, b.Get(unhex(op.Key)))
			case "next_sequence":
				var n uint64
				n, err = b.NextSequence()
				if err == nil {
					r.N = &n
				}
			case "set_sequence":
				err = b.SetSequence(op.N)
			case "stats":
				st := b.Stats()
				r.Stats = map[string]int{
					"branch_page_n": st.BranchPageN, "branch_overflow_n": st.BranchOverflowN,
					"leaf_page_n": st.LeafPageN, "leaf_overflow_n": st.LeafOverflowN,
					"key_n": st.KeyN, "depth": st.Depth, "branch_alloc": st.BranchAlloc,
					"branch_inuse": st.BranchInuse, "leaf_alloc": st.LeafAlloc,
					"leaf_inuse": st.LeafInuse, "bucket_n": st.BucketN,
					"inline_bucket_n":     st.InlineBucketN,
					"inline_bucket_inuse": st.InlineBucketInuse,
				}
			case "cursor_first":
				pair(c.First())
			case "cursor_last":
				pair(c.Last())
			case "cursor_next":
				pair(c.Next())
			case "cursor_prev":
				pair(c.Prev())
			case "cursor_seek":
				pair(c.Seek(unhex(op.Key)))
			case "cursor_delete":
				err = c.Delete()
			default:
				fail("unknown operation %q", op.Op)
			}
		}
		if err != nil {
			name, known := errorNames[err]
			if !known {
				name = err.Error()
			}
			r.Err = &name
		}
		if err := out.Encode(r); err != nil {
			fail("write: %v", err)
		}
	}
	if tx != nil && tx.DB() != nil {
		tx.Rollback() // (or Close would wait for it for ever)
	}
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: boltcheck check|dump|write|xid|bench|ops ARGS")
	}
	switch os.Args[1] {
	case "check":
		check(os.Args[2])
	case "dump":
		dump(os.Args[2])
	case "write":
		if len(os.Args) != 4 {
			fail("usage: boltcheck write FILE SHAPE")
		}
		write(os.Args[2], os.Args[3])
	case "xid":
		parseXids(os.Args[2:])
	case "ops":
		ops(os.Args[2])
	case "bench":
		if len(os.Args) != 5 {
			fail("usage: boltcheck bench FILE NSINGLE NBULK")
		}
		nSingle, err1 := strconv.Atoi(os.Args[3])
		nBulk, err2 := strconv.Atoi(os.Args[4])
		if err1 != nil || err2 != nil {
			fail("NSINGLE and NBULK must be integers")
		}
		bench(os.Args[2], nSingle, nBulk)
	default:
		fail("unknown command %q", os.Args[1])
	}
}
