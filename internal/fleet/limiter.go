package fleet

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// gcraScript takes one unit from a token's bucket, as GCRA: the bucket is
// one number, the theoretical arrival time (TAT) of the next unit, in
// microseconds of Redis's clock, so node clocks never enter a decision.
// A bucket of capacity B refilling one unit every I microseconds admits a
// request at now when TAT + I - B*I <= now. A refused request changes
// nothing (as in ratelimit.Limiter). The key expires when TAT is reached,
// which is exactly when the bucket is full again and the key says nothing.
//
// KEYS[1] the bucket; ARGV[1] I (microseconds per unit); ARGV[2] B.
// Returns 0 when allowed, else the microseconds until one unit is free.
const gcraScript = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tonumber(ARGV[2]) * interval - now
if wait > 0 then return math.max(1, math.ceil(wait)) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return 0
`

// Limiter is RATE_LIMIT_REQUESTS_PER_MINUTE and RATE_LIMIT_BURST_SIZE per
// token shared by every node on one Redis: one atomic script per decision.
// While Redis is away it decides with a local bucket of the limit and the
// burst divided by FLEET_SIZE.
type Limiter struct {
	f      *Fleet
	local  *ratelimit.Limiter
	script *redis.Script
	prefix string
	args   []any // interval, burst: the same for every call
}

func newLimiter(f *Fleet) *Limiter {
	o := f.o
	interval := 60e6 / float64(o.RequestsPerMinute)
	return &Limiter{
		f: f,
		local: ratelimit.New(localShare(o.RequestsPerMinute, o.FleetSize),
			localShare(o.Burst, o.FleetSize), o.MaxTokens),
		script: redis.NewScript(gcraScript),
		prefix: o.Prefix + "rl:",
		args:   []any{strconv.FormatFloat(interval, 'f', -1, 64), strconv.Itoa(o.Burst)},
	}
}

// Allow consumes one unit of tokenID's shared bucket (proxy.RateLimiter).
func (l *Limiter) Allow(tokenID string) (ok bool, retryAfter time.Duration) {
	f := l.f
	if f.down.Load() {
		f.m.fallbackRate.Inc()
		return l.local.Allow(tokenID)
	}
	// Inline rather than through f.call: this runs on every request.
	ctx, cancel := context.WithTimeout(context.Background(), f.o.Timeout)
	start := time.Now()
	wait, err := l.script.Run(ctx, f.client, []string{l.prefix + tokenID}, l.args...).Int64()
	f.m.rateSeconds.Observe(time.Since(start).Seconds())
	cancel()
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
