package accesslog

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestTargetURL(t *testing.T) {
	tests := []struct {
		in           string
		includeQuery bool
		want         string
	}{
		{"http://example.com/a/b?token=secret#frag", false, "http://example.com/a/b"},
		{"http://example.com/a/b?token=secret#frag", true, "http://example.com/a/b?token=secret"},
		{"http://user:pass@example.com:8080/x", false, "http://example.com:8080/x"},
		{"http://example.com", false, "http://example.com"},
		{"http://example.com/a%2Fb?q=1", false, "http://example.com/a%2Fb"},
		{"http://example.com/?", true, "http://example.com/?"},
		{"//example.com:443", false, "example.com:443"},
	}
	for _, tc := range tests {
		u, err := url.Parse(tc.in)
		if err != nil {
			t.Fatal(err)
		}
		if got := TargetURL(u, tc.includeQuery); got != tc.want {
			t.Errorf("TargetURL(%q, %v) = %q, want %q", tc.in, tc.includeQuery, got, tc.want)
		}
	}
	if got := TargetURL(nil, true); got != "" {
		t.Errorf("TargetURL(nil) = %q", got)
	}
}

// Each record is one plain JSON log line with the Record's field names.
func TestRecordLogLine(t *testing.T) {
	r := record(7)
	r.ProbeNode, r.Region = "", "" // filled from Options
	r.Timestamp = time.Date(2025, 1, 2, 4, 4, 5, 0, time.FixedZone("CET", 3600))
	r.Error = "upstream_timeout"
	lines := recordLines(t, r)
	if len(lines) != 1 {
		t.Fatalf("got %d request lines, want 1", len(lines))
	}
	got := lines[0]
	if got["level"] != "INFO" {
		t.Errorf("level = %v", got["level"])
	}
	want := map[string]any{
		"timestamp": "2025-01-02T03:04:05Z", "token_id": "tok-7", "user_id": "user-1", "token_type": "access",
		"region": "eu-west", "probe_node": "node-1", "client_ip": "192.0.2.7", "protocol": "HTTP/2",
		"method": "GET", "target_url": "https://example.com/path", "status_code": 200.0, "request_size": 7.0,
		"response_size": 0.0, "duration_ms": 3.0, "success": true, "rate_limited": false, "error": "upstream_timeout",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %#v, want %#v", k, got[k], v)
		}
	}
	// Every JSON field of Record appears in the line.
	enc, _ := json.Marshal(Record{})
	var fields map[string]any
	json.Unmarshal(enc, &fields)
	for k := range fields {
		if _, ok := got[k]; !ok {
			t.Errorf("log line lacks field %q", k)
		}
	}
}

