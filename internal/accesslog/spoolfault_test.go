package accesslog

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Issue 12, item 1. A backend that accepts connections and never answers:
// the batch is spooled as soon as its first attempt times out (it used to
// wait out three attempts in memory), the metrics say so, and once the
// backend answers the spooled batch is delivered exactly once, under the
// batch_id it was first sent with.
func TestHangingBackendSpoolsAfterFirstAttempt(t *testing.T) {
	dir := t.TempDir()
	o, _ := testOptions("")
	o.SpoolDir = dir
	o.Timeout = 100 * time.Millisecond // the first attempt must end for the batch to move

	// Filled in by the backend as attempts arrive (the policy runs under
	// the backend's lock).
	var (
		recovered       bool
		inMemoryAtFirst int64  // ShipMemoryOldest when attempt 1 arrived
		onDiskAtRetry   []bool // for each later attempt: was the spool file there
		inMemoryAtRetry []int64
	)
	b := newTestBackend(t, func(id string, attempt int) action {
		if attempt == 1 {
			inMemoryAtFirst = o.Metrics.ShipMemoryOldest.Load()
			return action{hang: true}
		}
		_, err := os.Stat(filepath.Join(dir, id+spoolExt))
		onDiskAtRetry = append(onDiskAtRetry, err == nil)
		inMemoryAtRetry = append(inMemoryAtRetry, o.Metrics.ShipMemoryOldest.Load())
		if !recovered {
			return action{status: http.StatusServiceUnavailable}
		}
		return action{}
	})
	o.BackendURL = b.srv.URL
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	const n = 10 // one batch
	for i := range n {
		s.Record(record(i))
	}
	waitFor(t, "batch spooled", func() bool { return toFloat(o.Metrics.BatchesSpooled) == 1 })
	files := spoolFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("spool holds %v, want one batch", files)
	}
	id := strings.TrimSuffix(filepath.Base(files[0]), spoolExt)
	// At least the first attempt; on a loaded machine a redelivery may
	// already have run into the 100 ms timeout too.
	if got := toFloat(o.Metrics.ShipAttemptsTimedOut); got < 1 {
		t.Errorf("ShipAttemptsTimedOut = %v, want at least 1", got)
	}
	if got := toFloat(o.Metrics.ShipMemoryAge); got != 0 {
		t.Errorf("ShipMemoryAge = %v with the only batch on disk, want 0", got)
	}
	waitFor(t, "a redelivery attempt", func() bool { return b.attemptsOf(id) >= 2 })
	b.mu.Lock()
	recovered = true
	b.mu.Unlock()
	waitFor(t, "spooled batch delivered", func() bool { return b.storedCount() == n })
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, dir)) == 0 })
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	checkExactlyOnce(t, b, n)
	if got := b.storedOrder(); !slices.Equal(got, []string{id}) {
		t.Errorf("stored batches %v, want only the spooled %s", got, id)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if inMemoryAtFirst == 0 {
		t.Error("ShipMemoryOldest was 0 while the batch waited on its first attempt")
	}
	for i, onDisk := range onDiskAtRetry {
		if !onDisk {
			t.Errorf("attempt %d arrived before the batch was spooled: it was retried from memory", i+2)
		}
		if inMemoryAtRetry[i] != 0 {
			t.Errorf("attempt %d: ShipMemoryOldest = %d, want 0 (nothing held only in memory)", i+2, inMemoryAtRetry[i])
		}
	}
	if got := toFloat(o.Metrics.ShipAttemptsTimedOut); got != 1 {
		t.Errorf("ShipAttemptsTimedOut = %v at the end, want 1 (later attempts were answered)", got)
	}
	if got := toFloat(o.Metrics.SpoolBytes); got != 0 {
		t.Errorf("SpoolBytes = %v after delivery", got)
	}
}

