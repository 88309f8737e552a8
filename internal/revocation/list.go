// Package revocation keeps the set of revoked token ids a node enforces: a
// List the proxy reads on every request, and a Poller that fetches the
// collector's list (GET Path), saves the last good one under STATE_DIR and
// applies it. Other sources (a fleet pub/sub channel) feed the same List
// through Apply.
package revocation

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

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

// List is the set of revoked token ids in force. Revoked is one atomic load
// and one map read: the set is immutable and replaced whole by Apply.
type List struct {
	set  atomic.Pointer[map[string]struct{}]
	mu   sync.Mutex // orders Apply calls and their notifications
	subs []func(tokenIDs []string)
}

// NewList returns an empty List.
func NewList() *List {
	l := &List{}
	empty := map[string]struct{}{}
	l.set.Store(&empty)
	return l
}

// Revoked reports whether tokenID is revoked. The empty id never is.
func (l *List) Revoked(tokenID string) bool {
	if tokenID == "" {
		return false
	}
	_, ok := (*l.set.Load())[tokenID]
	return ok
}

// Len is the number of revoked ids in force.
func (l *List) Len() int { return len(*l.set.Load()) }

// OnRevoke registers f to be told the ids each Apply newly revokes, after
// the new set is in force: a request that checks Revoked after f ran sees
// them, one that checked before is closed by f. f runs on the caller of
// Apply and must not call Apply.
func (l *List) OnRevoke(f func(tokenIDs []string)) {
	l.mu.Lock()
	l.subs = append(l.subs, f)
	l.mu.Unlock()
}

// Apply puts ids in force in place of the current set and tells OnRevoke
// subscribers which of them are new. It returns how many were added and
// removed. ids must be valid (Document.Validate); duplicates are fine.
func (l *List) Apply(ids []string) (added, removed int) {
	next := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		next[id] = struct{}{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	prev := *l.set.Load()
	var fresh []string
	for id := range next {
		if _, ok := prev[id]; !ok {
			fresh = append(fresh, id)
		}
	}
	removed = len(prev) - (len(next) - len(fresh))
	l.set.Store(&next)
	if len(fresh) > 0 {
		for _, f := range l.subs {
			f(fresh)
		}
	}
	return len(fresh), removed
}
