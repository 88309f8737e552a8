package revocation_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/collector"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"github.com/jackc/pgx/v5/pgxpool"
)

const apiKey = "revocation-test-key"

func TestListApplyTellsNewlyRevoked(t *testing.T) {
	l := revocation.NewList()
	var mu sync.Mutex
	var told [][]string
	l.OnRevoke(func(ids []string) {
		// The new set is in force when subscribers hear of it.
		for _, id := range ids {
			if !l.Revoked(id) {
				t.Errorf("told of %q before it is in force", id)
			}
		}
		mu.Lock()
		told = append(told, slices.Sorted(slices.Values(ids)))
		mu.Unlock()
	})
	if l.Revoked("a") || l.Revoked("") || l.Len() != 0 {
		t.Fatal("a new list revokes something")
	}
	if added, removed := l.Apply([]string{"a", "b", "a"}); added != 2 || removed != 0 {
		t.Errorf("first apply: added %d removed %d", added, removed)
	}
	if added, removed := l.Apply([]string{"b", "c"}); added != 1 || removed != 1 {
		t.Errorf("second apply: added %d removed %d", added, removed)
	}
	if l.Revoked("a") || !l.Revoked("b") || !l.Revoked("c") || l.Len() != 2 {
		t.Errorf("after apply: a=%v b=%v c=%v len=%d", l.Revoked("a"), l.Revoked("b"), l.Revoked("c"), l.Len())
	}
	l.Apply([]string{"b", "c"}) // nothing new: nobody is told
	mu.Lock()
	defer mu.Unlock()
	want := [][]string{{"a", "b"}, {"c"}}
	if len(told) != len(want) || !slices.Equal(told[0], want[0]) || !slices.Equal(told[1], want[1]) {
		t.Errorf("subscribers told %v, want %v", told, want)
	}
}

func TestDocumentValidate(t *testing.T) {
	long := strings.Repeat("x", 51)
	for _, c := range []struct {
		name string
		doc  revocation.Document
		ok   bool
	}{
		{"good", revocation.Document{Version: 3, Count: 2, TokenIDs: []string{"a", "session_5"}}, true},
		{"empty list", revocation.Document{Version: 1, Count: 0, TokenIDs: []string{}}, true},
		{"missing ids", revocation.Document{Version: 1}, false},
		{"count mismatch", revocation.Document{Count: 3, TokenIDs: []string{"a"}}, false},
		{"empty id", revocation.Document{Count: 1, TokenIDs: []string{""}}, false},
		{"long id", revocation.Document{Count: 1, TokenIDs: []string{long}}, false},
		{"control char", revocation.Document{Count: 1, TokenIDs: []string{"a\x00b"}}, false},
		{"bad utf-8", revocation.Document{Count: 1, TokenIDs: []string{"a\xffb"}}, false},
	} {
		if err := c.doc.Validate(); (err == nil) != c.ok {
			t.Errorf("%s: Validate() = %v", c.name, err)
		}
	}
}

// backend is a real collector (handler, PostgreSQL) on loopback, with a
// switch that makes it answer with something that is not a list.
type backend struct {
	pool      *pgxpool.Pool
	srv       *httptest.Server
	url       string
	malformed atomic.Value // string: the body to send instead; "" = none
	requests  atomic.Int64
	notMod    atomic.Int64
}

func newBackend(t *testing.T) *backend {
	t.Helper()
	pool, _ := pgtest.NewDB(t)
	if err := collector.Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	b := &backend{pool: pool}
	b.malformed.Store("")
	h := collector.NewHandler(pool, apiKey, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.requests.Add(1)
		if m := b.malformed.Load().(string); m != "" {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, m)
			return
		}
		rec := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		if rec.status == http.StatusNotModified {
			b.notMod.Add(1)
		}
	}))
	t.Cleanup(b.srv.Close)
	b.url = b.srv.URL + revocation.Path
	return b
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) { s.status = code; s.ResponseWriter.WriteHeader(code) }

