package egress

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// listen opens a TCP listener on a loopback address and returns it with its
// port.
func listen(t *testing.T, addr string) (net.Listener, uint16) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	return ln, uint16(ln.Addr().(*net.TCPAddr).Port)
}

// assertNoEarlierConnection proves that nothing connected to ln before now:
// it connects itself and checks that the first connection waiting in the
// accept queue (which is FIFO) is its own.
func assertNoEarlierConnection(t *testing.T, ln net.Listener) {
	t.Helper()
	probe, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	first, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if first.RemoteAddr().String() != probe.LocalAddr().String() {
		t.Errorf("a connection from %s reached the listener before the probe: the denied dial connected", first.RemoteAddr())
	}
}

func newDialer(t *testing.T, p *Policy, servers ...string) *Dialer {
	t.Helper()
	return NewDialer(DialerOptions{Policy: p, Resolver: NewResolver(servers, 2*time.Second, 100), Timeout: 5 * time.Second})
}

func wantDenied(t *testing.T, err error, reason, host string) {
	t.Helper()
	var de *DeniedError
	if !errors.As(err, &de) {
		t.Fatalf("err = %T %v, want *DeniedError", err, err)
	}
	if de.Reason != reason || de.Host != host {
		t.Errorf("denied with reason %q host %q, want %q, %q", de.Reason, de.Host, reason, host)
	}
}

func TestDialNameResolvingToPrivateIsDenied(t *testing.T) {
	s := startDNS(t, "private.test. 60 IN A 10.0.0.1", "meta.test. 60 IN A 169.254.169.254")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts), s.addr)
	_, err := d.DialContext(t.Context(), "tcp", "private.test:443")
	wantDenied(t, err, "private address", "private.test")
	_, err = d.DialTarget(t.Context(), Target{Host: "meta.test", Port: 80})
	wantDenied(t, err, "link-local address", "meta.test")
}

func TestDialNameResolvingToLoopbackListener(t *testing.T) {
	ln, port := listen(t, "127.0.0.1:0")
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte("hello"))
		_ = c.Close()
	}()
	s := startDNS(t, "svc.test. 60 IN A 127.0.0.1")
	m := metrics.New()
	d := NewDialer(DialerOptions{
		Policy:   newPolicy(t, "127.0.0.0/8", "", defaultPorts),
		Resolver: NewResolver([]string{s.addr}, 2*time.Second, 100),
		Metrics:  m,
	})
	conn, err := d.DialContext(t.Context(), "tcp", "svc.test:"+strconv.Itoa(int(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got, err := io.ReadAll(conn)
	if err != nil || string(got) != "hello" {
		t.Errorf("read %q, %v from the listener", got, err)
	}
	if !hasHistogramSamples(t, m, 1) {
		t.Error("DialSeconds did not observe the dial")
	}
	// Upstream sockets carry no TCP keepalive (dialAddr says why).
	raw, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	keepalive := -1
	_ = raw.Control(func(fd uintptr) {
		keepalive, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
	})
	if err != nil || keepalive != 0 {
		t.Errorf("SO_KEEPALIVE on the upstream socket = %d, %v; want 0", keepalive, err)
	}
}

func hasHistogramSamples(t *testing.T, m *metrics.Metrics, want uint64) bool {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "pinaka_upstream_dial_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount() == want
		}
	}
	return false
}

