// Package ratelimit protects a proxy node from any single client: a token
// bucket per API token (SPEC §3), a cap on concurrent tunnels per token, a
// throttle on failed authentications per client address, and a cap on open
// client connections.
//
// The token buckets are golang.org/x/time/rate limiters kept in a bounded
// github.com/hashicorp/golang-lru/v2 cache, so memory stays bounded however
// many distinct tokens or addresses a node sees. A key evicted from the cache
// comes back with a full bucket; the cache is sized so that only keys idle
// for a long time are evicted, and an idle bucket would have refilled anyway.
package ratelimit

import (
	"fmt"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/time/rate"
)

// Limiter is a token bucket per token ID, the keys held in a bounded LRU.
// Each Allow consumes one unit: one per HTTP/1.1 request, per HTTP/2 stream
// and per CONNECT. It is safe for concurrent use and does not allocate for a
// token it already holds, because it sits on every request's path.
type Limiter struct {
	buckets *bucketSet[string]

	// now is time.Now outside tests; tests replace it to refill buckets
	// deterministically instead of sleeping.
	now func() time.Time
}

// New returns a Limiter whose buckets refill at requestsPerMinute units per
// minute and hold at most burst units, keeping at most maxTokens buckets.
// It panics if any argument is less than 1: the configuration layer
// validates them, so a bad value here is a programming error.
func New(requestsPerMinute, burst, maxTokens int) *Limiter {
	mustPositive("New", "requestsPerMinute", requestsPerMinute)
	mustPositive("New", "burst", burst)
	mustPositive("New", "maxTokens", maxTokens)
	return &Limiter{
		buckets: newBucketSet[string](perMinute(requestsPerMinute), burst, maxTokens),
		now:     time.Now,
	}
}

// Allow consumes one unit from tokenID's bucket. When the bucket is empty it
// returns false and how long until one unit is available; the caller turns
// that into a Retry-After header (rounding up to whole seconds). A refused
// request consumes nothing, so a client hammering the proxy while limited
// does not push its own recovery further away.
func (l *Limiter) Allow(tokenID string) (ok bool, retryAfter time.Duration) {
	now := l.now()
	b := l.buckets.getOrCreate(tokenID)
	// AllowN leaves the bucket untouched when it refuses, unlike a
	// reservation, which would have to be cancelled and, under concurrency,
	// cannot always give back everything it took.
	if b.AllowN(now, 1) {
		return true, 0
	}
	return false, untilOneToken(b, now)
}

// Len reports how many token buckets are held.
func (l *Limiter) Len() int { return l.buckets.len() }

// bucketSet is a bounded set of token buckets, one per key, sharing one
// refill rate and capacity.
type bucketSet[K comparable] struct {
	limit rate.Limit
	burst int
	cache *lru.Cache[K, *rate.Limiter]
}

func newBucketSet[K comparable](limit rate.Limit, burst, maxKeys int) *bucketSet[K] {
	cache, err := lru.New[K, *rate.Limiter](maxKeys)
	if err != nil {
		// Only a non-positive size fails, which the callers rule out.
		panic(fmt.Sprintf("ratelimit: creating bucket cache of %d entries: %v", maxKeys, err))
	}
	return &bucketSet[K]{limit: limit, burst: burst, cache: cache}
}

// get returns key's bucket, marking it recently used, or nil if there is none.
func (s *bucketSet[K]) get(key K) *rate.Limiter {
	b, _ := s.cache.Get(key)
	return b
}

// getOrCreate returns key's bucket, creating a full one if there is none.
func (s *bucketSet[K]) getOrCreate(key K) *rate.Limiter {
	if b, ok := s.cache.Get(key); ok {
		return b
	}
	// Two goroutines may both miss; PeekOrAdd makes them agree on one bucket
	// so that neither's consumption is lost.
	fresh := rate.NewLimiter(s.limit, s.burst)
	if prev, ok, _ := s.cache.PeekOrAdd(key, fresh); ok {
		return prev
	}
	return fresh
}

func (s *bucketSet[K]) len() int { return s.cache.Len() }

// untilOneToken is how long until b holds one whole unit, as seen at now.
// It is always positive: when another goroutine has meanwhile moved the
// bucket's clock on, the bucket may already hold a unit again, and "retry
// immediately" is still best expressed as the shortest possible wait.
func untilOneToken(b *rate.Limiter, now time.Time) time.Duration {
	missing := 1 - b.TokensAt(now)
	d := time.Duration(missing / float64(b.Limit()) * float64(time.Second))
	if d <= 0 {
		return time.Nanosecond
	}
	return d
}

// perMinute converts a per-minute count into rate's per-second Limit.
func perMinute(n int) rate.Limit { return rate.Limit(float64(n) / 60) }

func mustPositive(fn, name string, v int) {
	if v < 1 {
		panic(fmt.Sprintf("ratelimit.%s: %s must be at least 1, got %d", fn, name, v))
	}
}