func (b *backend) revoke(t *testing.T, id string) {
	t.Helper()
	if err := collector.Revoke(context.Background(), b.pool, id, nil, "test"); err != nil {
		t.Fatal(err)
	}
}

func newPoller(url, stateDir string, list *revocation.List, log io.Writer) *revocation.Poller {
	return revocation.NewPoller(revocation.PollerOptions{
		URL: url, APIKey: apiKey, Interval: time.Second, StateDir: stateDir,
		Log: slog.New(slog.NewJSONHandler(log, nil)),
	}, list)
}

func TestPollerAgainstCollector(t *testing.T) {
	b := newBackend(t)
	state := t.TempDir()
	logs := &testutil.SyncBuffer{}
	list := revocation.NewList()
	var newly []string
	list.OnRevoke(func(ids []string) { newly = append(newly, ids...) })
	p := newPoller(b.url, state, list, logs)
	ctx := context.Background()

	// An empty table is an empty list, applied and saved.
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if list.Len() != 0 || p.Version() == 0 {
		t.Fatalf("empty table: len %d version %d", list.Len(), p.Version())
	}

	b.revoke(t, "leaked-1")
	b.revoke(t, "leaked-2")
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if !list.Revoked("leaked-1") || !list.Revoked("leaked-2") || list.Revoked("other") {
		t.Fatalf("list not applied: len %d", list.Len())
	}
	slices.Sort(newly)
	if !slices.Equal(newly, []string{"leaked-1", "leaked-2"}) {
		t.Errorf("subscribers told %v", newly)
	}
	v := p.Version()

	// Unchanged: the poll is conditional and answered 304.
	before := b.notMod.Load()
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if b.notMod.Load() != before+1 || p.Version() != v {
		t.Errorf("unchanged list: 304s %d→%d, version %d→%d", before, b.notMod.Load(), v, p.Version())
	}

	// A malformed answer is ignored (old list kept) and counted.
	for i, bad := range []string{`{"version":9,"count":1,"token_ids":[""]}`, `not json`, `{"version":9,"count":5,"token_ids":["a"]}`} {
		b.malformed.Store(bad)
		if err := p.Poll(ctx); err == nil {
			t.Errorf("malformed answer %q accepted", bad)
		}
		if got := p.Failures(revocation.FailMalformed); got != uint64(i+1) {
			t.Errorf("malformed failures %d, want %d", got, i+1)
		}
		if !list.Revoked("leaked-1") || list.Len() != 2 || p.Version() != v {
			t.Errorf("malformed answer %q changed the list: len %d version %d", bad, list.Len(), p.Version())
		}
	}
	b.malformed.Store("")

	// Server down: the last list stays in force; the failure is counted.
	b.srv.Close()
	if err := p.Poll(ctx); err == nil {
		t.Fatal("poll of a closed server succeeded")
	}
	if p.Failures(revocation.FailUnreachable) != 1 || !list.Revoked("leaked-1") || list.Len() != 2 {
		t.Errorf("server down: unreachable %d, list len %d", p.Failures(revocation.FailUnreachable), list.Len())
	}
	if !strings.Contains(logs.String(), "keeping the revocation list in force") {
		t.Errorf("failure not logged:\n%s", logs.String())
	}

	// Restart with the server still down: the saved list is in force.
	list2 := revocation.NewList()
	p2 := newPoller(b.url, state, list2, io.Discard)
	if err := p2.LoadSaved(); err != nil {
		t.Fatal(err)
	}
	if err := p2.Poll(ctx); err == nil {
		t.Fatal("poll of a closed server succeeded")
	}
	if !list2.Revoked("leaked-1") || !list2.Revoked("leaked-2") || list2.Len() != 2 || p2.Version() != v {
		t.Errorf("restart: saved list not used: len %d version %d", list2.Len(), p2.Version())
	}
	if p2.Age() <= 0 {
		t.Errorf("age of the saved list %v", p2.Age())
	}
}

