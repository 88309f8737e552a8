package auth

import (
	"context"
	"crypto"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// jwksServer is a loopback key server whose document and health the test
// changes; it counts the fetches it answers.
type jwksServer struct {
	*httptest.Server
	mu      sync.Mutex
	doc     []byte
	status  int
	fetches atomic.Int32
}

func newJWKSServer(t *testing.T) *jwksServer {
	s := &jwksServer{status: http.StatusOK}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.fetches.Add(1)
		s.mu.Lock()
		doc, status := s.doc, s.status
		s.mu.Unlock()
		w.WriteHeader(status)
		w.Write(doc)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) serve(t *testing.T, status int, pubs ...crypto.PublicKey) {
	t.Helper()
	var keys []PublicKey
	for _, p := range pubs {
		keys = append(keys, PublicKey{ID: kidOf(t, p), Key: p})
	}
	doc, err := MarshalJWKS(keys)
	if err != nil {
		t.Fatal(err)
	}
	s.serveRaw(status, doc)
}

func (s *jwksServer) serveRaw(status int, doc []byte) {
	s.mu.Lock()
	s.doc, s.status = doc, status
	s.mu.Unlock()
}

// fakeClock is a settable clock for the unknown-kid rate limit.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func newRemote(srvURL, stateDir string, v *Verifier, clock *fakeClock) *RemoteKeys {
	r := NewRemoteKeys(RemoteOptions{URL: srvURL, Interval: time.Hour, StateDir: stateDir,
		Apply: v.SetKeys, Now: clock.Now})
	v.OnUnknownKid(r.UnknownKid)
	return r
}

func TestJWKSURLRotationOutageAndRestart(t *testing.T) {
	k := genKeys(t)
	srv := newJWKSServer(t)
	state := t.TempDir()
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	tokA := signH(t, "ES256", k.p256, map[string]any{"kid": kidOf(t, k.p256.Public())}, claims())
	tokB := signH(t, "EdDSA", k.ed, map[string]any{"kid": kidOf(t, k.ed.Public())}, claims())

	v := NewVerifier(nil, "r", 0)
	r := newRemote(srv.URL, state, v, clock)
	srv.serve(t, 200, k.p256.Public())
	if err := r.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(tokA); err != nil {
		t.Fatalf("key A after the first fetch: %v", err)
	}

	// Rotation: the server now publishes B only. B's token names an
	// unknown kid, which asks Run for a refresh; the request itself is
	// refused at once, and B works after the refresh.
	srv.serve(t, 200, k.ed.Public())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan struct{})
	go func() {
		defer close(ran)
		r.Run(ctx)
	}()
	if _, err := v.Verify(tokB); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unknown kid verified before the refresh: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := v.Verify(tokB); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("new kid never accepted after an unknown-kid refresh")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := v.Verify(tokA); !errors.Is(err, ErrInvalid) {
		t.Errorf("removed kid still verifies after the refresh: %v", err)
	}
	// Run's refresh puts the set in force, then saves it: the restart
	// below reads what it saved only once Run is done.
	cancel()
	<-ran

	// Server failing or serving garbage: the last good set stays.
	for _, bad := range []func(){
		func() { srv.serve(t, http.StatusInternalServerError) },
		func() { srv.serveRaw(200, []byte(`{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}`)) },
	} {
		bad()
		if err := r.Refresh(context.Background()); err == nil {
			t.Error("refresh succeeded against a failing server")
		}
		if _, err := v.Verify(tokB); err != nil {
			t.Errorf("last good set lost after a failed refresh: %v", err)
		}
	}
	if r.Failures() != 2 {
		t.Errorf("failures = %d, want 2", r.Failures())
	}

	// Restart while the server is down: the saved set verifies.
	srv.Close()
	v2 := NewVerifier(nil, "r", 0)
	r2 := newRemote(srv.URL, state, v2, clock)
	if err := r2.Load(context.Background()); err != nil {
		t.Fatalf("restart with the server down and a saved set: %v", err)
	}
	if _, err := v2.Verify(tokB); err != nil {
		t.Errorf("saved set does not verify: %v", err)
	}
	// Neither the server nor a saved set: start-up fails, saying why.
	err := newRemote(srv.URL, t.TempDir(), NewVerifier(nil, "r", 0), clock).Load(context.Background())
	if err == nil || !strings.Contains(err.Error(), "no usable saved key set") {
		t.Errorf("start without server or saved set: %v", err)
	}
	err = newRemote(srv.URL, "", NewVerifier(nil, "r", 0), clock).Load(context.Background())
	if err == nil || !strings.Contains(err.Error(), "STATE_DIR") {
		t.Errorf("start without server or STATE_DIR: %v", err)
	}
}