// Issue 12, item 2. A spool file that can be neither read nor moved aside
// used to be forgotten by the running process (its records unshipped until a
// restart, the gauge at 0, nothing counted). Now it stays in the spool and in
// the gauge, is counted, and is retried: once it is readable again the
// running shipper delivers it. Tests run as root, so "unreadable" is a
// directory in the file's place, and the rename aside is blocked by a file
// already holding the *.unreadable name (renaming a directory onto a file
// fails with ENOTDIR).
func TestUnreadableSpoolFileIsKeptAndRetried(t *testing.T) {
	dir := t.TempDir()
	// A first life with the backend unreachable leaves three batches.
	const n = 30
	spoolUndelivered(t, dir, n)
	files := spoolFiles(t, dir)
	if len(files) != 3 {
		t.Fatalf("spool holds %d files, want 3", len(files))
	}
	slices.Sort(files)
	head := files[0] // oldest: the redeliverer reads it first
	headBody, err := os.ReadFile(head)
	if err != nil {
		t.Fatal(err)
	}

	b := newTestBackend(t, nil)
	o2, logs := testOptions(b.srv.URL)
	o2.SpoolDir = dir
	s2, err := newShipper(o2) // indexes the three files
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(head); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(head, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(head+".unreadable", []byte("in the way"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2.start()
	defer s2.Close(context.Background())

	waitFor(t, "the readable batches delivered", func() bool { return b.storedCount() == 20 })
	waitFor(t, "the unreadable file retried", func() bool { return toFloat(o2.Metrics.SpoolReadErrors) >= 2 })
	// The gauge drops when a delivered file is removed, a moment after the
	// backend stored it (this failed CI once when read at once).
	waitFor(t, "SpoolBytes down to the unreadable batch alone", func() bool {
		return toFloat(o2.Metrics.SpoolBytes) == float64(len(headBody))
	})
	if got := toFloat(o2.Metrics.SpoolFilesSetAside.WithLabelValues("unreadable")); got != 0 {
		t.Errorf("SpoolFilesSetAside{unreadable} = %v, but the rename failed", got)
	}
	if len(logs.withMsg(t, "spool file can be neither read nor moved aside; kept, retrying later")) == 0 {
		t.Error("the unreadable file was not logged")
	}

	// The operator repairs it: the batch is put back atomically (a plain
	// remove-then-write would let the shipper see the file missing and
	// rightly forget it as delivered elsewhere).
	fixed := filepath.Join(dir, "restore")
	if err := os.WriteFile(fixed, headBody, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, fixed, unix.AT_FDCWD, head, unix.RENAME_EXCHANGE); err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
			t.Skipf("RENAME_EXCHANGE unsupported here: %v", err)
		}
		t.Fatal(err)
	}
	waitFor(t, "the repaired batch delivered by the running shipper", func() bool { return b.storedCount() == n })
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, dir)) == 0 })
	checkExactlyOnce(t, b, n)
	if got := toFloat(o2.Metrics.SpoolBytes); got != 0 {
		t.Errorf("SpoolBytes = %v after delivery", got)
	}
}

// Issue 12, item 2. The spool gauge follows a file moved aside: it used to
// keep the corrupt file's bytes until some other batch was parked or
// delivered.
func TestCorruptSpoolFileLeavesTheGauge(t *testing.T) {
	dir := t.TempDir()
	bogus := filepath.Join(dir, "0000-bogus.json")
	if err := os.WriteFile(bogus, []byte("not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := newTestBackend(t, nil)
	o, _ := testOptions(b.srv.URL)
	o.SpoolDir = dir
	s, err := newShipper(o)
	if err != nil {
		t.Fatal(err)
	}
	if got := toFloat(o.Metrics.SpoolBytes); got != float64(len("not json")) {
		t.Fatalf("SpoolBytes = %v at start, want %d", got, len("not json"))
	}
	s.start()
	defer s.Close(context.Background())
	waitFor(t, "corrupt file set aside", func() bool {
		return toFloat(o.Metrics.SpoolFilesSetAside.WithLabelValues("corrupt")) == 1
	})
	if _, err := os.Stat(bogus + ".corrupt"); err != nil {
		t.Errorf("corrupt file not moved aside: %v", err)
	}
	if got := toFloat(o.Metrics.SpoolBytes); got != 0 {
		t.Errorf("SpoolBytes = %v with the spool empty, want 0", got)
	}
}

// Suppressed is on the wire and in the log line only when it is not zero.
func TestSuppressedField(t *testing.T) {
	plain, summary := record(1), record(2)
	summary.Suppressed = 41
	lines := recordLines(t, plain, summary)
	if len(lines) != 2 {
		t.Fatalf("%d request lines, want 2", len(lines))
	}
	if _, ok := lines[0]["suppressed"]; ok {
		t.Errorf("ordinary record's log line has suppressed: %v", lines[0])
	}
	if got := lines[1]["suppressed"]; got != 41.0 {
		t.Errorf("log line suppressed = %v, want 41", got)
	}
	enc, err := json.Marshal(plain)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(enc), "suppressed") {
		t.Errorf("ordinary record encodes suppressed: %s", enc)
	}
	enc, err = json.Marshal(summary)
	if err != nil {
		t.Fatal(err)
	}
	var back Record
	if err := json.Unmarshal(enc, &back); err != nil || back.Suppressed != 41 {
		t.Errorf("round trip: %v %+v from %s", err, back, enc)
	}
}
