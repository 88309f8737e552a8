package fleet

import (
	"strconv"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// The scripts are built from the fragments below, so that the CONNECT's
// combined script (admitScript) takes its unit exactly as gcraScript does
// and its lease exactly as acquireScript does.

// nowLua reads Redis's clock in microseconds: node clocks never enter a
// decision.
const nowLua = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
`

// takeUnitLua takes one unit of a token's bucket, as GCRA: the bucket is
// one number, the theoretical arrival time (TAT) of the next unit, in
// microseconds. A bucket of capacity B refilling one unit every I
// microseconds admits a request at now when TAT + I - B*I <= now. A refused
// request changes nothing (as in ratelimit.Limiter) and the script returns
// the microseconds until one unit is free. The key expires when TAT is
// reached, which is exactly when the bucket is full again and the key says
// nothing.
//
// Needs the locals now, bucket (key), interval (I), burst (B).
const takeUnitLua = `
local tat = tonumber(redis.call('GET', bucket)) or now
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - burst * interval - now
if wait > 0 then return math.max(1, math.ceil(wait)) end
redis.call('SET', bucket, string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
`

// gcraScript takes one unit of a token's shared bucket.
//
// KEYS[1] the bucket; ARGV[1] I (microseconds per unit); ARGV[2] B.
// Returns 0 when allowed, else the microseconds until one unit is free.
const gcraScript = nowLua + `
local bucket, interval, burst = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
` + takeUnitLua + `
return 0
`

// Limiter is RATE_LIMIT_REQUESTS_PER_MINUTE and RATE_LIMIT_BURST_SIZE per
// token shared by every node on one Redis: one atomic script per decision.
// While Redis is away it decides with a local bucket of the limit and the
// burst divided by FLEET_SIZE.
type Limiter struct {
	f      *Fleet
	local  *ratelimit.Limiter
	script *script
	prefix string
	// interval and burst are ARGV of every call, boxed once: a string put
	// in an []any per call would be copied to the heap each time.
	interval, burst any
}

func newLimiter(f *Fleet) *Limiter {
	o := f.o
	interval := 60e6 / float64(o.RequestsPerMinute)
	return &Limiter{
		f: f,
		local: ratelimit.New(localShare(o.RequestsPerMinute, o.FleetSize),
			localShare(o.Burst, o.FleetSize), o.MaxTokens),
		script:   newScript(gcraScript),
		prefix:   o.Prefix + "rl:",
		interval: strconv.FormatFloat(interval, 'f', -1, 64),
		burst:    strconv.Itoa(o.Burst),
	}
}

// Allow consumes one unit of tokenID's shared bucket (proxy.RateLimiter):
// one script call, in a pipeline with the concurrent requests' calls.
func (l *Limiter) Allow(tokenID string) (ok bool, retryAfter time.Duration) {
	f := l.f
	if f.down.Load() {
		f.m.fallbackRate.Inc()
		return l.local.Allow(tokenID)
	}
	c := f.batch.script(l.script, []any{nil, nil, 1, l.prefix + tokenID, l.interval, l.burst})
	f.batch.do(c)
	wait, err := c.cmd.Int64()
	f.m.rateSeconds.Observe(time.Since(c.start).Seconds())
	f.batch.put(c)
	if err != nil {
		f.failed("rate_limit", err)
		f.m.fallbackRate.Inc()
		return l.local.Allow(tokenID)
	}
	if wait <= 0 {
		return true, 0
	}
	return false, time.Duration(wait) * time.Microsecond
}
