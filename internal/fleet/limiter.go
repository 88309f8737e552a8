package fleet

import (
	"strconv"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// The scripts are built from the fragments below, so that the CONNECT's
// combined script (admitScript) takes its units exactly as reserveScript
// does and its lease exactly as acquireScript does.

// nowLua reads Redis's clock in microseconds: node clocks never enter a
// decision.
const nowLua = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
`

// takeUnitsLua takes units of a token's bucket, as GCRA: the bucket is one
// number, the theoretical arrival time (TAT) of the next unit, in
// microseconds. A bucket of capacity B refilling one unit every I
// microseconds holds room = (now - TAT)/I + B units (at most B: TAT is
// never below now). A call first gives back the units a node reserved
// earlier and did not use (refund: TAT moves back, never below now, so a
// refund never fills the bucket past B), but only if the bucket still
// holds what that node's grant wrote (mine): no other call came since.
// Otherwise time may have paid for those units already (the bucket
// refilled while they sat unused) and another node spent the refilled
// room: giving them back would admit units the bucket never had. Any
// write after a grant moves TAT forward, so an equal value means no
// write. Then the call takes n = min(want,
// room/share) units, at least one: while the bucket is full, a node may
// reserve a few units ahead (share = 2 × FLEET_SIZE keeps every node's
// reservation a small part of what is left), and near empty every call
// takes exactly one unit, as a per-request decision would. With no room
// the call takes nothing and returns minus the microseconds until one
// unit is free. The key expires when TAT is reached, which is exactly
// when the bucket is full again and the key says nothing.
//
// Needs the locals now, bucket (key), interval (I), burst (B), want,
// refund, mine, share; leaves the locals granted (n >= 1) and written (the
// bucket's new value) when it did not return.
const takeUnitsLua = `
local cur = redis.call('GET', bucket)
local tat = tonumber(cur) or now
if cur ~= mine then refund = 0 end
if refund > 0 then tat = tat - refund * interval end
if tat < now then tat = now end
local room = math.floor((now - tat) / interval + burst + 1e-6)
if room < 1 then
  if refund > 0 then redis.call('SET', bucket, string.format('%.3f', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000))) end
  return {-math.max(1, math.ceil(tat + interval - burst * interval - now))}
