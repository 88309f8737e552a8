package accesslog

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Shutdown without a spool against a failing backend keeps backing off;
// before the fix a closed drain channel turned it into a busy loop (34,610
// POSTs in one second).
func TestCloseWithoutSpoolBacksOff(t *testing.T) {
	var posts atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		posts.Add(1)
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	s, err := New(Options{BackendURL: srv.URL, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		BatchSize: 1, MaxAttempts: 1, RetryBase: 200 * time.Millisecond, RetryMax: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	s.Record(Record{Timestamp: time.Now(), TokenID: "t"})
	deadline := time.Now().Add(5 * time.Second)
	for posts.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	before := posts.Load()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.Close(ctx); err == nil {
		t.Error("Close reported success with the backend down and no spool")
	}
	if during := posts.Load() - before; during > 50 {
		t.Errorf("%d POSTs during a 1 s Close: no backoff", during)
	}
}

// A spooled batch whose file disappeared (another process sharing the
// directory delivered it) is skipped, and the batches behind it are sent.
func TestSpoolSkipsVanishedHead(t *testing.T) {
	dir := t.TempDir()
	var got atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got.Add(1)
		io.Copy(io.Discard, r.Body)
	}))
	defer srv.Close()
	s, err := newShipper(Options{BackendURL: srv.URL, SpoolDir: dir, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		RetryBase: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	b1, _ := newBatch("n", "r", []Record{{Timestamp: time.Now()}})
	b2, _ := newBatch("n", "r", []Record{{Timestamp: time.Now()}})
	if err := s.spool.put(b1); err != nil {
		t.Fatal(err)
	}
	if err := s.spool.put(b2); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, b1.id+spoolExt)) // the index still lists it
	s.start()
	defer s.Close(context.Background())
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(dir, b2.id+spoolExt)); os.IsNotExist(err) && got.Load() >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("batch behind a vanished spool file never delivered (%d POSTs)", got.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Batches are split before they outgrow the backend's body limit; every
// record is kept, in order, and each piece has its own id.
func TestNewBatchesSplitsLargeBatches(t *testing.T) {
	var recs []Record
	for i := 0; i < 10; i++ {
		recs = append(recs, Record{Timestamp: time.Now(), TargetURL: strings.Repeat("x", 1000) + strconv.Itoa(i)})
	}
	batches, err := newBatches("n", "r", recs, 3000)
	if err != nil {
		t.Fatal(err)
	}
	if len(batches) < 4 {
		t.Fatalf("%d batches for ~10 KB at a 3 KB limit", len(batches))
	}
	ids := map[string]bool{}
	var got []Record
	for _, b := range batches {
		if len(b.body) > 3000 {
			t.Errorf("batch of %d bytes over the limit", len(b.body))
		}
		ids[b.id] = true
		var wire Batch
		if err := json.Unmarshal(b.body, &wire); err != nil {
			t.Fatal(err)
		}
		got = append(got, wire.Logs...)
	}
	if len(ids) != len(batches) || len(got) != len(recs) {
		t.Fatalf("%d ids for %d batches, %d records for %d", len(ids), len(batches), len(got), len(recs))
	}
	for i := range recs {
		if got[i].TargetURL != recs[i].TargetURL {
			t.Fatalf("record %d out of order", i)
		}
	}
	// One record over the limit is sent alone (and dead-lettered by the
	// backend if it is really too large), never dropped here.
	one, err := newBatches("n", "r", recs[:1], 10)
	if err != nil || len(one) != 1 {
		t.Fatalf("single oversized record: %v, %d batches", err, len(one))
	}
}