// Batches that fail with 500, 429 and a lost response (stored, then 500) are
// retried under the same batch_id, live and then from the spool, and every
// record is stored exactly once.
func TestRetriesDeliverEachRecordOnce(t *testing.T) {
	for _, spooled := range []bool{true, false} {
		t.Run(fmt.Sprintf("spool=%v", spooled), func(t *testing.T) {
			b := newTestBackend(t, func(id string, attempt int) action {
				switch attempt {
				case 1:
					return action{status: http.StatusInternalServerError}
				case 2:
					return action{status: http.StatusTooManyRequests, retryAfter: "1"}
				case 3:
					return action{status: http.StatusBadGateway, store: true}
				}
				return action{}
			})
			o, _ := testOptions(b.srv.URL)
			if spooled {
				o.SpoolDir = t.TempDir()
			}
			s, err := New(o)
			if err != nil {
				t.Fatal(err)
			}
			const n = 100
			for i := range n {
				s.Record(record(i))
			}
			waitFor(t, "all batches accepted", func() bool { return toFloat(o.Metrics.BatchesSent) == 10 })
			if err := s.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			checkExactlyOnce(t, b, n)
			batches := b.batches()
			if len(batches) != 10 {
				t.Errorf("%d batches stored, want 10", len(batches))
			}
			for id, batch := range batches {
				if a := b.attemptsOf(id); a != 4 {
					t.Errorf("batch %s sent %d times, want 4 (3 failures, then accepted as a duplicate)", id, a)
				}
				if batch.ProbeNode != "node-1" || batch.Region != "eu-west" {
					t.Errorf("batch envelope = %q/%q", batch.ProbeNode, batch.Region)
				}
				if len(batch.Logs) > o.BatchSize {
					t.Errorf("batch of %d records, LOG_BATCH_SIZE is %d", len(batch.Logs), o.BatchSize)
				}
			}
			if got := toFloat(o.Metrics.BatchesSent); got != 10 {
				t.Errorf("BatchesSent = %v, want 10", got)
			}
			if got := toFloat(o.Metrics.BatchesRetried); got != 30 {
				t.Errorf("BatchesRetried = %v, want 30", got)
			}
			if spooled {
				if got := toFloat(o.Metrics.BatchesSpooled); got < 1 {
					t.Errorf("BatchesSpooled = %v, want ≥ 1", got)
				}
				if files := spoolFiles(t, o.SpoolDir); len(files) != 0 {
					t.Errorf("spool still holds %v", files)
				}
			}
			if got := toFloat(o.Metrics.SpoolBytes); got != 0 {
				t.Errorf("SpoolBytes = %v after everything was delivered", got)
			}
		})
	}
}

// A backend slower than the client timeout gets the batch again, same id.
func TestTimeoutIsRetried(t *testing.T) {
	b := newTestBackend(t, func(id string, attempt int) action {
		return action{hang: attempt == 1}
	})
	o, _ := testOptions(b.srv.URL)
	o.Client = &http.Client{Timeout: 50 * time.Millisecond}
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkExactlyOnce(t, b, 20)
	for id := range b.batches() {
		if a := b.attemptsOf(id); a != 2 {
			t.Errorf("batch %s sent %d times, want 2", id, a)
		}
	}
}

// Backend unreachable: Close spools the batches; a new Shipper on the same
// spool directory (a restart) delivers them, oldest first, and empties it.
func TestSpoolSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	const n = 35
	o := spoolUndelivered(t, dir, n)
	files := spoolFiles(t, dir)
	if len(files) != 4 {
		t.Fatalf("spool holds %d files, want 4 (35 records in batches of 10)", len(files))
	}
	if got := toFloat(o.Metrics.BatchesSpooled); got != 4 {
		t.Errorf("BatchesSpooled = %v, want 4", got)
	}
	var onDisk int64
	for _, f := range files {
		st, _ := os.Stat(f)
		onDisk += st.Size()
		body, _ := os.ReadFile(f)
		var batch Batch
		if err := json.Unmarshal(body, &batch); err != nil {
			t.Fatalf("spool file %s: %v", f, err)
		}
		if filepath.Base(f) != batch.BatchID+".json" {
			t.Errorf("spool file %s holds batch %s", f, batch.BatchID)
		}
	}
	if got := toFloat(o.Metrics.SpoolBytes); got != float64(onDisk) {
		t.Errorf("SpoolBytes = %v, files hold %d", got, onDisk)
	}

	b := newTestBackend(t, nil)
	o2, _ := testOptions(b.srv.URL)
	o2.SpoolDir = dir
	s2, err := newShipper(o2) // scans the spool
	if err != nil {
		t.Fatal(err)
	}
	if got := toFloat(o2.Metrics.SpoolBytes); got != float64(onDisk) {
		t.Errorf("restarted SpoolBytes = %v, want %d", got, onDisk)
	}
	s2.start()
	waitFor(t, "spooled records delivered", func() bool { return b.storedCount() == n })
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, dir)) == 0 })
	if err := s2.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkExactlyOnce(t, b, n)
	var want []string
	for _, f := range files {
		want = append(want, strings.TrimSuffix(filepath.Base(f), ".json"))
	}
	slices.Sort(want)
	if got := b.storedOrder(); !slices.Equal(got, want) {
		t.Errorf("delivery order %v, want oldest first %v", got, want)
	}
	if got := toFloat(o2.Metrics.SpoolBytes); got != 0 {
		t.Errorf("SpoolBytes = %v after delivery", got)
	}
}