end
local granted = math.max(1, math.min(want, math.floor(room / share)))
local new_tat = tat + granted * interval
local written = string.format('%.3f', new_tat)
redis.call('SET', bucket, written, 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
`

// reserveScript takes units of a token's shared bucket.
//
// KEYS[1] the bucket; ARGV[1] I (microseconds per unit); ARGV[2] B;
// ARGV[3] share; ARGV[4] want; ARGV[5] refund; ARGV[6] the bucket's value
// the refunded units' grant wrote.
// Returns {n, value}: n >= 1 units granted and the bucket's value now, or
// {n} with n < 0, minus the microseconds until one unit is free.
const reserveScript = nowLua + `
local bucket, interval, burst, share = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, refund, mine = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
` + takeUnitsLua + `
return {granted, written}
`

const (
	// reserveFor is how long units reserved by one call stay this node's
	// to use. Units left after it go back to the bucket with the token's
	// next call (or, if the token sends nothing more, the bucket refills
	// without them). Short, so that a token that moves to another node
	// finds its units there.
	reserveFor = 250 * time.Millisecond
	// maxWant bounds the units one call reserves: one round trip in 64
	// requests of a busy token.
	maxWant = 64
)

// Limiter is RATE_LIMIT_REQUESTS_PER_MINUTE and RATE_LIMIT_BURST_SIZE per
// token shared by every node on one Redis. Every unit a node admits is
// taken from the shared bucket by an atomic script, so the fleet never
// admits more than the limit; a busy token's node takes several units per
// call (a reservation) and admits the next requests from them without a
// round trip. While Redis is away it decides with a local bucket of the
// limit and the burst divided by FLEET_SIZE.
type Limiter struct {
	f      *Fleet
	local  *ratelimit.Limiter
	script *script
	prefix string
	// interval, burst and share are ARGV of every call, boxed once: a
	// string put in an []any per call would be copied to the heap each
	// time.
	interval, burst, share any
	wants                  [maxWant + 1]any

	// reserved holds each token's units not used yet, bounded like the
	// local buckets (RATE_LIMIT_MAX_TOKENS): an evicted token's units are
	// not refunded, and the bucket refills without them.
	reserved *lru.Cache[string, *allowance]
}

// allowance is the units of one token this node has reserved.
type allowance struct {
	mu      sync.Mutex
	units   int       // reserved, not used yet
	got     int       // units the last call granted
	granted time.Time // when it granted them
	want    int       // units the next call asks for
	written string    // the bucket's value after that grant: see takeUnitsLua
	pending *reservation
	// refusedUntil is when the bucket said its next unit is free: until
	// then the token's requests are refused here, without a call (a
	// client hammering while limited costs no round trips). A unit
	// another node gives back earlier waits until then: the error is on
	// the side of refusing.
	refusedUntil time.Time
}

// reservation is a call in flight for an allowance: the token's other
// requests wait for it rather than each sending its own.
type reservation struct {
	done chan struct{}
	wait time.Duration // > 0: refused, one unit free after wait
	err  error
}

func newLimiter(f *Fleet) *Limiter {
	o := f.o
	interval := 60e6 / float64(o.RequestsPerMinute)
	reserved, err := lru.New[string, *allowance](o.MaxTokens)
	if err != nil {
		panic("fleet: RATE_LIMIT_MAX_TOKENS must be positive: " + err.Error())
	}
	l := &Limiter{
		f: f,
		local: ratelimit.New(localShare(o.RequestsPerMinute, o.FleetSize),
			localShare(o.Burst, o.FleetSize), o.MaxTokens),
		script:   newScript(reserveScript),
		prefix:   o.Prefix + "rl:",
		interval: strconv.FormatFloat(interval, 'f', -1, 64),
		burst:    strconv.Itoa(o.Burst),
		share:    strconv.Itoa(2 * o.FleetSize),
		reserved: reserved,
	}
	for i := range l.wants {
		l.wants[i] = strconv.Itoa(i)
	}
	return l
}

// Allow consumes one unit of tokenID's shared bucket (proxy.RateLimiter):
// one this node reserved earlier, or one taken by a script call (which may
// reserve more).
func (l *Limiter) Allow(tokenID string) (ok bool, retryAfter time.Duration) {
	f := l.f
	if f.down.Load() {
		f.m.fallbackRate.Inc()
		return l.local.Allow(tokenID)
	}
	a := l.allowance(tokenID)
	for {
		now := time.Now()
		a.mu.Lock()
		if a.take(now) {
			a.mu.Unlock()
			f.m.reservedRate.Inc()
			return true, 0
		}
		if wait := a.refusedUntil.Sub(now); wait > 0 {
			a.mu.Unlock()
			return false, wait
		}
		if r := a.pending; r != nil {
			a.mu.Unlock()
			<-r.done
			if r.err != nil {
				f.m.fallbackRate.Inc()
				return l.local.Allow(tokenID)
			}
			if r.wait > 0 {
				return false, r.wait
			}
			continue // units may be left for this request
		}
		want, refund, written := a.next(now)
		r := &reservation{done: make(chan struct{})}
		a.pending = r
		a.mu.Unlock()

		ok, retryAfter, err := l.reserve(a, r, now, tokenID, want, refund, written)
		if err != nil {
			f.failed("rate_limit", err)
			f.m.fallbackRate.Inc()
			return l.local.Allow(tokenID)
		}
		return ok, retryAfter
	}
}

// reserve makes reservation r's script call and settles r with its
// answer. r is settled even if the call panics (the panic goes on): the
// token's requests waiting for r, and all its later ones, would wait
// forever.
func (l *Limiter) reserve(a *allowance, r *reservation, now time.Time, tokenID string, want, refund int, written string) (ok bool, retryAfter time.Duration, err error) {
	settled := false
	defer func() {
		if !settled {
			l.settle(a, r, now, 0, "", errPanic)
		}
	}()
	v, err := l.f.batch.eval(l.script, []any{nil, nil, 1, l.prefix + tokenID,
		l.interval, l.burst, l.share, l.wants[want], strconv.Itoa(refund), written}, l.f.m.rateSeconds).Slice()
	var got int64
	if err == nil {
		got, written, err = reserveReply(v)
	}
	settled = true
	ok, retryAfter = l.settle(a, r, now, got, written, err)
	return ok, retryAfter, err
}

// reserveReply reads reserveScript's reply: {n, value} or {-wait}.
func reserveReply(v []any) (got int64, written string, err error) {
	if len(v) == 0 {
		return 0, "", errReply
	}
	got, _ = v[0].(int64)
	if got > 0 && len(v) == 2 {
		written, _ = v[1].(string)
	}
	if got == 0 || got > 0 && written == "" || got < 0 && len(v) != 1 {
		return 0, "", errReply
	}
	return got, written, nil
}

// takeReserved admits one request of tokenID from its reserved units, if
// it has one, without a round trip; else it reports false and nothing
// changes.
func (l *Limiter) takeReserved(tokenID string) bool {
	a, ok := l.reserved.Get(tokenID)
	if !ok {
		return false
	}
	a.mu.Lock()
	ok = a.take(time.Now())
	a.mu.Unlock()
	if ok {
		l.f.m.reservedRate.Inc()
	}
	return ok
}

// allowance returns tokenID's allowance, made on first use.
func (l *Limiter) allowance(tokenID string) *allowance {
	if a, ok := l.reserved.Get(tokenID); ok {
		return a
	}
	a := &allowance{want: 1}
	if prev, ok, _ := l.reserved.PeekOrAdd(tokenID, a); ok {
		return prev
	}
	return a
}

// settle ends reservation r of allowance a with a script's answer got
// (units granted, or minus the microseconds to wait), taking the caller's
// unit, and wakes the requests that waited for it.
func (l *Limiter) settle(a *allowance, r *reservation, now time.Time, got int64, written string, err error) (bool, time.Duration) {
	a.mu.Lock()
	a.pending = nil
	switch {
	case err != nil:
		r.err = err
	case got < 0:
		r.wait = time.Duration(-got) * time.Microsecond
		a.refusedUntil = now.Add(r.wait)
	default:
		a.got, a.granted, a.written = int(got), now, written
		a.units = int(got) - 1
	}
	a.mu.Unlock()
	close(r.done)
	return err == nil && got > 0, r.wait
}

// take uses one reserved unit, if one is left and still this node's.
func (a *allowance) take(now time.Time) bool {
	if a.units == 0 || now.Sub(a.granted) >= reserveFor {
		return false
	}
	a.units--
	return true
}

// next is the next call's ask and refund, with the bucket's value the
// refunded units' grant wrote. Units left from the last call (their time
// is over, or the caller would have taken one) go back, if no other call
// changed the bucket since (takeUnitsLua), and the ask shrinks to what the
// token used of them. A call needed within the first half of the last
// one's time doubles the ask: the token is busy enough to use more per
// round trip. A token whose requests are further apart keeps asking for
// one.
func (a *allowance) next(now time.Time) (want, refund int, written string) {
	switch {
	case a.units > 0:
		refund, written = a.units, a.written
		a.want = max(1, min(maxWant, a.got-a.units))
		a.units = 0
	case a.got > 0 && now.Sub(a.granted) < reserveFor/2:
		a.want = min(2*a.want, maxWant)
	}
	a.written = ""
	return a.want, refund, written
}
