package revocation

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/atomicfile"
)

// SavedFile is the name of the last good list under STATE_DIR.
const SavedFile = "revocations.json"

// FetchTimeout bounds one fetch, connection to last byte. Requests never
// wait on a fetch: it runs at start and in the poll goroutine.
const FetchTimeout = 10 * time.Second

// failureLogEvery bounds the log lines of a backend that stays down: the
// first failure is logged at once, later ones at most this often (with
// how many were not logged); every failure is counted.
const failureLogEvery = time.Minute

// Failure reasons, the label values of the failure counter.
const (
	FailUnreachable = "unreachable" // no answer: connection, timeout, TLS
	FailStatus      = "status"      // an answer other than 200 or 304
	FailMalformed   = "malformed"   // a 200 whose body is not a valid list
)

var failReasons = []string{FailUnreachable, FailStatus, FailMalformed}

// PollerOptions configure a Poller.
type PollerOptions struct {
	URL      string
	APIKey   string        // sent as a bearer token when set (BACKEND_API_KEY)
	Interval time.Duration // between fetches
	StateDir string        // where the last good list is saved; "" = nowhere
	Client   *http.Client  // nil: no redirects, FetchTimeout
	Log      *slog.Logger
	Now      func() time.Time // nil: time.Now
	// MaxBodyBytes bounds an answer; 0 means MaxBodyBytes (tests lower it).
	MaxBodyBytes int64
}

// Poller keeps a List equal to the list published at a URL: fetched with
// If-None-Match every Interval, the last good one saved under STATE_DIR and
// loaded from there at start, so that the revocations in force survive a
// backend outage and a restart during one. A failed fetch or a malformed
// answer changes nothing: the list in force stays, the failure is counted
// and logged.
type Poller struct {
	o    PollerOptions
	list *List

	mu      sync.Mutex // one fetch at a time; guards etag
	etag    string
	version atomic.Int64
	// at is when the list in force was last confirmed (fetched, answered
	// 304, or saved by an earlier run), unix nanoseconds; 0 = never.
	at      atomic.Int64
	started time.Time

	failures map[string]*atomic.Uint64

	logMu      sync.Mutex
	failing    bool
	lastLogged time.Time
	unlogged   int
}

