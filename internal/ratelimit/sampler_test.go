package ratelimit

import (
	"net/netip"
	"testing"
	"time"
)

func TestRefusalSamplerCountsWhatItSuppresses(t *testing.T) {
	s := NewRefusalSampler(3, 10)
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	a := netip.MustParseAddr("192.0.2.1")
	b := netip.MustParseAddr("192.0.2.2")

	for i := 0; i < 3; i++ {
		if ok, n := s.Allow(a); !ok || n != 0 {
			t.Fatalf("refusal %d = %v, %d; want written, 0 before", i, ok, n)
		}
	}
	for i := 0; i < 5; i++ {
		if ok, _ := s.Allow(a); ok {
			t.Fatalf("refusal %d over the budget was written", i+3)
		}
	}
	// Another address has its own budget.
	if ok, _ := s.Allow(b); !ok {
		t.Fatal("a second address was suppressed by the first one's flood")
	}
	// 20 s later one unit has refilled (3 a minute): the next record
	// carries the five suppressed.
	now = now.Add(20 * time.Second)
	if ok, n := s.Allow(a); !ok || n != 5 {
		t.Fatalf("after refill = %v, %d; want written carrying 5", ok, n)
	}
	if got := s.Sweep(0); len(got) != 0 {
		t.Fatalf("sweep after the count was written = %v, want nothing", got)
	}

	// A flood that stops: its count is handed to Sweep once quiet.
	s.Allow(a)
	s.Allow(a)
	if got := s.Sweep(10 * time.Second); len(got) != 0 {
		t.Fatalf("sweep while the flood is fresh = %v, want nothing", got)
	}
	now = now.Add(10 * time.Second)
	got := s.Sweep(10 * time.Second)
	if len(got) != 1 || got[0].Addr != a || got[0].Count != 2 {
		t.Fatalf("sweep = %v, want 2 for %v", got, a)
	}
	if got := s.Sweep(0); len(got) != 0 {
		t.Fatalf("second sweep = %v, want nothing (counted once)", got)
	}
}

func TestRefusalSamplerEvictionKeepsCounts(t *testing.T) {
	s := NewRefusalSampler(1, 2)
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	a := netip.MustParseAddr("2001:db8::1")
	s.Allow(a)
	s.Allow(a)
	s.Allow(netip.MustParseAddr("2001:db8::2")) // same /64: same key
	// Two more addresses push a's entry out of the two-entry cache.
	s.Allow(netip.MustParseAddr("192.0.2.1"))
	s.Allow(netip.MustParseAddr("192.0.2.2"))
	got := s.Sweep(time.Hour)
	if len(got) != 1 || got[0].Count != 2 || got[0].Addr != netip.MustParseAddr("2001:db8::") {
		t.Fatalf("sweep after eviction = %v, want 2 for 2001:db8::", got)
	}
	if n := len(s.pending); n != 0 {
		t.Fatalf("%d addresses pending after the sweep, want 0", n)
	}
}
