package accesslog

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// action is what the test backend does with one attempt of a batch.
type action struct {
	status     int    // 0 = 200
	store      bool   // store the batch even though status is an error (a lost response)
	hang       bool   // block until the client gives up
	retryAfter string // Retry-After header
	body       string
}

// testBackend is a real HTTP backend on loopback that stores each batch_id
// once, like the collector, and fails on purpose according to policy.
type testBackend struct {
	t       *testing.T
	srv     *httptest.Server
	apiKey  string
	release chan struct{}

	mu       sync.Mutex
	policy   func(id string, attempt int) action
	attempts map[string]int
	stored   map[string]Batch
	order    []string // batch ids in the order they were stored
	problems []string // protocol violations seen by the backend
}

func newTestBackend(t *testing.T, policy func(id string, attempt int) action) *testBackend {
	b := &testBackend{t: t, apiKey: "k3y", policy: policy, release: make(chan struct{}),
		attempts: map[string]int{}, stored: map[string]Batch{}}
	b.srv = httptest.NewServer(http.HandlerFunc(b.serve))
	t.Cleanup(func() {
		close(b.release)
		b.srv.Close()
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, p := range b.problems {
			t.Errorf("backend saw: %s", p)
		}
	})
	return b
}

func (b *testBackend) serve(w http.ResponseWriter, r *http.Request) {
	var batch Batch
	err := json.NewDecoder(r.Body).Decode(&batch)
	b.mu.Lock()
	switch {
	case r.Method != http.MethodPost || r.URL.Path != BatchPath:
		b.problems = append(b.problems, fmt.Sprintf("request %s %s", r.Method, r.URL.Path))
	case r.Header.Get("Authorization") != "Bearer "+b.apiKey:
		b.problems = append(b.problems, fmt.Sprintf("Authorization %q", r.Header.Get("Authorization")))
	case r.Header.Get("Content-Type") != "application/json":
		b.problems = append(b.problems, fmt.Sprintf("Content-Type %q", r.Header.Get("Content-Type")))
	case err != nil || batch.BatchID == "":
		b.problems = append(b.problems, fmt.Sprintf("bad body: %v", err))
	}
	b.attempts[batch.BatchID]++
	act := action{}
	if b.policy != nil {
		act = b.policy(batch.BatchID, b.attempts[batch.BatchID])
	}
	if (!act.hang && act.status < 300) || act.store {
		if _, dup := b.stored[batch.BatchID]; !dup {
			b.stored[batch.BatchID] = batch
			b.order = append(b.order, batch.BatchID)
		}
	}
	b.mu.Unlock()
	if act.hang {
		select {
		case <-r.Context().Done():
		case <-b.release:
		}
		return
	}
	if act.retryAfter != "" {
		w.Header().Set("Retry-After", act.retryAfter)
	}
	if act.status == 0 {
		act.status = http.StatusOK
	}
	w.WriteHeader(act.status)
	fmt.Fprint(w, act.body)
}

func (b *testBackend) setPolicy(p func(id string, attempt int) action) {
	b.mu.Lock()
	b.policy = p
	b.mu.Unlock()
}

// records counts stored records by token id.
func (b *testBackend) records() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := map[string]int{}
	for _, batch := range b.stored {
		for _, r := range batch.Logs {
			n[r.TokenID]++
		}
	}
	return n
}

func (b *testBackend) storedCount() int {
	total := 0
	for _, c := range b.records() {
		total += c
	}
	return total
}

func (b *testBackend) batches() map[string]Batch {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]Batch{}
	for k, v := range b.stored {
		out[k] = v
	}
	return out
}

func (b *testBackend) attemptsOf(id string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.attempts[id]
}

func (b *testBackend) storedOrder() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.order...)
}

// closedURL is a loopback URL nothing listens on.
func closedURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// logBuffer is a concurrency-safe sink for a JSON slog handler.
type logBuffer struct{ testutil.SyncBuffer }

// lines decodes every log line.
func (l *logBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, line)
		}
		out = append(out, m)
	}
	return out
}

func (l *logBuffer) withMsg(t *testing.T, msg string) []map[string]any {
	var out []map[string]any
	for _, m := range l.lines(t) {
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// testOptions are fast options against url; the returned buffer gets the log.
func testOptions(url string) (Options, *logBuffer) {
	lb := &logBuffer{}
	return Options{
		Log:           slog.New(slog.NewJSONHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})),
		BackendURL:    url,
		BackendAPIKey: "k3y",
		BatchSize:     10,
		BatchInterval: time.Hour, // batches are cut by size or by Close unless a test says otherwise
		QueueSize:     1000,
		ProbeNode:     "node-1",
		Region:        "eu-west",
		Metrics:       metrics.New(),
		RetryBase:     time.Millisecond,
		RetryMax:      5 * time.Millisecond,
	}, lb
}

func record(i int) Record {
	return Record{
		Timestamp:   time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC).Add(time.Duration(i) * time.Millisecond),
		TokenID:     fmt.Sprintf("tok-%d", i),
		UserID:      "user-1",
		TokenType:   "access",
		ClientIP:    "192.0.2.7",
		Protocol:    "HTTP/2",
		Method:      "GET",
		TargetURL:   "https://example.com/path",
		StatusCode:  200,
		RequestSize: int64(i),
		DurationMS:  3,
		Success:     true,
	}
}

// checkExactlyOnce fails unless tok-0 … tok-(n-1) were each stored once.
func checkExactlyOnce(t *testing.T, b *testBackend, n int) {
	t.Helper()
	got := b.records()
	if len(got) != n {
		t.Errorf("backend stored %d distinct records, want %d", len(got), n)
	}
	for i := range n {
		if c := got[fmt.Sprintf("tok-%d", i)]; c != 1 {
			t.Errorf("tok-%d stored %d times, want 1", i, c)
		}
	}
}

// waitFor polls cond; the deadline only guards against a hung test.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func spoolFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*"+spoolExt))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

var toFloat = promtest.ToFloat64

// spoolUndelivered runs a Shipper whose backend is unreachable over dir,
// records n records and closes it: the batches are left in the spool, as
// after a life without a backend. It returns the options it used.
func spoolUndelivered(t *testing.T, dir string, n int) Options {
	t.Helper()
	o, _ := testOptions(closedURL(t))
	o.SpoolDir = dir
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	return o
}

// recordLines runs a Shipper without a backend, records rs, closes it and
// returns the record log lines it wrote, decoded.
func recordLines(t *testing.T, rs ...Record) []map[string]any {
	t.Helper()
	o, logs := testOptions("")
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		s.Record(r)
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	return logs.withMsg(t, "request")
}
