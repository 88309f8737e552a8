package revocation_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/collector"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// told records what OnRevoke subscribers hear.
type told struct {
	mu  sync.Mutex
	ids []string
}

func (t *told) take() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ids := t.ids
	t.ids = nil
	slices.Sort(ids)
	return ids
}

func watch(t *testing.T, l *revocation.List) *told {
	w := &told{}
	l.OnRevoke(func(ids []string) {
		for _, id := range ids {
			if !l.Revoked(id) {
				t.Errorf("told of %q before it is in force", id)
			}
		}
		w.mu.Lock()
		w.ids = append(w.ids, ids...)
		w.mu.Unlock()
	})
	return w
}

func revoked(l *revocation.List, ids ...string) string {
	var out []string
	for _, id := range ids {
		if l.Revoked(id) {
			out = append(out, id)
		}
	}
	return fmt.Sprint(out)
}

// The rules of the union of pushed and polled ids, step by step.
func TestPushAndPollUnion(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	l := revocation.NewListClock(func() time.Time { return now })
	w := watch(t, l)

	l.Apply([]string{"a"})
	w.take()
	// A push is in force at once and told; one already in force is not.
	if added, _ := l.Push([]revocation.Push{{TokenID: "b"}, {TokenID: "a"}, {TokenID: "b"}}); added != 3 {
		t.Errorf("push added %d, want 3 (renewals count)", added)
	}
	if got := w.take(); !slices.Equal(got, []string{"b"}) {
		t.Errorf("told %v after pushing a and b, want [b]", got)
	}
	if got := revoked(l, "a", "b", "c"); got != "[a b]" || l.Len() != 2 || l.Pushed() != 2 {
		t.Errorf("revoked %s len %d pushed %d", got, l.Len(), l.Pushed())
	}

	// The race: a poll that started before a push answers without it.
	// The push stays in force.
	before := l.Mark()
	l.Push([]revocation.Push{{TokenID: "c"}})
	w.take()
	l.ApplyPolled([]string{"a", "b"}, before)
	if got := revoked(l, "a", "b", "c"); got != "[a b c]" {
		t.Errorf("a poll that started before the push of c dropped it: revoked %s", got)
	}
	if l.Pushed() != 1 {
		t.Errorf("pushed %d after the poll settled a and b, want 1 (c)", l.Pushed())
	}
	if got := w.take(); len(got) != 0 {
		t.Errorf("told %v when the poll confirmed ids already in force", got)
	}
	// A poll that started after it settles it: the database is the
	// truth, and here it does not hold c (published, never committed,
	// or removed since).
	l.ApplyPolled([]string{"a", "b"}, l.Mark())
	if got := revoked(l, "a", "b", "c"); got != "[a b]" || l.Pushed() != 0 || l.Len() != 2 {
		t.Errorf("after a poll that started after the push: revoked %s, pushed %d", got, l.Pushed())
	}

	// 304 settles the same way: only pushes before the poll's start.
	before = l.Mark()
	l.Push([]revocation.Push{{TokenID: "d"}})
	l.Confirm(before)
	if !l.Revoked("d") {
		t.Error("a 304 to a poll that started before the push dropped it")
	}
	l.Confirm(l.Mark())
	if l.Revoked("d") {
		t.Error("a 304 to a poll that started after the push kept it")
	}
	w.take()

	// A renewed push counts from its own arrival.
	l.Push([]revocation.Push{{TokenID: "e"}})
	before = l.Mark()
	l.Push([]revocation.Push{{TokenID: "e"}})
	l.ApplyPolled([]string{"a", "b"}, before)
	if !l.Revoked("e") {
		t.Error("a renewed push was settled by a poll that started before the renewal")
	}

	// An end of its own: in force until then, ignored once passed.
	l.Push([]revocation.Push{{TokenID: "f", Until: now.Add(time.Minute)}, {TokenID: "g", Until: now.Add(-time.Second)}})
	if got := revoked(l, "f", "g"); got != "[f]" {
		t.Errorf("with ends: revoked %s, want [f]", got)
	}
	now = now.Add(time.Minute)
	if l.Revoked("f") || l.Len() != 3 {
		t.Errorf("f revoked after its end (len %d)", l.Len())
	}

	// A withdrawal drops the pushed id at once, never a polled one.
	if _, n := l.Push([]revocation.Push{{TokenID: "e", Remove: true}, {TokenID: "a", Remove: true}, {TokenID: "zz", Remove: true}}); n != 1 {
		t.Errorf("withdrew %d, want 1 (e)", n)
	}
	if got := revoked(l, "a", "b", "e"); got != "[a b]" {
		t.Errorf("after withdrawals: revoked %s, want [a b]", got)
	}
	if got := w.take(); !slices.Equal(got, []string{"e", "f"}) {
		t.Errorf("told %v, want [e f]", got)
	}

	// A poll removing an id also pushed since keeps it.
	l.Push([]revocation.Push{{TokenID: "b"}})
	l.ApplyPolled([]string{"a"}, before)
	if !l.Revoked("b") {
		t.Error("a poll that started before b was pushed again dropped it")
	}
	if got := w.take(); len(got) != 0 {
		t.Errorf("told %v for an id that never left", got)
	}
}

