package ratelimit

import (
	"net/netip"
	"time"
)

// AuthThrottle limits failed authentications per client address, so that a
// client cannot guess or replay credentials at line rate. Each address has a
// token bucket that only failures drain; while it is empty the proxy answers
// 429 before even parsing the credentials, so a throttled client costs no
// signature checks.
//
// IPv6 clients are keyed by their /64: a single host usually controls a whole
// /64, so keying by full address would let it walk through fresh buckets (and
// flush the cache) at will. IPv4 clients, including IPv4-mapped IPv6
// addresses, are keyed by address.
type AuthThrottle struct {
	buckets *bucketSet[netip.Addr]

	// now is time.Now outside tests.
	now func() time.Time
}

// NewAuthThrottle returns an AuthThrottle allowing failuresPerMinute failed
// authentications per minute per address, in bursts of up to
// failuresPerMinute, and tracking at most maxIPs addresses. It panics if
// either argument is less than 1.
func NewAuthThrottle(failuresPerMinute, maxIPs int) *AuthThrottle {
	mustPositive("NewAuthThrottle", "failuresPerMinute", failuresPerMinute)
	mustPositive("NewAuthThrottle", "maxIPs", maxIPs)
	return &AuthThrottle{
		buckets: newBucketSet[netip.Addr](perMinute(failuresPerMinute), failuresPerMinute, maxIPs),
		now:     time.Now,
	}
}

// Allowed reports whether ip may attempt authentication now. It consumes
// nothing, and an address with no recorded failures takes no memory.
func (a *AuthThrottle) Allowed(ip netip.Addr) bool {
	b := a.buckets.get(throttleKey(ip))
	return b == nil || b.TokensAt(a.now()) >= 1
}

// Failed records one failed authentication from ip.
func (a *AuthThrottle) Failed(ip netip.Addr) {
	// AllowN consumes a unit if there is one. Failures that were already in
	// flight when the bucket emptied are not carried as debt: the address is
	// refused before authenticating from now on, which is what matters.
	a.buckets.getOrCreate(throttleKey(ip)).AllowN(a.now(), 1)
}

// throttleKey maps an address to the key its failures are counted under.
func throttleKey(ip netip.Addr) netip.Addr {
	ip = ip.Unmap()
	if ip.Is6() {
		// Prefix fails only for an invalid address or bit count; 64 is
		// valid for every IPv6 address.
		if p, err := ip.Prefix(64); err == nil {
			return p.Addr()
		}
	}
	return ip.WithZone("")
}
