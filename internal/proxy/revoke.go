package proxy

import (
	"errors"
	"net/http"
	"sync/atomic"
)

// Revocations is what the proxy needs of the revoked token ids
// (revocation.List): a lookup on every request, cheap enough for the hot
// path, and word of newly revoked ids so that what they have open is
// closed.
type Revocations interface {
	Revoked(tokenID string) bool
	// OnRevoke registers f, called with the ids each update newly
	// revokes, after the update is in force.
	OnRevoke(f func(tokenIDs []string))
}

// errTokenRevoked refuses a revoked token (its text is the 407's body) and
// is the cause of the contexts cancelled by a revocation, so that each
// record can say token_revoked rather than what the cut looked like.
var errTokenRevoked = errors.New("token revoked")

// revokedCounts are the tunnels and requests closed by revocations.
type revokedCounts struct{ tunnels, requests atomic.Uint64 }

// RevokedClosed is how many tunnels and in-flight requests revocations
// have closed (refusals of new requests are counted as auth failures,
// reason revoked).
func (p *Proxy) RevokedClosed() (tunnels, requests uint64) {
	return p.revoked.tunnels.Load(), p.revoked.requests.Load()
}

// watchToken files e under token in the active set, then reports whether
// token is revoked. The order closes the gap between the check and a
// revocation arriving: a revocation stores its new list before it cancels
// the tokens' entries (revocation.List.Apply), so either this check sees
// the list or that cancel sees the entry.
func (p *Proxy) watchToken(e *activeEntry, token string) bool {
	if p.opt.Revocations == nil || token == "" {
		return false
	}
	p.active.setToken(e, token)
	return p.opt.Revocations.Revoked(token)
}

// closeRevoked cancels every request and tunnel of ids with
// errTokenRevoked; each ends within moments and writes its record.
func (p *Proxy) closeRevoked(ids []string) {
	tunnels, requests := p.active.cancelTokens(ids, errTokenRevoked)
	p.revoked.tunnels.Add(uint64(tunnels))
	p.revoked.requests.Add(uint64(requests))
	if tunnels+requests > 0 {
		p.log.Info("closing tunnels and requests of revoked tokens", "tokens", len(ids),
			"tunnels", tunnels, "requests", requests)
	}
}

// failRevoked answers a request cut by its token's revocation as a new
// request with the token would be answered.
func (p *Proxy) failRevoked(w http.ResponseWriter, q *request) {
	h := w.Header()
	h.Add("Proxy-Authenticate", `Bearer realm="pinaka"`)
	h.Add("Proxy-Authenticate", `Basic realm="pinaka"`)
	p.fail(w, q, http.StatusProxyAuthRequired, "token_revoked", errTokenRevoked.Error())
}

// setToken files e under token, for cancelTokens. An entry's token is set
// once.
func (a *activeSet) setToken(e *activeEntry, token string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if e.token != "" {
		return
	}
	if _, ok := a.cancels[e]; !ok {
		return // already done
	}
	e.token = token
	if a.byToken == nil {
		a.byToken = make(map[string]map[*activeEntry]struct{})
	}
	s := a.byToken[token]
	if s == nil {
		s = make(map[*activeEntry]struct{}, 1)
		a.byToken[token] = s
	}
	s[e] = struct{}{}
}

// unindex removes e from the token index; the caller holds a.mu.
func (a *activeSet) unindex(e *activeEntry) {
	if e.token == "" {
		return
	}
	if s := a.byToken[e.token]; s != nil {
		delete(s, e)
		if len(s) == 0 {
			delete(a.byToken, e.token)
		}
	}
}

// cancelTokens cancels, with cause, every entry filed under one of
// tokens, and counts them: detached tunnels, and requests (handlers,
// including a CONNECT still dialing).
func (a *activeSet) cancelTokens(tokens []string, cause error) (tunnels, requests int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, t := range tokens {
		for e := range a.byToken[t] {
			e.cancel(cause)
			if e.tunnel {
				tunnels++
			} else {
				requests++
			}
		}
	}
	return tunnels, requests
}