// Without a poller pushes accumulate; at MaxPushed more are refused and
// counted, and none in force is dropped to make room.
func TestPushBound(t *testing.T) {
	l := revocation.NewList()
	batch := make([]revocation.Push, 0, 1000)
	for i := 0; i < revocation.MaxPushed; i++ {
		batch = append(batch, revocation.Push{TokenID: fmt.Sprint("id-", i)})
		if len(batch) == cap(batch) {
			l.Push(batch)
			batch = batch[:0]
		}
	}
	l.Push(batch)
	if added, _ := l.Push([]revocation.Push{{TokenID: "one-more"}, {TokenID: "id-0"}}); added != 1 {
		t.Errorf("at the bound: added %d, want 1 (the renewal)", added)
	}
	if l.Revoked("one-more") || !l.Revoked("id-0") || l.PushRefused() != 1 || l.Pushed() != revocation.MaxPushed {
		t.Errorf("at the bound: one-more %v, id-0 %v, refused %d, pushed %d", l.Revoked("one-more"), l.Revoked("id-0"), l.PushRefused(), l.Pushed())
	}
	// A withdrawal makes room.
	l.Push([]revocation.Push{{TokenID: "id-1", Remove: true}, {TokenID: "one-more"}})
	if !l.Revoked("one-more") || l.Revoked("id-1") {
		t.Error("withdrawing one did not make room for one")
	}
}

// The race with a real poll against the collector: the poll reads the
// database before the revocation is committed, the push arrives while its
// answer is on the way, and the answer (without the id) must not un-revoke
// it. The next poll confirms it, and after --remove the one after drops it.
func TestPushSurvivesAPollInFlight(t *testing.T) {
	pool, _ := pgtest.NewDB(t)
	ctx := context.Background()
	if err := collector.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	h := collector.NewHandler(pool, apiKey, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	var gate struct {
		sync.Mutex
		read    chan struct{} // closed once the database was read
		release chan struct{} // the answer leaves when this closes
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		gate.Lock()
		read, release := gate.read, gate.release
		gate.Unlock()
		if read != nil {
			close(read)
			<-release
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
	}))
	defer srv.Close()
	l := revocation.NewList()
	w := watch(t, l)
	p := newPoller(srv.URL+revocation.Path, "", l, io.Discard)
	if err := collector.Revoke(ctx, pool, "old", nil, ""); err != nil {
		t.Fatal(err)
	}
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}

	gate.Lock()
	gate.read, gate.release = make(chan struct{}), make(chan struct{})
	read, release := gate.read, gate.release
	gate.Unlock()
	polled := make(chan error, 1)
	go func() { polled <- p.Poll(ctx) }()
	<-read
	// What pinaka revoke does: commit, then publish.
	if err := collector.Revoke(ctx, pool, "leaked", nil, ""); err != nil {
		t.Fatal(err)
	}
	l.Push([]revocation.Push{{TokenID: "leaked"}})
	gate.Lock()
	gate.read, gate.release = nil, nil
	gate.Unlock()
	close(release)
	if err := <-polled; err != nil {
		t.Fatal(err)
	}
	if got := revoked(l, "old", "leaked"); got != "[old leaked]" {
		t.Fatalf("after a poll that read the database before the revocation: revoked %s", got)
	}
	if l.Pushed() != 1 {
		t.Errorf("pushed %d, want 1: that poll settles nothing", l.Pushed())
	}
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if !l.Revoked("leaked") || l.Pushed() != 0 || l.Len() != 2 {
		t.Errorf("after the confirming poll: leaked %v pushed %d len %d", l.Revoked("leaked"), l.Pushed(), l.Len())
	}
	if got := w.take(); !slices.Equal(got, []string{"leaked", "old"}) {
		t.Errorf("told %v, want each id once", got)
	}
	if found, err := collector.Unrevoke(ctx, pool, "leaked"); err != nil || !found {
		t.Fatal(found, err)
	}
	if err := p.Poll(ctx); err != nil {
		t.Fatal(err)
	}
	if l.Revoked("leaked") || !l.Revoked("old") {
		t.Errorf("after --remove and a poll: leaked %v old %v", l.Revoked("leaked"), l.Revoked("old"))
	}
}
