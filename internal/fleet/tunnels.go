package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// takeLeaseLua takes a tunnel lease. A token's leases are one sorted set:
// member = node:instance:sequence, score = the lease's expiry in
// milliseconds of Redis's clock. Expired members (their node died or lost
// Redis for longer than the TTL) are dropped before counting, so a dead
// node's tunnels free themselves within one TTL. The key's own TTL is
// pushed to the latest lease's expiry: a token without live leases leaves
// nothing behind. At the cap the script returns {-1, count}; the local
// count is the token's leases with the new one.
//
// Needs the locals now (microseconds), leases (key), cap, ttl (ms), member.
const takeLeaseLua = `
local ms = math.floor(now / 1000)
redis.call('ZREMRANGEBYSCORE', leases, '-inf', ms)
local count = redis.call('ZCARD', leases)
if count >= cap then return {-1, count} end
redis.call('ZADD', leases, ms + ttl, member)
redis.call('PEXPIRE', leases, ttl)
count = count + 1
`

// acquireScript takes a tunnel lease.
//
// KEYS[1] the token's leases; ARGV[1] cap, ARGV[2] TTL ms, ARGV[3] member.
// Returns {0, count} when the lease was taken, {-1, count} when the token
// is at its cap; count is the token's leases across the fleet.
const acquireScript = nowLua + `
local leases, cap, ttl, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
` + takeLeaseLua + `
return {0, count}
`

// admitScript is a CONNECT's two decisions in one round trip: one unit of
// the token's bucket (as reserveScript asking for one), then, if the unit
// was granted, a tunnel lease (as acquireScript). A refused unit takes no
// lease; a lease refused at the cap still consumes the unit, as the two
// separate calls do.
//
// KEYS[1] the bucket, KEYS[2] the token's leases; ARGV[1] I, ARGV[2] B,
// ARGV[3] share (as reserveScript), ARGV[4] cap, ARGV[5] TTL ms, ARGV[6]
// member.
// Returns {-w} when the bucket refused (w microseconds until one unit is
// free), else acquireScript's {0, count} or {-1, count}.
const admitScript = nowLua + `
local bucket, interval, burst, share = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, refund, mine = 1, 0, ''
` + takeUnitsLua + `
local leases, cap, ttl, member = KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
` + takeLeaseLua + `
return {0, count}
`

