// Command goworker is a worker for broker.py written as a Go developer would
// write one with nothing but the standard library (net/http, bufio,
// encoding/json): it reads the event stream of GET /task line by line, runs
// nothing (each message succeeds at once), and reports each whole batch with
// POST /report. The interop tests build it (GOPATH mode, offline) and run it:
//
//	goworker URL BATCHES BATCHSIZE
//
// It prints one line per report ("batch N: STATUS") and exits 0 once BATCHES
// batches were reported 200, 1 on anything else.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

type message struct {
	ID     string `json:"id"`
	Period int    `json:"period"`
	Batch  int    `json:"batch"`
	Size   int    `json:"size"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goworker: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: goworker URL BATCHES BATCHSIZE")
	}
	base := strings.TrimRight(os.Args[1], "/")
	batches, err1 := strconv.Atoi(os.Args[2])
	batchsize, err2 := strconv.Atoi(os.Args[3])
	if err1 != nil || err2 != nil || batches < 1 || batchsize < 1 {
		fail("BATCHES and BATCHSIZE must be positive integers")
	}
	client := &http.Client{Timeout: 30 * time.Second} // for the reports: a stream has no end
	request, err := http.NewRequest("GET", base+"/task?batchsize="+strconv.Itoa(batchsize), nil)
	if err != nil {
		fail("%v", err)
	}
	request.Header.Set("Accept", "text/event-stream")
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		fail("stream: %v", err)
	}
	defer response.Body.Close()
	if response.StatusCode != http.StatusOK {
		fail("stream: %s", response.Status)
	}

	var token, event string
	var data []string
	var ids []string
	reported := 0
	lines := bufio.NewScanner(response.Body)
	for lines.Scan() {
		line := lines.Text()
		switch {
		case line == "": // the end of an event
			text := strings.Join(data, "\n")
			kind := event
			event, data = "", nil
			if text == "" {
				continue
			}
			switch kind {
			case "hello":
				var hello struct {
					Worker string `json:"worker"`
				}
				if err := json.Unmarshal([]byte(text), &hello); err != nil {
					fail("hello: %v", err)
				}
				token = hello.Worker
			case "msg":
				var m message
				if err := json.Unmarshal([]byte(text), &m); err != nil {
					fail("msg: %v", err)
				}
				ids = append(ids, m.ID)
				if len(ids) < m.Size {
					continue
				}
				status := report(client, base, token, m.Batch, ids)
				fmt.Printf("batch %d: %d\n", m.Batch, status)
				if status != http.StatusOK {
					os.Exit(1)
				}
				ids = nil
				if reported++; reported == batches {
					return
				}
			case "bye":
				fail("the broker said bye: %s", text)
			}
		case strings.HasPrefix(line, ":"): // a comment: the heartbeat
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimPrefix(strings.TrimPrefix(line, "event:"), " ")
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
		}
	}
	fail("the stream ended after %d batches: %v", reported, lines.Err())
}

func report(client *http.Client, base, token string, batch int, ids []string) int {
	body, _ := json.Marshal(ids)
	query := url.Values{"worker": {token}, "batch": {strconv.Itoa(batch)}}
	response, err := client.Post(base+"/report?"+query.Encode(), "application/json",
		bytes.NewReader(body))
	if err != nil {
		fail("report: %v", err)
	}
	defer response.Body.Close()
	return response.StatusCode
}
