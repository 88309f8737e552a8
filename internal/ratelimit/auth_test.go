package ratelimit

import (
	"net/netip"
	"testing"
	"time"
)

func newTestAuthThrottle(perMinute, maxIPs int) (*AuthThrottle, *fakeClock) {
	clk := newFakeClock()
	a := NewAuthThrottle(perMinute, maxIPs)
	a.now = clk.Now
	return a, clk
}

func TestAuthThrottlePerIP(t *testing.T) {
	a, clk := newTestAuthThrottle(3, 100) // one failure refilled per 20s
	ip := netip.MustParseAddr("192.0.2.1")
	other := netip.MustParseAddr("192.0.2.2")

	// Allowed consumes nothing: many checks, still three failures to go.
	for range 10 {
		if !a.Allowed(ip) {
			t.Fatal("fresh address not allowed")
		}
	}
	for i := range 3 {
		if !a.Allowed(ip) {
			t.Fatalf("throttled after %d failures, want after 3", i)
		}
		a.Failed(ip)
	}
	if a.Allowed(ip) {
		t.Fatal("allowed after 3 failures with a limit of 3 per minute")
	}
	if !a.Allowed(other) {
		t.Fatal("another address throttled by ip's failures")
	}

	clk.Advance(19 * time.Second)
	if a.Allowed(ip) {
		t.Fatal("allowed before one failure's worth had refilled")
	}
	clk.Advance(time.Second)
	if !a.Allowed(ip) {
		t.Fatal("not allowed after one failure's worth (20s) had refilled")
	}
	a.Failed(ip)
	if a.Allowed(ip) {
		t.Fatal("allowed again right after the refilled attempt failed")
	}
}

func TestAuthThrottleOnlyFailuresTakeMemory(t *testing.T) {
	a, _ := newTestAuthThrottle(3, 100)
	for i := range 50 {
		a.Allowed(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}))
	}
	if n := a.buckets.len(); n != 0 {
		t.Fatalf("%d buckets held after checks alone, want 0", n)
	}
}

func TestAuthThrottleLRUBounded(t *testing.T) {
	a, _ := newTestAuthThrottle(1, 4)
	for i := range 20 {
		a.Failed(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}))
	}
	if n := a.buckets.len(); n != 4 {
		t.Fatalf("%d buckets held with maxIPs 4, want 4", n)
	}
	if a.Allowed(netip.AddrFrom4([4]byte{198, 51, 100, 19})) {
		t.Error("most recent failing address not throttled")
	}
	if !a.Allowed(netip.AddrFrom4([4]byte{198, 51, 100, 0})) {
		t.Error("evicted address still throttled")
	}
}

func TestAuthThrottleKeys(t *testing.T) {
	a, _ := newTestAuthThrottle(1, 100)

	// Addresses in one IPv6 /64 share a bucket.
	a.Failed(netip.MustParseAddr("2001:db8:1:2::1"))
	if a.Allowed(netip.MustParseAddr("2001:db8:1:2:ffff::9")) {
		t.Error("address in the same /64 not throttled")
	}
	if a.Allowed(netip.MustParseAddr("fe80::1%eth0")) == false {
		t.Error("unrelated link-local address throttled")
	}
	if !a.Allowed(netip.MustParseAddr("2001:db8:1:3::1")) {
		t.Error("address in a different /64 throttled")
	}

	// An IPv4-mapped IPv6 address is the IPv4 address.
	a.Failed(netip.MustParseAddr("::ffff:192.0.2.7"))
	if a.Allowed(netip.MustParseAddr("192.0.2.7")) {
		t.Error("IPv4 address not throttled after failures from its mapped form")
	}
	// IPv4 addresses are not grouped.
	if !a.Allowed(netip.MustParseAddr("192.0.2.8")) {
		t.Error("neighbouring IPv4 address throttled")
	}
}