// While the backend is down batches are spooled; when it comes back the
// running Shipper delivers them without a restart.
func TestBackendRecovers(t *testing.T) {
	down := func(string, int) action { return action{status: http.StatusServiceUnavailable} }
	b := newTestBackend(t, down)
	o, _ := testOptions(b.srv.URL)
	o.SpoolDir = t.TempDir()
	o.RetryMax = 20 * time.Millisecond
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		s.Record(record(i))
	}
	waitFor(t, "batches spooled", func() bool { return toFloat(o.Metrics.BatchesSpooled) == 3 })
	if b.storedCount() != 0 {
		t.Fatal("backend stored records while failing")
	}
	b.setPolicy(nil)
	waitFor(t, "spooled records delivered", func() bool { return b.storedCount() == 30 })
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, o.SpoolDir)) == 0 })
	// Fresh records go live again.
	for i := 30; i < 40; i++ {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkExactlyOnce(t, b, 40)
}

// A 400 is not retried: the batch goes to the dead-letter file.
func TestDeadLetter(t *testing.T) {
	b := newTestBackend(t, func(string, int) action {
		return action{status: http.StatusBadRequest, body: `{"reason":"bad record fields"}`}
	})
	o, logs := testOptions(b.srv.URL)
	o.SpoolDir = t.TempDir()
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(o.SpoolDir, DeadLetterFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var entries []deadLetter
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e deadLetter
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("dead-letter line: %v", err)
		}
		entries = append(entries, e)
	}
	if len(entries) != 1 {
		t.Fatalf("%d dead letters, want 1", len(entries))
	}
	e := entries[0]
	var batch Batch
	if err := json.Unmarshal(e.Batch, &batch); err != nil {
		t.Fatal(err)
	}
	if e.Status != 400 || !strings.Contains(e.Response, "bad record fields") || batch.BatchID != e.BatchID || len(batch.Logs) != 3 {
		t.Errorf("dead letter = status %d response %q batch %s with %d records", e.Status, e.Response, batch.BatchID, len(batch.Logs))
	}
	if a := b.attemptsOf(e.BatchID); a != 1 {
		t.Errorf("rejected batch sent %d times, want 1", a)
	}
	if got := toFloat(o.Metrics.BatchesDeadLetter); got != 1 {
		t.Errorf("BatchesDeadLetter = %v", got)
	}
	if got := toFloat(o.Metrics.BatchesRetried); got != 0 {
		t.Errorf("BatchesRetried = %v", got)
	}
	if len(logs.withMsg(t, "backend rejected record batch; kept in dead-letter file")) != 1 {
		t.Error("dead letter not logged")
	}
	if len(spoolFiles(t, o.SpoolDir)) != 0 {
		t.Error("rejected batch left in the spool")
	}
}

// Without a spool directory a rejected batch is logged whole at error level.
func TestDeadLetterWithoutSpoolIsLogged(t *testing.T) {
	b := newTestBackend(t, func(string, int) action { return action{status: http.StatusUnprocessableEntity} })
	o, logs := testOptions(b.srv.URL)
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	s.Record(record(0))
	s.Record(record(1))
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	lines := logs.withMsg(t, "backend rejected record batch; no LOG_SPOOL_DIR for a dead-letter file, batch logged here")
	if len(lines) != 1 {
		t.Fatalf("%d error lines, want 1", len(lines))
	}
	batch, _ := json.Marshal(lines[0]["batch"])
	if lines[0]["level"] != "ERROR" || !strings.Contains(string(batch), `"tok-0"`) || !strings.Contains(string(batch), `"tok-1"`) {
		t.Errorf("error line does not carry the batch: %v", lines[0])
	}
	if got := toFloat(o.Metrics.BatchesDeadLetter); got != 1 {
		t.Errorf("BatchesDeadLetter = %v", got)
	}
}