// renewScript extends a node's leases of one token to now + TTL, adding
// those that are missing: tunnels opened while Redis was away, or leases
// lost with a restarted Redis, join the shared count again. (Such a
// re-added tunnel may put the token above its cap; open tunnels are never
// closed for that, new ones are refused until the count is below it.)
//
// KEYS[1] the token's leases; ARGV[1] TTL ms, ARGV[2..] members.
const renewScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], exp, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
`

const (
	// spareFor is how long a closed tunnel's lease stays with its node for
	// the token's next tunnel, and how old the fleet-wide count it was
	// kept on may be. A client that closes a tunnel and opens the next
	// (a browser's connection churn, a CONNECT per request) reuses the
	// lease without a round trip; a lease unused for spareFor goes back.
	spareFor = time.Second
	// maxSpares bounds the leases one token keeps spare on one node.
	maxSpares = 32
)

// Tunnels is MAX_TUNNELS_PER_TOKEN counted across the fleet, with leases
// that expire unless their node renews them (every TUNNEL_LEASE_TTL/3).
// Every tunnel is also counted on this node by a local TunnelLimiter: that
// bounds the node by the full cap whatever Redis says, and is the state the
// node decides on, with the cap divided by FLEET_SIZE, while Redis is away.
//
// A lease is never taken without the script's check against the cap, so
// the fleet never holds more than the cap (outages aside). A closed
// tunnel's lease may stay with its node for a while as a spare, reused by
// the token's next tunnel there without a round trip, but only while the
// token is far below its cap: spares of all nodes together stay under a
// quarter of the free slots the last count showed (see keepSpare), and
// near the cap every lease is taken and given back by its own call.
type Tunnels struct {
	f           *Fleet
	local       *ratelimit.TunnelLimiter
	max         int
	fallbackMax int
	ttl         time.Duration
	prefix      string
	acquire     *script
	admit       *script
	renew       *redis.Script
	maxArg      any // boxed once, like Limiter's ARGV
	ttlArg      any

	// member names: node:instance:sequence. The random instance keeps
	// two processes with one PROBE_NODE_NAME (or a restart) apart.
	memberPrefix string
	seq          atomic.Uint64

	mu     sync.Mutex
	live   map[*lease]struct{}  // leases this node holds (tunnels and spares), renewed
	spares map[string]*spareSet // by token id, only tokens with spares
	// stopped is set when renewLoop ends: no lease is kept from then on
	// (nothing would renew or give it back).
	stopped atomic.Bool

	renewKick chan struct{}
}

type lease struct {
	key, member string
	released    atomic.Bool // given back: a renewal in flight must not keep it
}

// spareSet is a token's spare leases on this node and the fleet-wide count
// of its leases that the last script call returned.
type spareSet struct {
	leases  []*lease
	idle    []time.Time // when each lease became spare
	known   int
	knownAt time.Time
}

func newTunnels(f *Fleet) *Tunnels {
	o := f.o
	var inst [4]byte
	_, _ = rand.Read(inst[:])
	return &Tunnels{
		f:            f,
		local:        ratelimit.NewTunnelLimiter(o.MaxTunnelsPerToken),
		max:          o.MaxTunnelsPerToken,
		fallbackMax:  localShare(o.MaxTunnelsPerToken, o.FleetSize),
		ttl:          o.LeaseTTL,
		prefix:       o.Prefix + "tunnels:",
		acquire:      newScript(acquireScript),
		admit:        newScript(admitScript),
		renew:        redis.NewScript(renewScript),
		maxArg:       strconv.Itoa(o.MaxTunnelsPerToken),
		ttlArg:       strconv.FormatInt(o.LeaseTTL.Milliseconds(), 10),
		memberPrefix: o.Node + ":" + hex.EncodeToString(inst[:]) + ":",
		live:         map[*lease]struct{}{},
		spares:       map[string]*spareSet{},
		renewKick:    make(chan struct{}, 1),
	}
}

// Acquire takes a tunnel slot for tokenID across the fleet
// (proxy.SlotLimiter). release is never nil and releases once.
func (t *Tunnels) Acquire(tokenID string) (release func(), ok bool) {
	f := t.f
	if f.down.Load() {
		return t.acquireLocal(tokenID, t.newLease(tokenID))
	}
	if l := t.takeSpare(tokenID); l != nil {
		return t.granted(tokenID, l, true)
	}
	l := t.newLease(tokenID)
	v, err := f.batch.eval(t.acquire, []any{nil, nil, 1, l.key, t.maxArg, t.ttlArg, l.member}, f.m.acquireSeconds).Int64Slice()
	if err == nil && len(v) != 2 {
		err = errReply
	}
	if err != nil {
		f.failed("tunnel_acquire", err)
		return t.acquireLocal(tokenID, l)
	}
	t.counted(tokenID, int(v[1]))
	return t.granted(tokenID, l, v[0] == 0)
}

// Admit is a CONNECT's rate-limit decision and tunnel slot
// (proxy.TunnelAdmitter): Limiter.Allow followed by Acquire. With a spare
// lease the slot costs no round trip and the unit is Allow's (reserved or
// not); without one, and without a reserved unit, both go in one script
// call. slotOK is meaningful only when ok; release is never nil and
// releases once.
func (t *Tunnels) Admit(lim *Limiter, tokenID string) (ok bool, retryAfter time.Duration, release func(), slotOK bool) {
	f := t.f
	if !f.down.Load() {
		if l := t.takeSpare(tokenID); l != nil {
			if ok, retryAfter = t.allowHolding(lim, tokenID, l); !ok {
				if !t.putSpare(tokenID, l) {
					t.giveBack(l)
				}
				return false, retryAfter, noop, false
			}
			release, slotOK = t.granted(tokenID, l, true)
			return true, 0, release, slotOK
		}
		if lim.takeReserved(tokenID) {
			release, slotOK = t.Acquire(tokenID)
			return true, 0, release, slotOK
		}
	}
	l := t.newLease(tokenID)
	if f.down.Load() {
		return t.admitLocal(lim, tokenID, l)
	}
	v, err := f.batch.eval(t.admit, []any{nil, nil, 2, lim.prefix + tokenID, l.key,
		lim.interval, lim.burst, lim.share, t.maxArg, t.ttlArg, l.member}, f.m.admitSeconds).Int64Slice()
	if err == nil && (len(v) == 0 || len(v) > 2 || len(v) == 1 && v[0] >= 0) {
		err = errReply
	}
	if err != nil {
		f.failed("tunnel_admit", err)
		return t.admitLocal(lim, tokenID, l)
	}
	if len(v) == 1 {
		return false, time.Duration(-v[0]) * time.Microsecond, noop, false
	}
	t.counted(tokenID, int(v[1]))
	release, slotOK = t.granted(tokenID, l, v[0] == 0)
	return true, 0, release, slotOK
}

// allowHolding is lim.Allow for a CONNECT holding spare lease l, which
// goes back if Allow panics rather than stay renewed with no tunnel.
func (t *Tunnels) allowHolding(lim *Limiter, tokenID string, l *lease) (ok bool, retryAfter time.Duration) {
	done := false
	defer func() {
		if !done {
			t.giveBack(l)
		}
	}()
	ok, retryAfter = lim.Allow(tokenID)
	done = true
	return ok, retryAfter
}

// admitLocal is Admit on this node's own state, with the limits divided by
// FLEET_SIZE, while Redis is away.
func (t *Tunnels) admitLocal(lim *Limiter, tokenID string, l *lease) (ok bool, retryAfter time.Duration, release func(), slotOK bool) {
	t.f.m.fallbackRate.Inc()
	if ok, retryAfter = lim.local.Allow(tokenID); !ok {
		return false, retryAfter, noop, false
	}
	release, slotOK = t.acquireLocal(tokenID, l)
	return true, 0, release, slotOK
}

func (t *Tunnels) newLease(tokenID string) *lease {
	return &lease{key: t.prefix + tokenID, member: t.memberPrefix + strconv.FormatUint(t.seq.Add(1), 10)}
}

// granted completes a lease Redis answered for (or a spare): taken, it is
// also counted on this node and tracked for renewal.
func (t *Tunnels) granted(tokenID string, l *lease, taken bool) (func(), bool) {
	if !taken {
		return noop, false
	}
	localRelease, ok := t.local.Acquire(tokenID)
	if !ok {
		// The node alone holds the whole cap: Redis lost some of its
		// leases (a restart) and they are not renewed yet.
		t.giveBack(l)
		return noop, false
	}
	return t.track(tokenID, l, localRelease, true), true
}

// acquireLocal decides on this node's own tunnels, against its share of
// the cap. The lease is still tracked, so the tunnel joins the shared count
// at the first renewal after Redis is back.
func (t *Tunnels) acquireLocal(tokenID string, l *lease) (func(), bool) {
	t.f.m.fallbackTunnel.Inc()
	localRelease, ok := t.local.AcquireUpTo(tokenID, t.fallbackMax)
	if !ok {
		return noop, false
	}
	return t.track(tokenID, l, localRelease, false), true
}

// track holds l for a tunnel until the returned release: renewed while it
// is open, then kept as a spare (shared is true when Redis granted it) or
// given back.
func (t *Tunnels) track(tokenID string, l *lease, localRelease func(), shared bool) func() {
	t.mu.Lock()
	t.live[l] = struct{}{}
	n := len(t.live)
	t.mu.Unlock()
	t.f.m.leases.Set(float64(n))
	var done atomic.Bool
	return func() {
		if !done.CompareAndSwap(false, true) {
			return
		}
		localRelease()
		if shared && t.putSpare(tokenID, l) {
			return
		}
		t.giveBack(l)
	}
}

// giveBack ends this node's hold of l: no longer renewed, and removed from
// Redis (while Redis is away the lease is left to expire within the TTL;
// no renewal will bring it back).
func (t *Tunnels) giveBack(l *lease) {
	l.released.Store(true)
	t.mu.Lock()
	delete(t.live, l)
	n := len(t.live)
	t.mu.Unlock()
	t.f.m.leases.Set(float64(n))
	if !t.f.down.Load() {
		t.unlease(l)
	}
}

// counted notes the fleet-wide count of tokenID's leases a script
// returned, on which keepSpare decides. Only tokens with spares keep it.
func (t *Tunnels) counted(tokenID string, count int) {
	t.mu.Lock()
	if s := t.spares[tokenID]; s != nil {
		s.known, s.knownAt = count, time.Now()
	} else if t.roomFor(count, 1) {
		t.spares[tokenID] = &spareSet{known: count, knownAt: time.Now()}
	}
	t.mu.Unlock()
}

// roomFor reports whether a node may hold spare spares of a token whose
// leases numbered count: all nodes together, FLEET_SIZE × spare, stay
// within a quarter of the slots that count left free, so a spare held here
// rarely refuses a tunnel on another node.
func (t *Tunnels) roomFor(count, spare int) bool {
	return spare <= maxSpares && 4*t.f.o.FleetSize*spare <= t.max-count
}

// putSpare keeps a closed tunnel's lease for the token's next tunnel, if
// Redis is up, the token's last count is fresh and far enough below the
// cap. It reports whether it kept l.
func (t *Tunnels) putSpare(tokenID string, l *lease) bool {
	if t.f.down.Load() {
		return false
	}
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.spares[tokenID]
	// stopped is read under mu: the final sweep holds mu after setting it.
	if s == nil || t.stopped.Load() || now.Sub(s.knownAt) >= spareFor || !t.roomFor(s.known, len(s.leases)+1) {
		return false
	}
	s.leases = append(s.leases, l)
	s.idle = append(s.idle, now)
	return true
}

// takeSpare returns one of tokenID's spare leases, or nil.
func (t *Tunnels) takeSpare(tokenID string) *lease {
	t.mu.Lock()
	s := t.spares[tokenID]
	if s == nil || len(s.leases) == 0 {
		t.mu.Unlock()
		return nil
	}
	i := len(s.leases) - 1
	l := s.leases[i]
	s.leases[i] = nil
	s.leases, s.idle = s.leases[:i], s.idle[:i]
	t.mu.Unlock()
	t.f.m.reservedTunnel.Inc()
	return l
}

// sweepSpares gives back the spares idle for spareFor (all of them when
// all is set: the node stops) and forgets the tokens with no spares and
// an old count.
func (t *Tunnels) sweepSpares(all bool) {
	now := time.Now()
	var old []*lease
	t.mu.Lock()
	for id, s := range t.spares {
		keep := 0
		for i, l := range s.leases {
			if all || now.Sub(s.idle[i]) >= spareFor {
				old = append(old, l)
				continue
			}
			s.leases[keep], s.idle[keep] = l, s.idle[i]
			keep++
		}
		clear(s.leases[keep:])
		s.leases, s.idle = s.leases[:keep], s.idle[:keep]
		if keep == 0 && now.Sub(s.knownAt) >= spareFor {
			delete(t.spares, id)
		}
	}
	t.mu.Unlock()
	for _, l := range old {
		t.giveBack(l)
	}
}

// unlease removes l's lease from Redis, in a pipeline with the other
// tunnels' releases.
func (t *Tunnels) unlease(l *lease) {
	f := t.f
	c := f.releases.command("zrem", l.key, l.member)
	f.releases.do(c)
	err := c.cmd.Err()
	f.m.releaseSeconds.Observe(time.Since(c.start).Seconds())
	f.releases.put(c)
	if err != nil {
		f.failed("tunnel_release", err)
	}
}

// Count reports the tunnels tokenID holds open on this node.
func (t *Tunnels) Count(tokenID string) int { return t.local.Count(tokenID) }

func (t *Tunnels) renewSoon() {
	select {
	case t.renewKick <- struct{}{}:
	default:
	}
}

// renewLoop renews this node's leases every TTL/3, so that a lease
// survives two missed renewals and a SIGKILLed node's leases expire
// within one TTL of its last renewal.
func (t *Tunnels) renewLoop(ctx context.Context) {
	tick := time.NewTicker(t.ttl / 3)
	defer tick.Stop()
	sweep := time.NewTicker(spareFor / 2)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			// Spares go back now rather than block other nodes for a
			// lease TTL.
			t.stopped.Store(true)
			t.sweepSpares(true)
			return
		case <-sweep.C:
			t.sweepSpares(false)
			continue
		case <-tick.C:
		case <-t.renewKick:
		}
		t.renewOnce(ctx)
	}
}

// renewOnce renews every live lease in one pipelined round trip (one
// script call per token).
func (t *Tunnels) renewOnce(ctx context.Context) {
	f := t.f
	if f.down.Load() {
		return
	}
	t.mu.Lock()
	byKey := make(map[string][]any, len(t.live))
	leases := make([]*lease, 0, len(t.live))
	for l := range t.live {
		if byKey[l.key] == nil {
			byKey[l.key] = []any{t.ttlArg}
		}
		byKey[l.key] = append(byKey[l.key], l.member)
		leases = append(leases, l)
	}
	t.mu.Unlock()
	if len(leases) == 0 {
		return
	}
	// A renewal carries many leases: it may take longer than one decision
	// but must end well before the leases it renews expire.
	rctx, cancel := context.WithTimeout(ctx, max(f.o.Timeout, t.ttl/6))
	defer cancel()
	start := time.Now()
	err := t.renew.Load(rctx, f.client).Err()
	if err == nil {
		_, err = f.client.Pipelined(rctx, func(p redis.Pipeliner) error {
			for key, args := range byKey {
				t.renew.EvalSha(rctx, p, []string{key}, args...)
			}
			return nil
		})
	}
	f.m.renewSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		if ctx.Err() == nil {
			f.failed("lease_renew", err)
		}
		return
	}
	// A tunnel that ended while the renewal was in flight may have been
	// put back by it after its release removed it: remove it again.
	var stale []*lease
	for _, l := range leases {
		if l.released.Load() {
			stale = append(stale, l)
		}
	}
	if len(stale) > 0 {
		_, _ = f.client.Pipelined(rctx, func(p redis.Pipeliner) error {
			for _, l := range stale {
				p.ZRem(rctx, l.key, l.member)
			}
			return nil
		})
	}
}

func noop() {}
