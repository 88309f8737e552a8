package accesslog

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/atomicfile"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// errFull means a parking bound (LOG_SPOOL_MAX_BYTES or the in-memory
// bound) would be exceeded.
var errFull = errors.New("bound reached")

// errStuck means the only spool files left could not be read or moved
// aside; they are retried later.
var errStuck = errors.New("spool files unreadable")

// parking holds batches that could not be delivered yet, for the redelivery
// loop to take oldest first. It is the disk spool when LOG_SPOOL_DIR is set
// and a bounded in-memory list otherwise.
type parking interface {
	put(b *batch) error
	oldest() (*batch, error) // nil, nil when empty
	remove(b *batch) error
	durable() bool // survives a restart
	bytes() int64
}

// DeadLetterFile is the file in LOG_SPOOL_DIR that keeps batches the backend
// rejected as invalid, one JSON object per line.
const DeadLetterFile = "deadletter.jsonl"

const spoolExt = ".json"

// spool is the disk spool: one file per batch, named <batch_id>.json, plus
// the dead-letter file. Files are written atomically (temp file, fsync,
// rename, fsync of the directory) so a crash leaves either the whole batch or
// nothing. max bounds every byte the spool keeps, dead letters included, so a
// backend rejecting everything cannot fill the disk.
type spool struct {
	dir string
	max int64
	log func(msg string, args ...any)
	m   *metrics.Metrics
	// retry is how long a file that could be neither read nor moved aside
	// is skipped before it is tried again.
	retry   time.Duration
	publish func(total int64) // called under mu whenever total changes

	mu    sync.Mutex
	names []string // spool files, sorted: UUIDv7 names sort oldest first
	sizes map[string]int64
	stuck map[string]time.Time // unreadable files kept in names, and when to try them again
	total int64                // spool files + dead-letter file
}

// openSpool creates dir if needed and indexes what a previous process left.
func openSpool(dir string, max int64, retry time.Duration, m *metrics.Metrics, publish func(int64), logf func(string, ...any)) (*spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating spool directory %s: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading spool directory %s: %w", dir, err)
	}
	s := &spool{dir: dir, max: max, log: logf, m: m, retry: retry, publish: publish,
		sizes: map[string]int64{}, stuck: map[string]time.Time{}}
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() {
			continue
		}
		switch {
		case strings.HasSuffix(name, ".tmp"):
			// A write interrupted by a crash; the batch was still in memory
			// and is lost with the process, but never half-delivered.
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				return nil, fmt.Errorf("removing stale spool temp file: %w", err)
			}
		case strings.HasSuffix(name, spoolExt) || name == DeadLetterFile:
			info, err := e.Info()
			if err != nil {
				return nil, fmt.Errorf("reading spool directory %s: %w", dir, err)
			}
			s.total += info.Size()
			if name != DeadLetterFile {
				s.names = append(s.names, name)
				s.sizes[name] = info.Size()
			}
		}
	}
	slices.Sort(s.names)
	s.publish(s.total)
	s.publishOldest()
	return s, nil
}

func (s *spool) durable() bool { return true }

func (s *spool) bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.total
}

func (s *spool) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.names)
}

func (s *spool) reserve(n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.total+n > s.max {
		return fmt.Errorf("spool %s holds %d bytes, LOG_SPOOL_MAX_BYTES is %d: %w", s.dir, s.total, s.max, errFull)
	}
	s.total += n
	s.publish(s.total)
	return nil
}

func (s *spool) release(n int64) {
	s.mu.Lock()
	s.total -= n
	s.publish(s.total)
	s.mu.Unlock()
}