// Record never waits: with the queue full it drops, counts and warns once.
func TestRecordDropsWhenQueueFull(t *testing.T) {
	b := newTestBackend(t, nil)
	o, logs := testOptions(b.srv.URL)
	o.QueueSize = 5
	s, err := newShipper(o) // not started: nothing drains the queue
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		s.Record(record(i))
	}
	if got := toFloat(o.Metrics.RecordsDropped.WithLabelValues(DropQueueFull)); got != 15 {
		t.Errorf("queue_full drops = %v, want 15", got)
	}
	if got := toFloat(o.Metrics.ShipQueueDepth); got != 5 {
		t.Errorf("ShipQueueDepth = %v, want 5", got)
	}
	warns := logs.withMsg(t, "record queue full; records dropped from shipping (they are in the log)")
	if len(warns) != 1 || warns[0]["level"] != "WARN" {
		t.Errorf("want one rate-limited warning, got %v", warns)
	}
	if n := len(logs.withMsg(t, "request")); n != 20 {
		t.Errorf("%d request log lines, want 20 (dropped records are still logged)", n)
	}
	s.start()
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkExactlyOnce(t, b, 5)
	if got := toFloat(o.Metrics.ShipQueueDepth); got != 0 {
		t.Errorf("ShipQueueDepth = %v after Close", got)
	}
	s.Record(record(99))
	if got := toFloat(o.Metrics.RecordsDropped.WithLabelValues(DropShutdown)); got != 1 {
		t.Errorf("record after Close: shutdown drops = %v, want 1", got)
	}
}

