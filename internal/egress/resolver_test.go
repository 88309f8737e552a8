package egress

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fakeClock lets tests step past TTLs without sleeping.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newTestResolver(t *testing.T, servers ...string) (*Resolver, *fakeClock) {
	t.Helper()
	r := NewResolver(servers, 2*time.Second, 100)
	clk := &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	r.now = clk.now
	return r, clk
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestResolverAnswers(t *testing.T) {
	s := startDNS(t,
		"private.test. 60 IN A 10.0.0.1",
		"both.test. 60 IN AAAA ::1",
		"both.test. 60 IN A 127.0.0.1",
		"alias.test. 60 IN CNAME target.test.",
		"target.test. 60 IN A 127.0.0.5",
		"nodata.test. 60 IN TXT \"no addresses here\"",
	)
	r, _ := newTestResolver(t, s.addr)
	ctx := t.Context()

	tests := []struct {
		host string
		want []netip.Addr
	}{
		{"private.test", addrs("10.0.0.1")},
		{"both.test", addrs("127.0.0.1", "::1")}, // IPv4 first
		{"BOTH.test.", addrs("127.0.0.1", "::1")},
		{"alias.test", addrs("127.0.0.5")},
		{"127.0.0.9", addrs("127.0.0.9")}, // literals need no lookup
	}
	for _, tt := range tests {
		got, err := r.LookupHost(ctx, tt.host)
		if err != nil {
			t.Errorf("LookupHost(%q): %v", tt.host, err)
			continue
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("LookupHost(%q) = %v, want %v", tt.host, got, tt.want)
		}
	}

	for _, host := range []string{"missing.test", "nodata.test"} {
		_, err := r.LookupHost(ctx, host)
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound || de.IsTimeout {
			t.Errorf("LookupHost(%q) = %v, want a not-found *net.DNSError", host, err)
		}
	}
}

// TestResolverIgnoresOutOfChainRecords checks that an answer section cannot
// plant addresses for names other than the one asked (or its CNAME chain).
func TestResolverIgnoresOutOfChainRecords(t *testing.T) {
	s := startDNS(t, "asked.test. 60 IN A 127.0.0.7")
	// Smuggle an extra record for another name into the asked name's answer.
	extra, _ := dns.NewRR("other.test. 60 IN A 10.9.9.9")
	s.addRR("asked.test.", extra)
	r, _ := newTestResolver(t, s.addr)
	got, err := r.LookupHost(t.Context(), "asked.test")
	if err != nil || !slices.Equal(got, addrs("127.0.0.7")) {
		t.Errorf("LookupHost = %v, %v; want only 127.0.0.7", got, err)
	}
}

func TestResolverTTLCache(t *testing.T) {
	s := startDNS(t,
		"cached.test. 60 IN A 127.0.0.1",
		"short.test. 60 IN A 127.0.0.1",
		"short.test. 10 IN AAAA ::1",
	)
	r, clk := newTestResolver(t, s.addr)
	ctx := t.Context()

	for i := range 3 {
		if _, err := r.LookupHost(ctx, "cached.test"); err != nil {
			t.Fatal(err)
		}
		if got := s.count("cached.test", "A"); got != 1 {
			t.Fatalf("after lookup %d: %d A queries, want 1 (cached within TTL)", i+1, got)
		}
		clk.advance(20 * time.Second)
	}
	// 60s after the first answer, the entry has expired.
	if _, err := r.LookupHost(ctx, "cached.test"); err != nil {
		t.Fatal(err)
	}
	if got := s.count("cached.test", "A"); got != 2 {
		t.Errorf("after TTL: %d A queries, want 2", got)
	}

	// The entry lives for the smallest TTL of the answer.
	if _, err := r.LookupHost(ctx, "short.test"); err != nil {
		t.Fatal(err)
	}
	clk.advance(9 * time.Second)
	if _, err := r.LookupHost(ctx, "short.test"); err != nil {
		t.Fatal(err)
	}
	if got := s.count("short.test", "A"); got != 1 {
		t.Errorf("within the smallest TTL: %d A queries, want 1", got)
	}
	clk.advance(2 * time.Second)
	if _, err := r.LookupHost(ctx, "short.test"); err != nil {
		t.Fatal(err)
	}
	if got := s.count("short.test", "A"); got != 2 {
		t.Errorf("past the smallest TTL: %d A queries, want 2", got)
	}
}

func TestResolverNegativeCache(t *testing.T) {
	s := startDNS(t)
	r, clk := newTestResolver(t, s.addr)
	ctx := t.Context()
	for range 3 {
		_, err := r.LookupHost(ctx, "nx.test")
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Fatalf("LookupHost = %v, want not found", err)
		}
	}
	if got := s.count("nx.test", "A"); got != 1 {
		t.Errorf("%d A queries for a cached NXDOMAIN, want 1", got)
	}
	clk.advance(negativeTTL + time.Second)
	_, _ = r.LookupHost(ctx, "nx.test")
	if got := s.count("nx.test", "A"); got != 2 {
		t.Errorf("%d A queries after the negative TTL, want 2", got)
	}
}

