package auth

import (
	"bytes"
	"context"
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

// UnknownKidRefreshEvery bounds the refreshes that tokens with an unknown
// kid can cause: anyone can send such a token, and each would otherwise be
// a request to the key server.
const UnknownKidRefreshEvery = time.Minute

// jwksFetchTimeout bounds one fetch. Requests never wait on it: a fetch
// runs at start or in the refresh goroutine.
const jwksFetchTimeout = 10 * time.Second

// SavedJWKSFile is the name of the last good key set under STATE_DIR.
const SavedJWKSFile = "jwks.json"

// RemoteOptions configure RemoteKeys.
type RemoteOptions struct {
	URL      string
	Interval time.Duration // between scheduled refreshes
	StateDir string        // where the last good set is saved; "" = nowhere
	Client   *http.Client  // nil: a client with jwksFetchTimeout
	Log      *slog.Logger
	// Apply receives every new set (it is never called with nil).
	Apply func(*KeySet)
	Now   func() time.Time // nil: time.Now
}

// RemoteKeys keeps the key set published at a JWKS URL: fetched at start,
// refreshed on a schedule and when a token names an unknown kid, the last
// good set kept (and saved) when the URL fails or serves something that
// does not parse.
type RemoteKeys struct {
	o        RemoteOptions
	kick     chan struct{}
	mu       sync.Mutex
	lastKick time.Time

	set       atomic.Pointer[KeySet]
	acceptMu  sync.Mutex   // orders accepts (Run's and a direct Refresh)
	lastRaw   []byte       // the document behind set
	updatedAt atomic.Int64 // unix nanoseconds the current set was fetched
	failures  atomic.Uint64
}

// NewRemoteKeys returns a RemoteKeys; nothing is fetched until Load.
func NewRemoteKeys(o RemoteOptions) *RemoteKeys {
	if o.Client == nil {
		o.Client = &http.Client{Timeout: jwksFetchTimeout}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &RemoteKeys{o: o, kick: make(chan struct{}, 1)}
}

func (r *RemoteKeys) savePath() string {
	if r.o.StateDir == "" {
		return ""
	}
	return filepath.Join(r.o.StateDir, SavedJWKSFile)
}

// Load fetches the set at start. If the URL fails, the set saved by an
// earlier run is used, so that a restart during a key-server outage still
// verifies; with neither it is an error and the proxy does not start.
func (r *RemoteKeys) Load(ctx context.Context) error {
	raw, ks, err := r.fetch(ctx)
	if err == nil {
		r.accept(raw, ks)
		return nil
	}
	path := r.savePath()
	if path == "" {
		return fmt.Errorf("fetching %s: %w (and no STATE_DIR with a saved key set)", r.o.URL, err)
	}
	saved, serr := LoadKeySet(path)
	if serr != nil {
		return fmt.Errorf("fetching %s: %w (and no usable saved key set: %v)", r.o.URL, err, serr)
	}
	r.failures.Add(1)
	at := r.o.Now()
	if st, err := os.Stat(path); err == nil {
		at = st.ModTime()
	}
	r.set.Store(saved)
	r.updatedAt.Store(at.UnixNano())
	r.o.Apply(saved)
	r.o.Log.Warn("JWKS_URL unreachable at start; using the saved key set", "err", err,
		"saved", path, "kids", saved.IDs())
	return nil
}

// Refresh fetches once. On failure the current set stays and the failure
// is counted and logged.
func (r *RemoteKeys) Refresh(ctx context.Context) error {
	raw, ks, err := r.fetch(ctx)
	if err != nil {
		r.failures.Add(1)
		r.o.Log.Error("JWKS_URL refresh failed; keeping the current keys", "err", err,
			"kids", r.set.Load().IDs())
		return err
	}
	r.accept(raw, ks)
	return nil
}

// Run refreshes every Interval and when UnknownKid asks, until ctx ends.
func (r *RemoteKeys) Run(ctx context.Context) {
	t := time.NewTicker(r.o.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.kick:
		}
		_ = r.Refresh(ctx)
	}
}

// UnknownKid asks Run for a refresh, at most once per
// UnknownKidRefreshEvery. It never blocks: the token that triggered it is
// refused now, and works once the refresh has brought its key.
func (r *RemoteKeys) UnknownKid() {
	r.mu.Lock()
	now := r.o.Now()
	if !r.lastKick.IsZero() && now.Sub(r.lastKick) < UnknownKidRefreshEvery {
		r.mu.Unlock()
		return
	}
	r.lastKick = now
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Keys is the current set (nil before Load).
func (r *RemoteKeys) Keys() *KeySet { return r.set.Load() }

// Age is how old the current set is (since it was fetched).
func (r *RemoteKeys) Age() time.Duration {
	at := r.updatedAt.Load()
	if at == 0 {
		return 0
	}
	return r.o.Now().Sub(time.Unix(0, at))
}

// Failures counts fetches that failed or served a set that did not parse.
func (r *RemoteKeys) Failures() uint64 { return r.failures.Load() }

func (r *RemoteKeys) fetch(ctx context.Context) ([]byte, *KeySet, error) {
	ctx, cancel := context.WithTimeout(ctx, jwksFetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.o.URL, nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "application/jwk-set+json, application/json")
	resp, err := r.o.Client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("status %s", resp.Status)
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(resp.Body, maxKeySetBytes+1)); err != nil {
		return nil, nil, fmt.Errorf("reading the key set: %w", err)
	}
	if buf.Len() > maxKeySetBytes {
		return nil, nil, fmt.Errorf("key set larger than %d bytes", maxKeySetBytes)
	}
	ks, err := ParseKeySet(buf.Bytes())
	if err != nil {
		return nil, nil, fmt.Errorf("parsing the key set: %w", err)
	}
	return buf.Bytes(), ks, nil
}

func (r *RemoteKeys) accept(raw []byte, ks *KeySet) {
	r.acceptMu.Lock()
	defer r.acceptMu.Unlock()
	r.updatedAt.Store(r.o.Now().UnixNano())
	// The same document again (the usual refresh) changes nothing: Apply
	// would empty the verifier's cache for no reason.
	if r.lastRaw != nil && bytes.Equal(raw, r.lastRaw) {
		return
	}
	r.lastRaw = raw
	r.set.Store(ks)
	r.o.Apply(ks)
	r.o.Log.Info("JWKS_URL key set loaded", "kids", ks.IDs())
	if path := r.savePath(); path != "" {
		if err := atomicfile.Write(filepath.Dir(path), filepath.Base(path), raw); err != nil {
			r.o.Log.Warn("saving the key set under STATE_DIR failed", "err", err)
		}
	}
}

// MergeKeySets joins sets in order; a kid already taken by an earlier set
// is skipped, so a file the operator controls wins over a URL.
func MergeKeySets(sets ...*KeySet) *KeySet {
	out := &KeySet{}
	seen := map[string]bool{}
	for _, s := range sets {
		if s == nil {
			continue
		}
		for _, k := range s.keys {
			if !seen[k.ID] {
				seen[k.ID] = true
				out.keys = append(out.keys, k)
			}
		}
	}
	if len(out.keys) == 0 {
		return nil
	}
	return out
}