// The saved list carries its ETag: the first poll after a restart is
// conditional, and a removal made while the node was down is applied.
func TestRestartPollsConditionallyAndAppliesRemovals(t *testing.T) {
	b := newBackend(t)
	state := t.TempDir()
	b.revoke(t, "a")
	b.revoke(t, "b")
	p := newPoller(b.url, state, revocation.NewList(), io.Discard)
	if err := p.Poll(context.Background()); err != nil {
		t.Fatal(err)
	}
	list := revocation.NewList()
	p2 := newPoller(b.url, state, list, io.Discard)
	if err := p2.LoadSaved(); err != nil {
		t.Fatal(err)
	}
	before := b.notMod.Load()
	if err := p2.Poll(context.Background()); err != nil || b.notMod.Load() != before+1 {
		t.Fatalf("first poll after restart: %v, 304s %d→%d", err, before, b.notMod.Load())
	}
	if found, err := collector.Unrevoke(context.Background(), b.pool, "a"); err != nil || !found {
		t.Fatal(found, err)
	}
	if err := p2.Poll(context.Background()); err != nil {
		t.Fatal(err)
	}
	if list.Revoked("a") || !list.Revoked("b") {
		t.Errorf("removal not applied: a=%v b=%v", list.Revoked("a"), list.Revoked("b"))
	}
}

func TestPollerStatusFailuresAndAPIKey(t *testing.T) {
	b := newBackend(t)
	list := revocation.NewList()
	p := revocation.NewPoller(revocation.PollerOptions{URL: b.url, APIKey: "wrong", Interval: time.Second}, list)
	if err := p.Poll(context.Background()); err == nil || p.Failures(revocation.FailStatus) != 1 {
		t.Errorf("wrong API key: %v, status failures %d", err, p.Failures(revocation.FailStatus))
	}
}

// A saved file that is damaged is refused whole and changes nothing.
func TestLoadSavedRefusesDamagedFile(t *testing.T) {
	state := t.TempDir()
	for _, bad := range []string{"{", `{"etag":"x","version":1,"count":1,"token_ids":["a\u0000"]}`} {
		os.WriteFile(filepath.Join(state, revocation.SavedFile), []byte(bad), 0o600)
		list := revocation.NewList()
		p := newPoller("http://127.0.0.1:9/", state, list, io.Discard)
		if err := p.LoadSaved(); err == nil || list.Len() != 0 {
			t.Errorf("damaged saved list %q: err %v, len %d", bad, err, list.Len())
		}
	}
	// No file at all is not an error.
	p := newPoller("http://127.0.0.1:9/", t.TempDir(), revocation.NewList(), io.Discard)
	if err := p.LoadSaved(); err != nil {
		t.Errorf("no saved list: %v", err)
	}
}

// An answer larger than the bound is refused without reading it all.
func TestPollerBoundsTheBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"version":1,"count":1,"token_ids":["`)
		chunk := strings.Repeat("a", 1<<10)
		for range 1 << 12 { // 4 MiB, against a 1 MiB bound
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
		}
		io.WriteString(w, `"]}`)
	}))
	defer srv.Close()
	list := revocation.NewList()
	p := revocation.NewPoller(revocation.PollerOptions{URL: srv.URL, Interval: time.Second, MaxBodyBytes: 1 << 20}, list)
	err := p.Poll(context.Background())
	if err == nil || !strings.Contains(err.Error(), "larger than") || p.Failures(revocation.FailMalformed) != 1 {
		t.Errorf("oversized list: %v, malformed %d", err, p.Failures(revocation.FailMalformed))
	}
}

// A backend that accepts the connection and never answers costs one
// FetchTimeout, not a hung poller: the client's deadline ends it.
func TestPollerTimesOutASilentBackend(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	p := revocation.NewPoller(revocation.PollerOptions{URL: "http://" + ln.Addr().String() + "/", Interval: time.Second}, revocation.NewList())
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p.Poll(ctx); err == nil || p.Failures(revocation.FailUnreachable) != 1 {
		t.Errorf("silent backend: %v", err)
	}
}