// TestDialSkipsDeniedAddresses checks that of a name's addresses only the
// allowed ones are dialed.
func TestDialSkipsDeniedAddresses(t *testing.T) {
	ln, port := listen(t, "127.0.0.1:0")
	s := startDNS(t, "mixed.test. 60 IN A 10.0.0.1", "mixed.test. 60 IN A 127.0.0.1")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts), s.addr)
	conn, err := d.DialTarget(t.Context(), Target{Host: "mixed.test", Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := conn.RemoteAddr().(*net.TCPAddr).AddrPort(); got.Addr().Unmap() != netip.MustParseAddr("127.0.0.1") {
		t.Errorf("connected to %v", got)
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestDialDenyCIDRNoConnection proves no connection reaches a denied
// listener, whichever way its address is spelled.
func TestDialDenyCIDRNoConnection(t *testing.T) {
	ln, port := listen(t, "127.0.0.2:0")
	p := strconv.Itoa(int(port))
	s := startDNS(t, "denied.test. 60 IN A 127.0.0.2")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "127.0.0.2/32", defaultPorts), s.addr)
	for _, addr := range []string{"denied.test:" + p, "127.0.0.2:" + p, "0x7f.0.0.2:" + p, "2130706434:" + p, "[::ffff:127.0.0.2]:" + p} {
		_, err := d.DialContext(t.Context(), "tcp", addr)
		var de *DeniedError
		if !errors.As(err, &de) || de.Reason != ReasonDenyCIDRs {
			t.Errorf("DialContext(%q) = %v, want denied by EGRESS_DENY_CIDRS", addr, err)
		}
	}
	assertNoEarlierConnection(t, ln)
}

// TestDialLocalhostDenied checks that localhost in any spelling is refused as
// loopback under the default policy, and never connected to.
func TestDialLocalhostDenied(t *testing.T) {
	ln, port := listen(t, "127.0.0.1:0")
	p := strconv.Itoa(int(port))
	s := startDNS(t)
	d := newDialer(t, newPolicy(t, "", "", defaultPorts), s.addr)
	for _, addr := range []string{"localhost:" + p, "localhost.:" + p, "LOCALHOST:" + p, "x.localhost:" + p, "127.1:" + p, "[::1]:" + p} {
		_, err := d.DialContext(t.Context(), "tcp", addr)
		var de *DeniedError
		if !errors.As(err, &de) || de.Reason != "loopback address" {
			t.Errorf("DialContext(%q) = %v, want denied as loopback", addr, err)
		}
	}
	assertNoEarlierConnection(t, ln)
	if n := s.total(); n != 0 {
		t.Errorf("%d DNS queries for localhost names", n)
	}
}

func TestDialSelfDenied(t *testing.T) {
	ln, port := listen(t, "127.0.0.1:0")
	pol := newPolicy(t, "127.0.0.0/8", "", defaultPorts)
	pol.AddSelf(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port))
	d := newDialer(t, pol)
	_, err := d.DialContext(t.Context(), "tcp", ln.Addr().String())
	wantDenied(t, err, ReasonSelf, "127.0.0.1")
	assertNoEarlierConnection(t, ln)
}

func TestDialPortDeniedBeforeLookup(t *testing.T) {
	s := startDNS(t, "svc.test. 60 IN A 127.0.0.1")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts), s.addr)
	_, err := d.DialContext(t.Context(), "tcp", "svc.test:22")
	wantDenied(t, err, ReasonPort, "svc.test")
	if n := s.total(); n != 0 {
		t.Errorf("%d DNS queries for a target refused on its port", n)
	}
}

func TestDialMalformed(t *testing.T) {
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts))
	for _, addr := range []string{"[127.0.0.1]:80", "user@127.0.0.1:80", "127.0.0.1", "127.0.0.1:0", "[fe80::1%lo]:80"} {
		_, err := d.DialContext(t.Context(), "tcp", addr)
		var te *TargetError
		if !errors.As(err, &te) {
			t.Errorf("DialContext(%q) = %v, want *TargetError", addr, err)
		}
	}
	if _, err := d.DialContext(t.Context(), "udp", "127.0.0.1:1024"); err == nil {
		t.Error("udp dial allowed")
	}
}

func TestDialConnectionRefused(t *testing.T) {
	ln, port := listen(t, "127.0.0.1:0")
	ln.Close()
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts))
	_, err := d.DialTarget(t.Context(), Target{Host: "127.0.0.1", Port: port, Addr: netip.MustParseAddr("127.0.0.1")})
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("err = %v, want ECONNREFUSED through the wrapping", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || ne.Timeout() {
		t.Errorf("err = %v: want a net.Error that is not a timeout", err)
	}
}

func TestDialDNSErrors(t *testing.T) {
	s := startDNS(t, "v6only.test. 60 IN AAAA ::1")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8 ::1/128", "", defaultPorts), s.addr)
	_, err := d.DialContext(t.Context(), "tcp", "nx.test:443")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("unknown name: %v, want not-found *net.DNSError", err)
	}
	_, err = d.DialContext(t.Context(), "tcp4", "v6only.test:443")
	if !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("tcp4 to an IPv6-only name: %v, want not-found *net.DNSError", err)
	}

	slow := NewDialer(DialerOptions{
		Policy:   newPolicy(t, "127.0.0.0/8", "", defaultPorts),
		Resolver: NewResolver([]string{blackholeDNS(t)}, 100*time.Millisecond, 10),
	})
	_, err = slow.DialContext(t.Context(), "tcp", "slow.test:443")
	if !errors.As(err, &de) || !de.IsTimeout {
		t.Errorf("silent DNS server: %v, want a timeout *net.DNSError", err)
	}
}

func TestDialContextCancelled(t *testing.T) {
	_, port := listen(t, "127.0.0.1:0")
	d := newDialer(t, newPolicy(t, "127.0.0.0/8", "", defaultPorts))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := d.DialContext(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(int(port)))
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled dial: %v, want context.Canceled", err)
	}
}

func TestNewDialerRequiresPolicy(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("NewDialer without a Policy did not panic")
		}
	}()
	NewDialer(DialerOptions{})
}
