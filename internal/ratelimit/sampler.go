package ratelimit

import (
	"fmt"
	"net/netip"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"golang.org/x/time/rate"
)

// RefusalSampler bounds what credential-less traffic from one address can
// make the node write. Every refused request without valid credentials
// would otherwise cost a record and a log line, so one client could fill
// disks and the backend at line rate. Each address may write
// recordsPerMinute such records a minute (in bursts of as many); the rest are
// suppressed and counted, and the count rides on the next record that
// passes, or on a summary once the address has been quiet (Sweep). Nothing
// is dropped without a trace.
//
// Addresses are keyed like the failed-authentication throttle (IPv6 by
// /64) and held in a bounded LRU; an address evicted with a pending count
// hands it to the next Sweep.
type RefusalSampler struct {
	limit rate.Limit
	burst int

	mu      sync.Mutex
	cache   *lru.Cache[netip.Addr, *sampleState]
	evicted []Suppressed // pending counts of evicted addresses, for Sweep
	// pending holds the addresses with a count not yet written, so Sweep
	// looks at those alone; it never outgrows the cache.
	pending map[netip.Addr]*sampleState
	now     func() time.Time
}

type sampleState struct {
	bucket     *rate.Limiter
	suppressed int64     // refusals suppressed since the last one written
	last       time.Time // when the last one was suppressed
}

// Suppressed is a count of refusals from one address that were not written.
type Suppressed struct {
	Addr  netip.Addr
	Count int64
}

// NewRefusalSampler returns a sampler allowing recordsPerMinute records per
// address and tracking at most maxIPs addresses. It panics if either is
// less than 1.
func NewRefusalSampler(recordsPerMinute, maxIPs int) *RefusalSampler {
	mustPositive("NewRefusalSampler", "recordsPerMinute", recordsPerMinute)
	mustPositive("NewRefusalSampler", "maxIPs", maxIPs)
	s := &RefusalSampler{limit: perMinute(recordsPerMinute), burst: recordsPerMinute, now: time.Now, pending: make(map[netip.Addr]*sampleState)}
	cache, err := lru.NewWithEvict(maxIPs, func(k netip.Addr, v *sampleState) {
		// Called with s.mu held (every cache call is made under it).
		if v.suppressed > 0 {
			delete(s.pending, k)
			s.evicted = append(s.evicted, Suppressed{Addr: k, Count: v.suppressed})
		}
	})
	if err != nil {
		panic(fmt.Sprintf("ratelimit: creating sampler cache of %d entries: %v", maxIPs, err))
	}
	s.cache = cache
	return s
}

// Allow reports whether a refusal from ip may be written now. When it may,
// suppressedBefore is how many from the same address were suppressed since
// the last one written: the caller puts it on this record.
func (s *RefusalSampler) Allow(ip netip.Addr) (ok bool, suppressedBefore int64) {
	key := throttleKey(ip)
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	st, found := s.cache.Get(key)
	if !found {
		st = &sampleState{bucket: rate.NewLimiter(s.limit, s.burst)}
		s.cache.Add(key, st)
	}
	if !st.bucket.AllowN(now, 1) {
		st.suppressed++
		st.last = now
		s.pending[key] = st
		return false, 0
	}
	n := st.suppressed
	if n > 0 {
		st.suppressed = 0
		delete(s.pending, key)
	}
	return true, n
}

// Sweep returns the pending counts of addresses that have suppressed
// nothing for at least quiet (their flood is over, so no later record would
// carry the count) and of evicted addresses, and clears them.
func (s *RefusalSampler) Sweep(quiet time.Duration) []Suppressed {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.evicted
	s.evicted = nil
	for k, st := range s.pending {
		if now.Sub(st.last) >= quiet {
			out = append(out, Suppressed{Addr: k, Count: st.suppressed})
			st.suppressed = 0
			delete(s.pending, k)
		}
	}
	return out
}
