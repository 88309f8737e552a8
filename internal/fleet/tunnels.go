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
// nothing behind. At the cap the script returns -1.
//
// Needs the locals now (microseconds), leases (key), cap, ttl (ms), member.
const takeLeaseLua = `
local ms = math.floor(now / 1000)
redis.call('ZREMRANGEBYSCORE', leases, '-inf', ms)
if redis.call('ZCARD', leases) >= cap then return -1 end
redis.call('ZADD', leases, ms + ttl, member)
redis.call('PEXPIRE', leases, ttl)
`

// acquireScript takes a tunnel lease.
//
// KEYS[1] the token's leases; ARGV[1] cap, ARGV[2] TTL ms, ARGV[3] member.
// Returns 0 when the lease was taken, -1 when the token is at its cap.
const acquireScript = nowLua + `
local leases, cap, ttl, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
` + takeLeaseLua + `
return 0
`

// admitScript is a CONNECT's two decisions in one round trip: one unit of
// the token's bucket (as gcraScript), then, if the unit was granted, a
// tunnel lease (as acquireScript). A refused unit takes no lease; a lease
// refused at the cap still consumes the unit, as the two separate calls do.
//
// KEYS[1] the bucket, KEYS[2] the token's leases; ARGV[1] I, ARGV[2] B (as
// gcraScript), ARGV[3] cap, ARGV[4] TTL ms, ARGV[5] member.
// Returns 0 when both were granted, -1 when the token is at its tunnel
// cap, else the microseconds until one unit of the bucket is free.
const admitScript = nowLua + `
local bucket, interval, burst = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
` + takeUnitLua + `
local leases, cap, ttl, member = KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
` + takeLeaseLua + `
return 0
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

// Tunnels is MAX_TUNNELS_PER_TOKEN counted across the fleet, with leases
// that expire unless their node renews them (every TUNNEL_LEASE_TTL/3).
// Every tunnel is also counted on this node by a local TunnelLimiter: that
// bounds the node by the full cap whatever Redis says, and is the state the
// node decides on, with the cap divided by FLEET_SIZE, while Redis is away.
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

	mu   sync.Mutex
	live map[*lease]struct{} // tunnels open on this node, renewed

	renewKick chan struct{}
}

type lease struct {
	key, member string
	released    atomic.Bool
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
		renewKick:    make(chan struct{}, 1),
	}
}

// Acquire takes a tunnel slot for tokenID across the fleet
// (proxy.SlotLimiter). release is never nil and releases once.
func (t *Tunnels) Acquire(tokenID string) (release func(), ok bool) {
	f := t.f
	l := t.newLease(tokenID)
	if f.down.Load() {
		return t.acquireLocal(tokenID, l)
	}
	c := f.batch.script(t.acquire, []any{nil, nil, 1, l.key, t.maxArg, t.ttlArg, l.member})
	f.batch.do(c)
	got, err := c.cmd.Int64()
	f.m.acquireSeconds.Observe(time.Since(c.start).Seconds())
	f.batch.put(c)
	if err != nil {
		f.failed("tunnel_acquire", err)
		return t.acquireLocal(tokenID, l)
	}
	return t.granted(tokenID, l, got == 0)
}

// Admit is a CONNECT's rate-limit decision and tunnel slot in one script
// call (proxy.TunnelAdmitter): Limiter.Allow followed by Acquire, in one
// round trip instead of two. slotOK is meaningful only when ok; release is
// never nil and releases once.
func (t *Tunnels) Admit(lim *Limiter, tokenID string) (ok bool, retryAfter time.Duration, release func(), slotOK bool) {
	f := t.f
	if f.down.Load() {
		f.m.fallbackRate.Inc()
		if ok, retryAfter = lim.local.Allow(tokenID); !ok {
			return false, retryAfter, noop, false
		}
		release, slotOK = t.acquireLocal(tokenID, t.newLease(tokenID))
		return true, 0, release, slotOK
	}
	l := t.newLease(tokenID)
	c := f.batch.script(t.admit, []any{nil, nil, 2, lim.prefix + tokenID, l.key,
		lim.interval, lim.burst, t.maxArg, t.ttlArg, l.member})
	f.batch.do(c)
	got, err := c.cmd.Int64()
	f.m.admitSeconds.Observe(time.Since(c.start).Seconds())
	f.batch.put(c)
	if err != nil {
		f.failed("tunnel_admit", err)
		f.m.fallbackRate.Inc()
		if ok, retryAfter = lim.local.Allow(tokenID); !ok {
			return false, retryAfter, noop, false
		}
		release, slotOK = t.acquireLocal(tokenID, l)
		return true, 0, release, slotOK
	}
	if got > 0 {
		return false, time.Duration(got) * time.Microsecond, noop, false
	}
	release, slotOK = t.granted(tokenID, l, got == 0)
	return true, 0, release, slotOK
}

func (t *Tunnels) newLease(tokenID string) *lease {
	return &lease{key: t.prefix + tokenID, member: t.memberPrefix + strconv.FormatUint(t.seq.Add(1), 10)}
}

// granted completes a lease Redis answered for: taken, it is also counted
// on this node and tracked for renewal.
func (t *Tunnels) granted(tokenID string, l *lease, taken bool) (func(), bool) {
	if !taken {
		return noop, false
	}
	localRelease, ok := t.local.Acquire(tokenID)
	if !ok {
		// The node alone holds the whole cap: Redis lost some of its
		// leases (a restart) and they are not renewed yet.
		t.unlease(l)
		return noop, false
	}
	return t.track(l, localRelease), true
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
	return t.track(l, localRelease), true
}

func (t *Tunnels) track(l *lease, localRelease func()) func() {
	t.mu.Lock()
	t.live[l] = struct{}{}
	n := len(t.live)
	t.mu.Unlock()
	t.f.m.leases.Set(float64(n))
	return func() {
		if !l.released.CompareAndSwap(false, true) {
			return
		}
		t.mu.Lock()
		delete(t.live, l)
		n := len(t.live)
		t.mu.Unlock()
		t.f.m.leases.Set(float64(n))
		localRelease()
		if !t.f.down.Load() {
			t.unlease(l)
		}
		// While Redis is away the lease is left to expire (within the
		// TTL); no renewal will bring it back, it left t.live above.
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
	for {
		select {
		case <-ctx.Done():
			return
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