// With a backend that never answers, Record keeps returning and every record
// is accounted for: delivered, or counted under a drop reason.
func TestDeadBackendNeverBlocksAndNothingVanishes(t *testing.T) {
	b := newTestBackend(t, func(string, int) action { return action{hang: true} })
	o, _ := testOptions(b.srv.URL)
	o.QueueSize = 8
	o.BatchSize = 4
	o.MemoryMaxBytes = 8 << 10
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	const n = 3000
	for i := range n {
		s.Record(record(i))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // shut down at once: nothing more can be delivered
	if err := s.Close(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Close = %v, want an error reporting undelivered records", err)
	}
	accounted := float64(b.storedCount())
	for _, reason := range []string{DropQueueFull, DropMemoryFull, DropShutdown} {
		accounted += toFloat(o.Metrics.RecordsDropped.WithLabelValues(reason))
	}
	if accounted != n {
		t.Errorf("%v of %d records delivered or counted as dropped", accounted, n)
	}
	if toFloat(o.Metrics.RecordsDropped.WithLabelValues(DropShutdown)) == 0 {
		t.Error("no batch was held in memory at shutdown")
	}
}

// Beyond LOG_SPOOL_MAX_BYTES a batch is dropped, counted and logged whole.
func TestSpoolBound(t *testing.T) {
	o, logs := testOptions(closedURL(t))
	o.SpoolDir = t.TempDir()
	probe, _ := newBatch("node-1", "eu-west", []Record{record(0), record(1), record(2), record(3), record(4), record(5), record(6), record(7), record(8), record(9)})
	o.SpoolMaxBytes = int64(len(probe.body)) * 3 / 2 // room for one batch of 10
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	const n = 30
	for i := range n {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	files := spoolFiles(t, o.SpoolDir)
	spooledRecords := 0
	var bytes int64
	for _, f := range files {
		body, _ := os.ReadFile(f)
		b, err := decodeBatch(body)
		if err != nil {
			t.Fatal(err)
		}
		spooledRecords += b.records
		bytes += int64(len(body))
	}
	dropped := toFloat(o.Metrics.RecordsDropped.WithLabelValues(DropSpoolFull))
	if len(files) != 1 || dropped != 20 || spooledRecords != 10 {
		t.Errorf("%d files with %d records, %v dropped; want 1 file, 10 records, 20 dropped", len(files), spooledRecords, dropped)
	}
	if bytes > o.SpoolMaxBytes {
		t.Errorf("spool holds %d bytes, bound %d", bytes, o.SpoolMaxBytes)
	}
	drops := logs.withMsg(t, "record batch dropped")
	if len(drops) != 2 || drops[0]["reason"] != DropSpoolFull || drops[0]["level"] != "ERROR" || drops[0]["batch"] == nil {
		t.Errorf("drops not logged with their batch: %v", drops)
	}
}

// A batch waits at most LOG_BATCH_INTERVAL, without Close.
func TestIntervalFlush(t *testing.T) {
	b := newTestBackend(t, nil)
	o, _ := testOptions(b.srv.URL)
	o.BatchSize = 100
	o.BatchInterval = 10 * time.Millisecond
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	for i := range 3 {
		s.Record(record(i))
	}
	waitFor(t, "partial batch sent", func() bool { return b.storedCount() == 3 })
	checkExactlyOnce(t, b, 3)
}

// Close sends what is queued without waiting for the interval.
func TestCloseFlushes(t *testing.T) {
	b := newTestBackend(t, nil)
	o, _ := testOptions(b.srv.URL)
	o.BatchSize = 1000
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 7 {
		s.Record(record(i))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkExactlyOnce(t, b, 7)
	if len(b.batches()) != 1 {
		t.Errorf("%d batches, want 1", len(b.batches()))
	}
}

// Leftovers of a crash are cleaned up: temp files removed, undecodable
// files moved aside instead of blocking the spool.
func TestSpoolStartupScan(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "0190.json.123.tmp"), []byte(`{"batch_id":`), 0o600)
	os.WriteFile(filepath.Join(dir, "0000-bogus.json"), []byte(`not json`), 0o600)
	good, _ := newBatch("node-0", "us-east", []Record{record(1)})
	os.WriteFile(filepath.Join(dir, good.id+".json"), good.body, 0o600)

	b := newTestBackend(t, nil)
	o, logs := testOptions(b.srv.URL)
	o.SpoolDir = dir
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "spooled batch delivered", func() bool { return b.storedCount() == 1 })
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, dir)) == 0 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := dirEntries(t, dir); !slices.Equal(got, []string{"0000-bogus.json.corrupt"}) {
		t.Errorf("spool dir = %v", got)
	}
	if len(logs.withMsg(t, "spool file does not hold a batch; moved aside")) != 1 {
		t.Error("corrupt file not logged")
	}
}

func TestPermanent(t *testing.T) {
	for code, want := range map[int]bool{400: true, 401: true, 403: true, 404: true, 413: true, 422: true,
		408: false, 429: false, 500: false, 502: false, 503: false, 301: false} {
		if got := permanent(fmt.Errorf("wrapped: %w", &StatusError{Code: code})); got != want {
			t.Errorf("permanent(%d) = %v", code, got)
		}
	}
	if permanent(errors.New("connection refused")) {
		t.Error("network error is permanent")
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{base: 100 * time.Millisecond, max: time.Second}
	for i, ceil := range []time.Duration{100, 200, 400, 800, 1000, 1000, 1000} {
		ceil *= time.Millisecond
		if d := b.next(nil); d < ceil/2 || d > ceil {
			t.Errorf("wait %d = %v, want in [%v, %v]", i, d, ceil/2, ceil)
		}
	}
	if d := b.next(&StatusError{Code: 429, RetryAfter: time.Hour}); d != time.Second {
		t.Errorf("Retry-After not capped: %v", d)
	}
	b.reset()
	if d := b.next(&StatusError{Code: 503, RetryAfter: 700 * time.Millisecond}); d != 700*time.Millisecond {
		t.Errorf("Retry-After not honoured: %v", d)
	}
}