func TestResolverCoalesces(t *testing.T) {
	s := startDNS(t, "busy.test. 60 IN A 127.0.0.1")
	r, _ := newTestResolver(t, s.addr)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			if _, err := r.LookupHost(t.Context(), "busy.test"); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := s.count("busy.test", "A"); got != 1 {
		t.Errorf("20 concurrent lookups sent %d A queries, want 1", got)
	}
}

func TestResolverTimeout(t *testing.T) {
	r := NewResolver([]string{blackholeDNS(t)}, 100*time.Millisecond, 10)
	_, err := r.LookupHost(t.Context(), "slow.test")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsTimeout {
		t.Fatalf("LookupHost against a silent server = %v, want a timeout *net.DNSError", err)
	}
	if de.IsNotFound {
		t.Error("a timeout must not look like not-found")
	}
	// A timeout is not cached as an answer: the next lookup asks again and
	// gets the real answer once a server responds.
	s := startDNS(t, "slow.test. 60 IN A 127.0.0.1")
	r.servers = []string{s.addr}
	if _, err := r.LookupHost(t.Context(), "slow.test"); err != nil {
		t.Errorf("lookup after a timeout: %v", err)
	}
}

func TestResolverCallerContext(t *testing.T) {
	r := NewResolver([]string{blackholeDNS(t)}, time.Minute, 10)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := r.LookupHost(ctx, "any.test")
	var de *net.DNSError
	if !errors.As(err, &de) || !errors.Is(err, context.Canceled) {
		t.Errorf("LookupHost with a cancelled context = %v, want a *net.DNSError wrapping context.Canceled", err)
	}
}

func TestResolverFallsBackToNextServer(t *testing.T) {
	bad := startDNS(t)
	bad.setRcode(dns.RcodeServerFailure)
	good := startDNS(t, "fallback.test. 60 IN A 127.0.0.3")
	r, _ := newTestResolver(t, bad.addr, good.addr)
	got, err := r.LookupHost(t.Context(), "fallback.test")
	if err != nil || !slices.Equal(got, addrs("127.0.0.3")) {
		t.Fatalf("LookupHost = %v, %v", got, err)
	}
	if bad.count("fallback.test", "A") != 1 || good.count("fallback.test", "A") != 1 {
		t.Errorf("queries: failing server %d, good server %d; want 1 each",
			bad.count("fallback.test", "A"), good.count("fallback.test", "A"))
	}
}

func TestResolverServfailNotCached(t *testing.T) {
	s := startDNS(t)
	s.setRcode(dns.RcodeServerFailure)
	r, _ := newTestResolver(t, s.addr)
	_, err := r.LookupHost(t.Context(), "broken.test")
	var de *net.DNSError
	if !errors.As(err, &de) || de.IsNotFound || !de.IsTemporary {
		t.Fatalf("SERVFAIL = %v, want a temporary, not not-found, *net.DNSError", err)
	}
	before := s.total()
	_, _ = r.LookupHost(t.Context(), "broken.test")
	if s.total() == before {
		t.Error("a SERVFAIL answer was cached")
	}
}

// TestResolverLocalhost checks that localhost names never reach DNS and
// always mean loopback (RFC 6761).
func TestResolverLocalhost(t *testing.T) {
	s := startDNS(t, "localhost. 60 IN A 8.8.8.8")
	r, _ := newTestResolver(t, s.addr)
	for _, host := range []string{"localhost", "LOCALHOST", "localhost.", "app.localhost"} {
		got, err := r.LookupHost(t.Context(), host)
		if err != nil || !slices.Equal(got, addrs("127.0.0.1", "::1")) {
			t.Errorf("LookupHost(%q) = %v, %v", host, got, err)
		}
	}
	if n := s.total(); n != 0 {
		t.Errorf("%d queries reached DNS for localhost names", n)
	}
}

// TestResolverSystem exercises the system-resolver path with a name every
// system resolves from its hosts file.
func TestResolverSystem(t *testing.T) {
	r := NewResolver(nil, 2*time.Second, 10)
	res := r.lookupSystem(t.Context(), "localhost")
	if res.err != nil {
		t.Skipf("system resolver cannot resolve localhost here: %v", res.err)
	}
	if res.ttl != systemTTL {
		t.Errorf("ttl = %v, want %v", res.ttl, systemTTL)
	}
	for _, a := range res.addrs {
		if !a.IsLoopback() || a.Is4In6() {
			t.Errorf("system resolver gave %v for localhost", a)
		}
	}
}

func TestResolverInvalidName(t *testing.T) {
	s := startDNS(t)
	r, _ := newTestResolver(t, s.addr)
	for _, host := range []string{"", ".", "a..b", "example.com.."} {
		_, err := r.LookupHost(t.Context(), host)
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Errorf("LookupHost(%q) = %v, want not found", host, err)
		}
	}
	if n := s.total(); n != 0 {
		t.Errorf("%d queries sent for invalid names", n)
	}
}