// NewPoller returns a Poller applying to list; nothing is read or fetched
// until LoadSaved, Poll or Run.
func NewPoller(o PollerOptions, list *List) *Poller {
	if o.Client == nil {
		o.Client = &http.Client{
			Timeout: FetchTimeout,
			// A moved endpoint is a configuration change, and a redirect
			// must not carry the API key elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = MaxBodyBytes
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	p := &Poller{o: o, list: list, started: o.Now(), failures: map[string]*atomic.Uint64{}}
	for _, r := range failReasons {
		p.failures[r] = new(atomic.Uint64)
	}
	return p
}

// List is the list the poller applies to.
func (p *Poller) List() *List { return p.list }

func (p *Poller) savePath() string {
	if p.o.StateDir == "" {
		return ""
	}
	return filepath.Join(p.o.StateDir, SavedFile)
}

// saved is the file under STATE_DIR: the document and its ETag, so the
// first fetch after a restart can be conditional. Its modification time is
// when the list was last confirmed.
type saved struct {
	ETag string `json:"etag"`
	Document
}

// LoadSaved applies the list an earlier run saved, if any. A missing file
// is not an error; one that cannot be read or does not validate is
// reported (the caller logs it) and changes nothing.
func (p *Poller) LoadSaved() error {
	path := p.savePath()
	if path == "" {
		return nil
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the saved revocation list: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("reading the saved revocation list: %w", err)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxBodyBytes+1))
	if err != nil {
		return fmt.Errorf("reading the saved revocation list: %w", err)
	}
	if len(b) > MaxBodyBytes {
		return fmt.Errorf("saved revocation list %s is larger than %d bytes", path, MaxBodyBytes)
	}
	var s saved
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("saved revocation list %s: %w", path, err)
	}
	if err := s.Validate(); err != nil {
		return fmt.Errorf("saved revocation list %s: %w", path, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.list.Apply(s.TokenIDs)
	p.etag = s.ETag
	p.version.Store(s.Version)
	p.at.Store(st.ModTime().UnixNano())
	p.o.Log.Info("revocation list loaded from STATE_DIR", "path", path, "version", s.Version,
		"count", s.Count, "saved_at", st.ModTime().UTC())
	return nil
}

// Poll fetches once. A new list is applied and saved; 304 confirms the
// one in force. On failure the list in force stays, and the failure is
// counted, logged (rate-limited) and returned.
func (p *Poller) Poll(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	// Pushes that arrived before the fetch starts are settled by its
	// answer; later ones are not (List).
	mark := p.list.Mark()
	doc, etag, err := p.fetch(ctx)
	if err != nil {
		var fe *fetchError
		reason := FailUnreachable
		if errors.As(err, &fe) {
			reason = fe.reason
		}
		p.failures[reason].Add(1)
		p.logFailure(err, reason)
		return err
	}
	now := p.o.Now()
	p.at.Store(now.UnixNano())
	p.logRecovery()
	path := p.savePath()
	if doc == nil { // 304: unchanged
		p.list.Confirm(mark)
		if path != "" {
			// The saved list's time is its age after a restart.
			_ = os.Chtimes(path, now, now)
		}
		return nil
	}
	added, removed := p.list.ApplyPolled(doc.TokenIDs, mark)
	p.etag = etag
	prev := p.version.Swap(doc.Version)
	if added > 0 || removed > 0 || prev != doc.Version {
		p.o.Log.Info("revocation list updated", "version", doc.Version, "count", doc.Count,
			"added", added, "removed", removed)
	}
	if path != "" {
		b, err := json.Marshal(saved{ETag: etag, Document: *doc})
		if err == nil {
			err = atomicfile.Write(filepath.Dir(path), filepath.Base(path), b)
		}
		if err != nil {
			p.o.Log.Warn("saving the revocation list under STATE_DIR failed", "err", err)
		}
	}
	return nil
}

// Run polls every Interval until ctx ends (the first poll is the
// caller's, at start).
func (p *Poller) Run(ctx context.Context) {
	t := time.NewTicker(p.o.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_ = p.Poll(ctx)
	}
}

// Age is how long ago the list in force was last confirmed by the backend
// (for a list loaded from STATE_DIR: when it was saved or last confirmed);
// with no list ever confirmed, how long the poller has existed.
func (p *Poller) Age() time.Duration {
	at := p.at.Load()
	if at == 0 {
		return p.o.Now().Sub(p.started)
	}
	return p.o.Now().Sub(time.Unix(0, at))
}

// Version is the version of the list in force (0 before any).
func (p *Poller) Version() int64 { return p.version.Load() }

// Failures counts failed fetches for reason (FailUnreachable, FailStatus,
// FailMalformed).
func (p *Poller) Failures(reason string) uint64 {
	if c, ok := p.failures[reason]; ok {
		return c.Load()
	}
	return 0
}

// FailureReasons are the values Failures accepts, for metric labels.
func FailureReasons() []string { return append([]string(nil), failReasons...) }

type fetchError struct {
	reason string
	err    error
}

func (e *fetchError) Error() string { return e.err.Error() }
func (e *fetchError) Unwrap() error { return e.err }

// fetch GETs the list: doc is nil on 304.
func (p *Poller) fetch(ctx context.Context) (doc *Document, etag string, err error) {
	ctx, cancel := context.WithTimeout(ctx, FetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.o.URL, nil)
	if err != nil {
		return nil, "", &fetchError{FailUnreachable, err}
	}
	req.Header.Set("Accept", "application/json")
	if p.o.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+p.o.APIKey)
	}
	if p.etag != "" {
		req.Header.Set("If-None-Match", p.etag)
	}
	resp, err := p.o.Client.Do(req)
	if err != nil {
		return nil, "", &fetchError{FailUnreachable, err}
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNotModified:
		return nil, "", nil
	case http.StatusOK:
	default:
		// A little of the body says why (the collector answers JSON).
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
		return nil, "", &fetchError{FailStatus, fmt.Errorf("status %s: %q", resp.Status, bytes.TrimSpace(msg))}
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(resp.Body, p.o.MaxBodyBytes+1)); err != nil {
		return nil, "", &fetchError{FailUnreachable, fmt.Errorf("reading the list: %w", err)}
	}
	if int64(buf.Len()) > p.o.MaxBodyBytes {
		return nil, "", &fetchError{FailMalformed, fmt.Errorf("list larger than %d bytes", p.o.MaxBodyBytes)}
	}
	var d Document
	if err := json.Unmarshal(buf.Bytes(), &d); err != nil {
		return nil, "", &fetchError{FailMalformed, fmt.Errorf("parsing the list: %w", err)}
	}
	if err := d.Validate(); err != nil {
		return nil, "", &fetchError{FailMalformed, fmt.Errorf("invalid list: %w", err)}
	}
	return &d, resp.Header.Get("ETag"), nil
}

func (p *Poller) logFailure(err error, reason string) {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	now := p.o.Now()
	if p.failing && now.Sub(p.lastLogged) < failureLogEvery {
		p.unlogged++
		return
	}
	p.o.Log.Error("REVOCATION_URL fetch failed; keeping the revocation list in force", "err", err,
		"reason", reason, "count", p.list.Len(), "version", p.version.Load(),
		"failures_not_logged", p.unlogged)
	p.failing, p.lastLogged, p.unlogged = true, now, 0
}

func (p *Poller) logRecovery() {
	p.logMu.Lock()
	defer p.logMu.Unlock()
	if p.failing {
		p.o.Log.Info("REVOCATION_URL fetch works again", "failures_not_logged", p.unlogged)
	}
	p.failing, p.unlogged = false, 0
}
