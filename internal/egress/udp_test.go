package egress

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

// udpPolicy is a policy allowing loopback, with ALLOWED_UDP_PORTS udp.
func udpPolicy(t *testing.T, udp string) *Policy {
	t.Helper()
	p := newPolicy(t, "127.0.0.0/8", "", defaultPorts)
	ps, err := config.ParsePortSet(udp)
	if err != nil {
		t.Fatal(err)
	}
	p.SetUDPPorts(ps)
	return p
}

// udpEcho answers every datagram with the same bytes and returns its port.
func udpEcho(t *testing.T) uint16 {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(b[:n], from)
		}
	}()
	return uint16(pc.LocalAddr().(*net.UDPAddr).Port)
}

func TestUDPPortsAreSeparateFromTCP(t *testing.T) {
	p := newPolicy(t, "127.0.0.0/8", "", defaultPorts)
	ap := netip.MustParseAddrPort("127.0.0.1:5353")
	if err := p.Check(ap); err != nil {
		t.Fatalf("TCP check: %v", err)
	}
	// Closed until SetUDPPorts: a policy built without it allows no flow.
	var de *DeniedError
	if err := p.CheckUDP(ap); !errors.As(err, &de) || de.Reason != ReasonPort {
		t.Fatalf("UDP before SetUDPPorts: %v", err)
	}
	p = udpPolicy(t, "53,443")
	if err := p.CheckUDP(netip.MustParseAddrPort("127.0.0.1:53")); err != nil {
		t.Fatalf("UDP 53: %v", err)
	}
	if err := p.CheckUDP(ap); !errors.As(err, &de) || de.Reason != ReasonPort {
		t.Fatalf("UDP 5353 with ALLOWED_UDP_PORTS=53,443: %v", err)
	}
	// The address rules are the TCP ones.
	if err := p.CheckUDP(netip.MustParseAddrPort("10.0.0.1:53")); !errors.As(err, &de) || de.Reason != "private address" {
		t.Fatalf("UDP to a private address: %v", err)
	}
	if err := p.CheckTargetUDP(Target{Host: "example.com", Port: 123}); !errors.As(err, &de) || de.Reason != ReasonPort {
		t.Fatalf("UDP name on port 123: %v", err)
	}
}

func TestDialUDPConnectedToCheckedAddress(t *testing.T) {
	port := udpEcho(t)
	s := startDNS(t, "echo.test. 60 IN A 127.0.0.1", "private.test. 60 IN A 10.1.2.3")
	d := newDialer(t, udpPolicy(t, "1024-65535"), s.addr)
	c, err := d.DialUDP(t.Context(), Target{Host: "echo.test", Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String() {
		t.Fatalf("connected to %s", got)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 16)
	n, err := c.Read(b)
	if err != nil || string(b[:n]) != "ping" {
		t.Fatalf("echo: %q, %v", b[:n], err)
	}

	_, err = d.DialUDP(t.Context(), Target{Host: "private.test", Port: port})
	wantDenied(t, err, "private address", "private.test")
	before := s.total()
	_, err = d.DialUDP(t.Context(), Target{Host: "echo.test", Port: 123})
	wantDenied(t, err, ReasonPort, "echo.test")
	if s.total() != before {
		t.Fatal("a port refused by ALLOWED_UDP_PORTS was looked up in DNS")
	}
}

func TestControlHookUDP(t *testing.T) {
	p := udpPolicy(t, "53")
	want := netip.MustParseAddrPort("127.0.0.1:53")
	ctl := p.controlUDP(want)
	if err := ctl("udp4", "127.0.0.1:53", nil); err != nil {
		t.Errorf("checked address refused: %v", err)
	}
	if err := ctl("udp4", "127.0.0.2:53", nil); err == nil {
		t.Error("a different socket address than the checked one was allowed")
	}
	if err := ctl("tcp4", "127.0.0.1:53", nil); err == nil {
		t.Error("tcp allowed by the UDP hook")
	}
	if err := p.controlUDP(netip.MustParseAddrPort("10.0.0.1:53"))("udp4", "10.0.0.1:53", nil); err == nil {
		t.Error("denied address through the UDP hook")
	}
}