// Unknown kids ask for at most one refresh a minute, and never block.
func TestUnknownKidRefreshIsRateLimited(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	r := NewRemoteKeys(RemoteOptions{URL: "http://127.0.0.1:1/", Interval: time.Hour, Apply: func(*KeySet) {}, Now: clock.Now})
	pending := func() bool {
		select {
		case <-r.kick:
			return true
		default:
			return false
		}
	}
	r.UnknownKid()
	r.UnknownKid() // a second one while the first is pending: no block
	if !pending() {
		t.Fatal("first unknown kid did not ask for a refresh")
	}
	clock.Add(UnknownKidRefreshEvery - time.Second)
	r.UnknownKid()
	if pending() {
		t.Error("refresh asked again within a minute")
	}
	clock.Add(time.Second)
	r.UnknownKid()
	if !pending() {
		t.Error("no refresh asked a minute later")
	}
}

// The saved file is the fetched document, written whole.
func TestJWKSURLSavesTheLastGoodSet(t *testing.T) {
	k := genKeys(t)
	srv := newJWKSServer(t)
	state := t.TempDir()
	srv.serve(t, 200, k.ed.Public())
	r := newRemote(srv.URL, state, NewVerifier(nil, "r", 0), &fakeClock{now: time.Now()})
	if err := r.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	saved, err := LoadKeySet(filepath.Join(state, SavedJWKSFile))
	if err != nil || saved.Len() != 1 || saved.IDs()[0] != kidOf(t, k.ed.Public()) {
		t.Fatalf("saved set: %v, %v", saved.IDs(), err)
	}
	entries, _ := os.ReadDir(state)
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want only %s", len(entries), SavedJWKSFile)
	}
}

func TestMergeKeySetsFirstWins(t *testing.T) {
	k := genKeys(t)
	a := keySet(t, k.p256.Public())
	b := &KeySet{keys: []PublicKey{{ID: a.IDs()[0], Key: k.ed.Public()}, {ID: "b", Key: k.ed.Public()}}}
	m := MergeKeySets(nil, a, b)
	if m.Len() != 2 || m.lookup(a.IDs()[0]).Key != a.keys[0].Key {
		t.Errorf("merged: %v", m.IDs())
	}
	if MergeKeySets(nil, nil) != nil {
		t.Error("merge of nothing is not nil")
	}
}

// A refresh that brings the same document keeps the verifier's cache; a
// changed one replaces the set.
func TestJWKSURLSameDocumentKeepsTheCache(t *testing.T) {
	k := genKeys(t)
	srv := newJWKSServer(t)
	srv.serve(t, 200, k.ed.Public())
	applied := 0
	r := NewRemoteKeys(RemoteOptions{URL: srv.URL, Interval: time.Hour, Apply: func(*KeySet) { applied++ }})
	if err := r.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if applied != 1 {
		t.Errorf("same document applied %d times, want 1", applied)
	}
	srv.serve(t, 200, k.ed.Public(), k.p256.Public())
	if err := r.Refresh(context.Background()); err != nil || applied != 2 || r.Keys().Len() != 2 {
		t.Errorf("changed document: applied %d, %d keys, %v", applied, r.Keys().Len(), err)
	}
}
