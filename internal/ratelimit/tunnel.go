package ratelimit

import (
	"sync"
	"sync/atomic"
)

// TunnelLimiter caps the tunnels (CONNECT, extended CONNECT, forwarded
// upgrades) a token may hold open at once. The request rate limit does not
// bound this: a token can open tunnels slowly and keep them all, tying up
// file descriptors and upstream connections that other users need.
type TunnelLimiter struct {
	max int

	mu     sync.Mutex
	counts map[string]int // open tunnels per token; no zero entries
}

// NewTunnelLimiter returns a TunnelLimiter allowing maxPerToken concurrent
// tunnels per token. It panics if maxPerToken is less than 1.
func NewTunnelLimiter(maxPerToken int) *TunnelLimiter {
	mustPositive("NewTunnelLimiter", "maxPerToken", maxPerToken)
	return &TunnelLimiter{max: maxPerToken, counts: make(map[string]int)}
}

// Acquire takes a tunnel slot for tokenID. If the token already holds the
// maximum it returns ok false. release gives the slot back; it is never nil,
// and calling it more than once (say, from both a deferred cleanup and an
// error path) releases only once.
func (t *TunnelLimiter) Acquire(tokenID string) (release func(), ok bool) {
	return t.AcquireUpTo(tokenID, t.max)
}

// AcquireUpTo is Acquire with a lower cap for this call: a fleet node
// deciding alone while Redis is away allows its share of the fleet's cap,
// counting the tunnels it already holds (see internal/fleet).
func (t *TunnelLimiter) AcquireUpTo(tokenID string, max int) (release func(), ok bool) {
	max = min(max, t.max)
	t.mu.Lock()
	n := t.counts[tokenID]
	if n >= max {
		t.mu.Unlock()
		return noop, false
	}
	t.counts[tokenID] = n + 1
	t.mu.Unlock()

	var released atomic.Bool
	return func() {
		if released.CompareAndSwap(false, true) {
			t.release(tokenID)
		}
	}, true
}

func (t *TunnelLimiter) release(tokenID string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if n := t.counts[tokenID]; n > 1 {
		t.counts[tokenID] = n - 1
	} else {
		// Deleting at zero keeps the map to tokens with tunnels open now,
		// rather than every token ever seen.
		delete(t.counts, tokenID)
	}
}

// Count reports how many tunnels tokenID holds open.
func (t *TunnelLimiter) Count(tokenID string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.counts[tokenID]
}

func noop() {}