func (s *spool) put(b *batch) error {
	n := int64(len(b.body))
	if err := s.reserve(n); err != nil {
		return err
	}
	name := b.id + spoolExt
	if err := atomicfile.Write(s.dir, name, b.body); err != nil {
		if !errors.Is(err, atomicfile.ErrDirSync) {
			s.release(n)
			return err
		}
		// The file is in place, only the directory entry may not survive
		// a crash: keep it indexed (it will be delivered), and say so.
		s.log("spool directory fsync failed; batch kept but may not survive a crash", "batch_id", b.id, "error", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.sizes[name]; dup { // put twice: the file was replaced
		s.total -= s.sizes[name]
		s.publish(s.total)
	} else {
		i, _ := slices.BinarySearch(s.names, name)
		s.names = slices.Insert(s.names, i, name)
		s.publishOldest()
	}
	s.sizes[name] = n
	return nil
}

// oldest reads the oldest spool file. A file that cannot be shipped — it
// does not decode (written by something else, damaged on disk) or cannot be
// read — is set aside so it cannot block the spool forever.
func (s *spool) oldest() (*batch, error) {
	for {
		name, ok := s.next()
		if !ok {
			s.mu.Lock()
			n := len(s.stuck)
			s.mu.Unlock()
			if n > 0 {
				return nil, fmt.Errorf("%d spool files in %s can be neither read nor moved aside: %w", n, s.dir, errStuck)
			}
			return nil, nil
		}

		path := filepath.Join(s.dir, name)
		body, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			// Removed behind our back (another process sharing the
			// directory delivered it): nothing to send.
			s.forget(name)
			continue
		}
		if err != nil {
			s.setAside(name, ".unreadable", "unreadable", "spool file unreadable; moved aside and skipped", err)
			continue
		}
		b, err := decodeBatch(body)
		if err == nil {
			s.mu.Lock()
			delete(s.stuck, name)
			s.mu.Unlock()
			return b, nil
		}
		s.setAside(name, ".corrupt", "corrupt", "spool file does not hold a batch; moved aside", err)
	}
}

// next is the oldest spool file not waiting out a failed read.
func (s *spool) next() (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for _, name := range s.names {
		if t, ok := s.stuck[name]; !ok || !now.Before(t) {
			return name, true
		}
	}
	return "", false
}

// setAside renames a spool file that cannot be shipped to name+suffix, out
// of the spool, and counts it; its records stay on disk for an operator.
// If even the rename fails, the file is kept — still indexed, its bytes
// still counted against LOG_SPOOL_MAX_BYTES and in the gauge — and tried
// again after s.retry: forgetting it would lose its records from shipping
// without a trace until the next restart.
func (s *spool) setAside(name, suffix, reason, msg string, cause error) {
	path := filepath.Join(s.dir, name)
	if err := os.Rename(path, path+suffix); err != nil {
		s.m.SpoolReadErrors.Inc()
		s.log("spool file can be neither read nor moved aside; kept, retrying later",
			"file", path, "error", cause, "rename_error", err, "retry_in", s.retry.String())
		s.mu.Lock()
		s.stuck[name] = time.Now().Add(s.retry)
		s.mu.Unlock()
		return
	}
	s.log(msg, "file", path, "moved_to", path+suffix, "error", cause)
	// Forgotten before it is counted, so a reader who sees the count sees
	// the gauge without the file.
	s.forget(name)
	s.m.SpoolFilesSetAside.WithLabelValues(reason).Inc()
}

func (s *spool) remove(b *batch) error {
	name := b.id + spoolExt
	if err := os.Remove(filepath.Join(s.dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing delivered spool file: %w", err)
	}
	s.forget(name)
	return nil
}

func (s *spool) forget(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i, ok := slices.BinarySearch(s.names, name); ok {
		s.names = slices.Delete(s.names, i, i+1)
		s.publishOldest()
	}
	s.total -= s.sizes[name]
	delete(s.sizes, name)
	delete(s.stuck, name)
	s.publish(s.total)
}

// deadLetter is one line of the dead-letter file.
type deadLetter struct {
	FailedAt time.Time       `json:"failed_at"`
	BatchID  string          `json:"batch_id"`
	Status   int             `json:"status"`
	Response string          `json:"response"`
	Batch    json.RawMessage `json:"batch"`
}

// putDeadLetter appends a rejected batch to the dead-letter file and fsyncs
// it: an operator can fix the cause and replay the "batch" objects.
func (s *spool) putDeadLetter(b *batch, cause error) error {
	entry := deadLetter{FailedAt: time.Now().UTC(), BatchID: b.id, Batch: b.body}
	var se *StatusError
	if errors.As(cause, &se) {
		entry.Status, entry.Response = se.Code, se.Body
	}
	line, err := json.Marshal(entry)
	if err != nil {
		return fmt.Errorf("encoding dead letter: %w", err)
	}
	line = append(line, '\n')
	if err := s.reserve(int64(len(line))); err != nil {
		return err
	}
	if err := appendSync(filepath.Join(s.dir, DeadLetterFile), line); err != nil {
		s.release(int64(len(line)))
		return err
	}
	return nil
}

func appendSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("opening dead-letter file: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing dead-letter file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing dead-letter file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("closing dead-letter file: %w", err)
	}
	// The first append creates the file; its directory entry must be
	// durable too.
	if err := atomicfile.SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("syncing dead-letter directory: %w", err)
	}
	return nil
}

// memPark keeps undelivered batches in memory when there is no spool
// directory, up to max bytes of encoded batches.
type memPark struct {
	max     int64
	publish func(total int64) // called under mu whenever total changes

	mu      sync.Mutex
	batches []*batch
	total   int64
}

func (m *memPark) durable() bool { return false }

func (m *memPark) bytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.total
}

func (m *memPark) put(b *batch) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := int64(len(b.body))
	if m.total+n > m.max {
		return fmt.Errorf("%d bytes of undelivered batches held in memory (no LOG_SPOOL_DIR), bound is %d: %w", m.total, m.max, errFull)
	}
	m.batches = append(m.batches, b)
	m.total += n
	m.publish(m.total)
	return nil
}

func (m *memPark) oldest() (*batch, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.batches) == 0 {
		return nil, nil
	}
	return m.batches[0], nil
}

func (m *memPark) remove(b *batch) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if i := slices.Index(m.batches, b); i >= 0 {
		m.batches = slices.Delete(m.batches, i, i+1)
		m.total -= int64(len(b.body))
		m.publish(m.total)
	}
	return nil
}

// takeAll empties the list, for the final report at shutdown.
func (m *memPark) takeAll() []*batch {
	m.mu.Lock()
	defer m.mu.Unlock()
	all := m.batches
	m.batches, m.total = nil, 0
	m.publish(0)
	return all
}
