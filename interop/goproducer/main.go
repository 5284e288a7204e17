// Command goproducer is a producer for broker.py --source api written as a Go
// developer would write one with nothing but the standard library
// (net/http, encoding/json): it enqueues JOBS jobs, PER_REQUEST at a time,
// with POST /enqueue, each job {"payload": {"n": N}, "key": "go-N"}, and
// retries a 503 after its Retry-After. The interop tests build it (GOPATH
// mode, offline) and run it:
//
//	goproducer URL JOBS PER_REQUEST
//
// It prints each job's id, one a line, and exits 0 once all were accepted,
// 1 on anything else.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

type job struct {
	Payload map[string]int `json:"payload"`
	Key     string         `json:"key"`
}

type answer struct {
	IDs        []string `json:"ids"`
	Duplicates []int    `json:"duplicates"`
	Error      string   `json:"error"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goproducer: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: goproducer URL JOBS PER_REQUEST")
	}
	total, err1 := strconv.Atoi(os.Args[2])
	per, err2 := strconv.Atoi(os.Args[3])
	if err1 != nil || err2 != nil || total < 0 || per < 1 {
		fail("JOBS and PER_REQUEST must be whole numbers")
	}
	client := &http.Client{Timeout: 30 * time.Second}
	for start := 0; start < total; start += per {
		var jobs []job
		for n := start; n < start+per && n < total; n++ {
			jobs = append(jobs, job{Payload: map[string]int{"n": n}, Key: fmt.Sprintf("go-%d", n)})
		}
		body, err := json.Marshal(jobs)
		if err != nil {
			fail("%v", err)
		}
		for {
			response, err := client.Post(os.Args[1]+"/enqueue", "application/json",
				bytes.NewReader(body))
			if err != nil {
				fail("%v", err)
			}
			raw, err := io.ReadAll(response.Body)
			response.Body.Close()
			if err != nil {
				fail("%v", err)
			}
			if response.StatusCode == http.StatusServiceUnavailable {
				wait, _ := strconv.Atoi(response.Header.Get("Retry-After"))
				time.Sleep(time.Duration(wait+1) * time.Second)
				continue
			}
			var got answer
			if err := json.Unmarshal(raw, &got); err != nil {
				fail("an answer that is not JSON: %q", raw)
			}
			if response.StatusCode != http.StatusOK {
				fail("%d: %s", response.StatusCode, got.Error)
			}
			if len(got.IDs) != len(jobs) {
				fail("%d ids for %d jobs", len(got.IDs), len(jobs))
			}
			for _, id := range got.IDs {
				fmt.Println(id)
			}
			break
		}
	}
}
