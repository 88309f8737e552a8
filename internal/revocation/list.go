// Package revocation keeps the set of revoked token ids a node enforces: a
// List the proxy reads on every request, and a Poller that fetches the
// collector's list (GET Path), saves the last good one under STATE_DIR and
// applies it. A faster source (the fleet's Redis channel) puts ids in
// force ahead of the poll through Push.
package revocation

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// Path is the collector's endpoint for the revoked token ids.
const Path = "/api/forward-proxy/revocations"

// MaxEntries bounds a list: the collector refuses to serve more, a node
// refuses to apply more. A million ids of up to 50 bytes is a 64 MiB
// document at worst and about 100 MB of map on a node; a fleet revoking
// more than that should shorten token lifetimes instead.
const MaxEntries = 1_000_000

// MaxBodyBytes bounds a list document on the wire and on disk.
const MaxBodyBytes = 64 << 20

// Document is the body of GET Path and the content of the saved list.
// Version grows with every change of the collector's table (entries that
// expire change the list without a new version: the ETag covers both).
type Document struct {
	Version  int64    `json:"version"`
	Count    int      `json:"count"`
	TokenIDs []string `json:"token_ids"`
}

// Validate says why d cannot be applied, or returns nil: a list that is
// not what the collector sends is ignored whole, never applied in part.
func (d *Document) Validate() error {
	if d.TokenIDs == nil {
		return errors.New("missing token_ids")
	}
	if d.Count != len(d.TokenIDs) {
		return fmt.Errorf("count %d does not match the %d token_ids", d.Count, len(d.TokenIDs))
	}
	if len(d.TokenIDs) > MaxEntries {
		return fmt.Errorf("%d token_ids, more than the %d allowed", len(d.TokenIDs), MaxEntries)
	}
	for i, id := range d.TokenIDs {
		if err := CheckTokenID(id); err != nil {
			return fmt.Errorf("token_ids[%d]: %w", i, err)
		}
	}
	return nil
}

// CheckTokenID applies the proxy's token_id rules (auth.CheckID) and
// refuses the empty id, which no token carries.
func CheckTokenID(id string) error {
	if id == "" {
		return errors.New("token_id is empty")
	}
	return auth.CheckID("token_id", id)
}

// MaxPushed bounds the ids pushed and not yet settled by a poll (see
// List.Push). With a poller they are settled every REVOCATION_INTERVAL, so
// only a burst of revocations between two polls counts; without one they
// stay until their own end or their withdrawal. 100,000 ids are about
// 10 MB.
const MaxPushed = 100_000

// List is the set of revoked token ids in force: the polled set (the
// collector's list, replaced whole by Apply and ApplyPolled) united with
// the pushed set (ids announced through a faster channel, Push). Revoked
// is one atomic load and one map read per set: both sets are immutable and
// replaced whole, and the pushed one is usually empty.
//
// The rules of the union, which keep a push from being lost to a poll that
// was already under way when it arrived:
//
//   - A pushed id is in force from its arrival until a poll that started
//     after it arrived has succeeded (200 or 304). That poll read the
//     database after the push was published, which is after the revocation
//     was committed, so from then on the polled set says the truth about the
//     id: in it, it stays revoked; not in it (removed since, or never
//     committed), it is not. A poll that started before the push settles
//     nothing about it, whatever it returns.
//   - A push with an end (--until) is in force until then at the latest.
//   - A pushed withdrawal (--remove) drops the pushed id at once; an id also
//     in the polled set stays revoked until a poll drops it.
//   - Without a poller nothing settles pushes: they stay until their end or
//     their withdrawal, at most MaxPushed of them (more are refused and
//     counted: an id already in force is never dropped to make room).
type List struct {
	set    atomic.Pointer[map[string]struct{}] // the polled set
	pushed atomic.Pointer[map[string]pushEntry]

	mu   sync.Mutex // orders updates and their notifications
	subs []func(tokenIDs []string)
	seq  uint64 // pushes so far; a poll's Mark is the value at its start

	now         func() time.Time
	pushRefused atomic.Uint64
}

// pushEntry is one pushed id: the push that put it in force and its end.
type pushEntry struct {
	seq   uint64
	until int64 // unix nanoseconds; 0: no end of its own
}

// live reports whether e is still in force at now (unix nanoseconds).
func (e pushEntry) live(now int64) bool { return e.until == 0 || now < e.until }

// Push is one revocation announced ahead of the poll (pinaka revoke
// publishing on the fleet's Redis channel).
type Push struct {
	TokenID string
	Until   time.Time // zero: no end of its own
	Remove  bool      // the revocation was withdrawn (pinaka revoke --remove)
}

// NewList returns an empty List.
func NewList() *List { return NewListClock(time.Now) }

// NewListClock returns an empty List that reads the time (for the ends of
// pushed ids) from now.
func NewListClock(now func() time.Time) *List {
	l := &List{now: now}
	empty := map[string]struct{}{}
	l.set.Store(&empty)
	pushed := map[string]pushEntry{}
	l.pushed.Store(&pushed)
	return l
}

// Revoked reports whether tokenID is revoked. The empty id never is.
func (l *List) Revoked(tokenID string) bool {
	if tokenID == "" {
		return false
	}
	if _, ok := (*l.set.Load())[tokenID]; ok {
		return true
	}
	p := *l.pushed.Load()
	if len(p) == 0 {
		return false
	}
	e, ok := p[tokenID]
	return ok && (e.until == 0 || l.now().UnixNano() < e.until)
}

// Len is the number of revoked ids in force.
func (l *List) Len() int {
	set, now := *l.set.Load(), l.now().UnixNano()
	n := len(set)
	for id, e := range *l.pushed.Load() {
		if _, ok := set[id]; !ok && e.live(now) {
			n++
		}
	}
	return n
}

// Pushed is the number of pushed ids in force that no poll has settled
// yet (those also in the polled set included).
func (l *List) Pushed() int {
	now, n := l.now().UnixNano(), 0
	for _, e := range *l.pushed.Load() {
		if e.live(now) {
			n++
		}
	}
	return n
}

// PushRefused counts pushed ids refused because MaxPushed were in force.
func (l *List) PushRefused() uint64 { return l.pushRefused.Load() }

// OnRevoke registers f to be told the ids each update newly revokes, after
// they are in force: a request that checks Revoked after f ran sees them,
// one that checked before is closed by f. f runs on the caller of the
// update and must not update the list.
func (l *List) OnRevoke(f func(tokenIDs []string)) {
	l.mu.Lock()
	l.subs = append(l.subs, f)
	l.mu.Unlock()
}

// Mark is the number of pushes so far. A poller takes it before it
// fetches and hands it to ApplyPolled or Confirm, which settle the pushes
// up to it.
func (l *List) Mark() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// Apply puts ids in force as the polled set in place of the current one,
// settling no push (a list loaded from STATE_DIR, or any source that did
// not start after the pushes in force). See ApplyPolled.
func (l *List) Apply(ids []string) (added, removed int) { return l.ApplyPolled(ids, 0) }

// ApplyPolled puts ids in force as the polled set, fetched by a poll that
// started at mark (Mark): pushes up to mark are settled (dropped from the
// pushed set; the ids stay revoked if ids holds them), later ones stay. It
// tells OnRevoke subscribers which ids were not in force before, and
// returns how many ids the polled set gained and lost. ids must be valid
// (Document.Validate); duplicates are fine.
func (l *List) ApplyPolled(ids []string, mark uint64) (added, removed int) {
	next := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		next[id] = struct{}{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now().UnixNano()
	prev, pushed := *l.set.Load(), *l.pushed.Load()
	var fresh []string
	for id := range next {
		if _, ok := prev[id]; ok {
			continue
		}
		added++
		if e, ok := pushed[id]; !ok || !e.live(now) {
			fresh = append(fresh, id)
		}
	}
	removed = len(prev) - (len(next) - added)
	// The new polled set first, then the pushed one without the settled
	// ids: an id moving from one to the other is never out of both.
	l.set.Store(&next)
	l.settle(pushed, mark, now)
	l.notify(fresh)
	return added, removed
}

// Confirm settles the pushes up to mark after a poll that started at mark
// found the polled set unchanged (304).
func (l *List) Confirm(mark uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.settle(*l.pushed.Load(), mark, l.now().UnixNano())
}

// settle replaces the pushed set with pushed less the entries settled by
// mark and those past their end. The caller holds l.mu.
func (l *List) settle(pushed map[string]pushEntry, mark uint64, now int64) {
	if len(pushed) == 0 {
		return
	}
	keep := make(map[string]pushEntry, len(pushed))
	for id, e := range pushed {
		if e.seq > mark && e.live(now) {
			keep[id] = e
		}
	}
	if len(keep) != len(pushed) {
		l.pushed.Store(&keep)
	}
}

// Push puts revocations announced ahead of the poll in force at once and
// applies withdrawals of earlier pushes, in order; the rules are List's.
// It tells OnRevoke subscribers which ids were not in force before, and
// returns how many pushed ids it added (or renewed) and withdrew. Token
// ids must be valid (CheckTokenID); a revocation whose end has passed is
// ignored.
func (l *List) Push(ps []Push) (added, withdrawn int) {
	if len(ps) == 0 {
		return 0, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now().UnixNano()
	set, prev := *l.set.Load(), *l.pushed.Load()
	inForce := func(id string) bool {
		if _, ok := set[id]; ok {
			return true
		}
		e, ok := prev[id]
		return ok && e.live(now)
	}
	l.seq++
	next := make(map[string]pushEntry, len(prev)+len(ps))
	for id, e := range prev {
		if e.live(now) {
			next[id] = e
		}
	}
	var fresh []string
	told := map[string]bool{}
	for _, p := range ps {
		if p.Remove {
			if _, ok := next[p.TokenID]; ok {
				delete(next, p.TokenID)
				withdrawn++
			}
			continue
		}
		var until int64
		if !p.Until.IsZero() {
			until = p.Until.UnixNano()
			if until <= now {
				continue
			}
		}
		if _, ok := next[p.TokenID]; !ok && len(next) >= MaxPushed {
			l.pushRefused.Add(1)
			continue
		}
		// A renewed push takes the new end and the new sequence number:
		// the latest revocation is what the database holds.
		next[p.TokenID] = pushEntry{seq: l.seq, until: until}
		added++
		if !inForce(p.TokenID) && !told[p.TokenID] {
			told[p.TokenID] = true
			fresh = append(fresh, p.TokenID)
		}
	}
	l.pushed.Store(&next)
	l.notify(fresh)
	return added, withdrawn
}

// notify tells the subscribers of ids; the caller holds l.mu.
func (l *List) notify(ids []string) {
	if len(ids) == 0 {
		return
	}
	for _, f := range l.subs {
		f(ids)
	}
}
