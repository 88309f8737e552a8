package egress

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

const defaultPorts = "80,443,1024-65535"

func newPolicy(t testing.TB, allow, deny, ports string) *Policy {
	t.Helper()
	ps, err := config.ParsePortSet(ports)
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPolicy(prefixes(t, allow), prefixes(t, deny), ps)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func prefixes(t testing.TB, list string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, s := range strings.Fields(list) {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// checkReason returns "" when ap is allowed, else the denial reason.
func checkReason(t *testing.T, p *Policy, ap netip.AddrPort) string {
	t.Helper()
	err := p.Check(ap)
	if err == nil {
		return ""
	}
	var de *DeniedError
	if !errors.As(err, &de) {
		t.Fatalf("Check(%v) = %T %v, want *DeniedError", ap, err, err)
	}
	if de.Addr != ap {
		t.Errorf("DeniedError.Addr = %v, want %v", de.Addr, ap)
	}
	if err.Error() != "destination not allowed: "+de.Reason {
		t.Errorf("Error() = %q", err.Error())
	}
	return de.Reason
}

// TestCheckAddressSpace walks every special-purpose range, in both families,
// at its edges and inside, and the public addresses just outside them.
func TestCheckAddressSpace(t *testing.T) {
	const (
		allowed      = ""
		private      = "private address"
		loopback     = "loopback address"
		linkLocal    = "link-local address"
		unspecified  = "unspecified address"
		cgnat        = "shared address (CGNAT)"
		documentaton = "documentation address"
		multicast    = "multicast address"
		reserved     = "reserved address"
		ietf         = "IETF protocol assignment"
		as112        = "AS112 address"
		nat64        = "NAT64 address"
		sixToFour    = "6to4 address"
		teredo       = "Teredo address"
		ula          = "unique local address"
		compat       = "IPv4-compatible IPv6 address"
	)
	tests := []struct {
		addr   string
		reason string
	}{
		// IPv4 special-purpose ranges.
		{"0.0.0.0", unspecified}, {"0.1.2.3", unspecified}, {"0.255.255.255", unspecified},
		{"10.0.0.0", private}, {"10.0.0.1", private}, {"10.255.255.255", private},
		{"100.64.0.0", cgnat}, {"100.100.100.100", cgnat}, {"100.127.255.255", cgnat},
		{"127.0.0.0", loopback}, {"127.0.0.1", loopback}, {"127.255.255.255", loopback},
		{"169.254.0.0", linkLocal}, {"169.254.169.254", linkLocal}, {"169.254.255.255", linkLocal},
		{"172.16.0.0", private}, {"172.20.1.1", private}, {"172.31.255.255", private},
		{"192.0.0.0", ietf}, {"192.0.0.8", ietf}, {"192.0.0.255", ietf},
		{"192.0.2.0", documentaton}, {"192.0.2.255", documentaton},
		{"192.31.196.1", as112}, {"192.175.48.255", as112},
		{"192.52.193.1", "AMT address"},
		{"192.88.99.0", "6to4 relay address"}, {"192.88.99.255", "6to4 relay address"},
		{"192.168.0.0", private}, {"192.168.1.1", private}, {"192.168.255.255", private},
		{"198.18.0.0", "benchmarking address"}, {"198.19.255.255", "benchmarking address"},
		{"198.51.100.0", documentaton}, {"198.51.100.255", documentaton},
		{"203.0.113.0", documentaton}, {"203.0.113.255", documentaton},
		{"224.0.0.0", multicast}, {"224.0.0.251", multicast}, {"239.255.255.255", multicast},
		{"240.0.0.0", reserved}, {"250.1.2.3", reserved}, {"255.255.255.254", reserved},
		{"255.255.255.255", "broadcast address"},
		// Public IPv4, including the neighbours of special ranges.
		{"8.8.8.8", allowed}, {"1.1.1.1", allowed}, {"1.0.0.0", allowed},
		{"9.255.255.255", allowed}, {"11.0.0.0", allowed},
		{"100.63.255.255", allowed}, {"100.128.0.0", allowed},
		{"126.255.255.255", allowed}, {"128.0.0.0", allowed},
		{"169.253.255.255", allowed}, {"169.255.0.0", allowed},
		{"172.15.255.255", allowed}, {"172.32.0.0", allowed},
		{"192.0.1.255", allowed}, {"192.0.3.0", allowed},
		{"192.167.255.255", allowed}, {"192.169.0.0", allowed},
		{"198.17.255.255", allowed}, {"198.20.0.0", allowed},
		{"223.255.255.255", allowed},

		// IPv6 special-purpose ranges.
		{"::", unspecified},
		{"::1", loopback},
		{"::ffff:0.0.0.0", unspecified},
		{"::ffff:127.0.0.1", loopback},
		{"::ffff:10.0.0.1", private},
		{"::ffff:169.254.169.254", linkLocal},
		{"::ffff:8.8.8.8", ReasonMapped},
		{"::ffff:255.255.255.255", "broadcast address"},
		{"::7f00:1", compat}, {"::808:808", compat}, {"::2", compat},
		{"64:ff9b::", nat64}, {"64:ff9b::7f00:1", nat64}, {"64:ff9b::808:808", nat64}, {"64:ff9b::ffff:ffff", nat64},
		{"64:ff9b:1::", nat64}, {"64:ff9b:1::1", nat64}, {"64:ff9b:1:ffff:ffff:ffff:ffff:ffff", nat64},
		{"100::", "discard-only address"}, {"100::ffff:ffff:ffff:ffff", "discard-only address"},
		{"2001::", teredo}, {"2001::1", teredo}, {"2001:0:ffff:ffff:ffff:ffff:ffff:ffff", teredo},
		{"2001:1::1", ietf}, {"2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", ietf},
		{"2001:db8::", documentaton}, {"2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", documentaton},
		{"2002::", sixToFour}, {"2002:7f00:1::1", sixToFour}, {"2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", sixToFour},
		{"2620:4f:8000::1", as112},
		{"3fff::", documentaton}, {"3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", documentaton},
		{"fc00::", ula}, {"fd12:3456::1", ula}, {"fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ula},
		{"fe80::", linkLocal}, {"fe80::1", linkLocal}, {"febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", linkLocal},
		{"fec0::1", "site-local address"},
		{"ff00::", multicast}, {"ff02::1", multicast}, {"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", multicast},
		{"1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", reserved}, {"4000::1", reserved}, {"::1:0:0:1", reserved},
		// Public IPv6.
		{"2606:4700::1", allowed}, {"2001:4860:4860::8888", allowed}, {"2a00:1450:4001::1", allowed},
		{"2000::", allowed}, {"2001:200::1", allowed}, {"3fff:1000::1", allowed},
		{"3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", allowed},
	}
	p := newPolicy(t, "", "", defaultPorts)
	for _, tt := range tests {
		ap := netip.AddrPortFrom(netip.MustParseAddr(tt.addr), 443)
		if got := checkReason(t, p, ap); got != tt.reason {
			t.Errorf("Check(%v) reason %q, want %q", ap, got, tt.reason)
		}
	}
}

func TestCheckZoneAndInvalid(t *testing.T) {
	p := newPolicy(t, "::/0 0.0.0.0/0", "", defaultPorts)
	if got := checkReason(t, p, netip.AddrPortFrom(netip.MustParseAddr("fe80::1%eth0"), 443)); got != ReasonZone {
		t.Errorf("zoned address: reason %q", got)
	}
	if got := checkReason(t, p, netip.AddrPortFrom(netip.Addr{}, 443)); got != ReasonInvalid {
		t.Errorf("invalid address: reason %q", got)
	}
}

func TestCheckPorts(t *testing.T) {
	p := newPolicy(t, "", "", defaultPorts)
	public := netip.MustParseAddr("8.8.8.8")
	for port, want := range map[uint16]string{
		80: "", 443: "", 1024: "", 8080: "", 65535: "",
		0: ReasonPort, 22: ReasonPort, 25: ReasonPort, 79: ReasonPort, 81: ReasonPort, 1023: ReasonPort,
	} {
		if got := checkReason(t, p, netip.AddrPortFrom(public, port)); got != want {
			t.Errorf("port %d: reason %q, want %q", port, got, want)
		}
	}
	// The port check comes first, so it also applies to allowed CIDRs.
	p = newPolicy(t, "127.0.0.0/8", "", "443")
	if got := checkReason(t, p, netip.MustParseAddrPort("127.0.0.1:80")); got != ReasonPort {
		t.Errorf("allowed CIDR on a denied port: reason %q", got)
	}
}

func TestCheckAllowDeny(t *testing.T) {
	tests := []struct {
		allow, deny string
		addr        string
		reason      string
	}{
		{"127.0.0.0/8", "", "127.0.0.1:8080", ""},
		{"127.0.0.0/8", "", "127.255.0.1:8080", ""},
		{"127.0.0.0/8", "", "10.0.0.1:8080", "private address"},
		{"127.0.0.0/8", "", "[::1]:8080", "loopback address"},
		// The mapped form is not what the allow-list names.
		{"127.0.0.0/8", "", "[::ffff:127.0.0.1]:8080", ReasonMapped},
		{"127.0.0.0/8", "127.0.0.2/32", "127.0.0.2:8080", ReasonDenyCIDRs},
		{"127.0.0.0/8", "127.0.0.2/32", "127.0.0.1:8080", ""},
		// Deny wins over allow, even when the allow prefix is narrower.
		{"127.0.0.1/32", "127.0.0.0/8", "127.0.0.1:8080", ReasonDenyCIDRs},
		{"10.0.0.0/8", "10.1.0.0/16", "10.0.0.1:443", ""},
		{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.3:443", ReasonDenyCIDRs},
		{"", "8.8.8.0/24", "8.8.8.8:443", ReasonDenyCIDRs},
		{"", "8.8.8.0/24", "[::ffff:8.8.8.8]:443", ReasonDenyCIDRs},
		{"", "8.8.8.0/24", "1.1.1.1:443", ""},
		{"", "2606:4700::/32", "[2606:4700::1]:443", ReasonDenyCIDRs},
		{"", "2606:4700::/32", "[2606:4701::1]:443", ""},
		{"::1/128", "", "[::1]:443", ""},
		{"::1/128", "", "127.0.0.1:443", "loopback address"},
		{"64:ff9b::/96", "", "[64:ff9b::808:808]:443", ""},
		{"64:ff9b::/96", "", "[64:ff9b:1::1]:443", "NAT64 address"},
		{"fd00::/8", "", "[fd00::1]:443", ""},
		{"fd00::/8", "", "[fc00::1]:443", "unique local address"},
		// An unmasked prefix is taken as its network.
		{"10.1.2.3/8", "", "10.9.9.9:443", ""},
	}
	for _, tt := range tests {
		p := newPolicy(t, tt.allow, tt.deny, defaultPorts)
		if got := checkReason(t, p, netip.MustParseAddrPort(tt.addr)); got != tt.reason {
			t.Errorf("allow=%q deny=%q Check(%s): reason %q, want %q", tt.allow, tt.deny, tt.addr, got, tt.reason)
		}
	}
}

func TestCheckSelf(t *testing.T) {
	p := newPolicy(t, "127.0.0.0/8 ::1/128 0.0.0.0/8", "", defaultPorts)
	p.AddSelf(netip.MustParseAddrPort("127.0.0.1:8443"))
	for addr, want := range map[string]string{
		"127.0.0.1:8443":          ReasonSelf,
		"[::ffff:127.0.0.1]:8443": ReasonSelf,
		"127.0.0.1:8444":          "",
		"127.0.0.2:8443":          "",
	} {
		if got := checkReason(t, p, netip.MustParseAddrPort(addr)); got != want {
			t.Errorf("Check(%s): reason %q, want %q", addr, got, want)
		}
	}

	// A wildcard listener is every local address on its port.
	p.AddSelf(netip.MustParseAddrPort("0.0.0.0:9443"))
	for addr, want := range map[string]string{
		"0.0.0.0:9443":   ReasonSelf,
		"127.0.0.1:9443": ReasonSelf,
		"[::1]:9443":     "", // a 0.0.0.0 listener is IPv4 only
		"127.0.0.1:9444": "",
	} {
		if got := checkReason(t, p, netip.MustParseAddrPort(addr)); got != want {
			t.Errorf("after AddSelf(0.0.0.0:9443) Check(%s): reason %q, want %q", addr, got, want)
		}
	}
	p.AddSelf(netip.MustParseAddrPort("[::]:9445"))
	if got := checkReason(t, p, netip.MustParseAddrPort("127.0.0.1:9445")); got != ReasonSelf {
		t.Errorf("dual-stack wildcard: 127.0.0.1:9445 reason %q", got)
	}
	if hasLocalAddr(t, netip.IPv6Loopback()) {
		if got := checkReason(t, p, netip.MustParseAddrPort("[::1]:9445")); got != ReasonSelf {
			t.Errorf("dual-stack wildcard: [::1]:9445 reason %q", got)
		}
	}
}

func hasLocalAddr(t *testing.T, want netip.Addr) bool {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if got, ok := netip.AddrFromSlice(n.IP); ok && got.Unmap() == want {
				return true
			}
		}
	}
	return false
}

// TestOddSpellingsDenied checks that every spelling of a denied address that
// a system resolver would accept ends in a refusal before any lookup.
func TestOddSpellingsDenied(t *testing.T) {
	p := newPolicy(t, "", "", defaultPorts)
	for in, want := range map[string]string{
		"127.1:80":                   "loopback address",
		"2130706433:80":              "loopback address",
		"0x7f.1:80":                  "loopback address",
		"0x7f000001:80":              "loopback address",
		"0177.0.0.1:80":              "loopback address",
		"017700000001:80":            "loopback address",
		"127.0.0.1.:80":              "loopback address",
		"[::ffff:127.0.0.1]:80":      "loopback address",
		"[0:0:0:0:0:ffff:7f00:1]:80": "loopback address",
		"[::1]:80":                   "loopback address",
		"[0::1]:80":                  "loopback address",
		"[::127.0.0.1]:80":           "IPv4-compatible IPv6 address",
		"[64:ff9b::127.0.0.1]:80":    "NAT64 address",
		"0:80":                       "unspecified address",
		"10.1:80":                    "private address",
		"012.0.0.1:80":               "private address",
		"169.254.43518:80":           "link-local address",
		"0xa9fea9fe:80":              "link-local address",
		"[::ffff:a9fe:a9fe]:80":      "link-local address",
		"[fe80::a9fe:a9fe]:80":       "link-local address",
		"100.64.1:80":                "shared address (CGNAT)",
	} {
		tg, err := ParseAuthority(in, 0)
		if err != nil {
			t.Errorf("ParseAuthority(%q): %v", in, err)
			continue
		}
		err = p.CheckTarget(tg)
		var de *DeniedError
		if !errors.As(err, &de) {
			t.Errorf("CheckTarget(%q) = %v, want *DeniedError", in, err)
			continue
		}
		if de.Reason != want || de.Host != tg.Host {
			t.Errorf("CheckTarget(%q): reason %q host %q, want %q, %q", in, de.Reason, de.Host, want, tg.Host)
		}
	}
}

func TestCheckTargetName(t *testing.T) {
	p := newPolicy(t, "", "", defaultPorts)
	if err := p.CheckTarget(Target{Host: "example.com", Port: 443}); err != nil {
		t.Errorf("name on an allowed port: %v", err)
	}
	err := p.CheckTarget(Target{Host: "example.com", Port: 22})
	var de *DeniedError
	if !errors.As(err, &de) || de.Reason != ReasonPort || de.Host != "example.com" {
		t.Errorf("name on port 22: %v", err)
	}
}

func TestNewPolicyErrors(t *testing.T) {
	ports, _ := config.ParsePortSet("443")
	if _, err := NewPolicy([]netip.Prefix{{}}, nil, ports); err == nil {
		t.Error("invalid allow prefix accepted")
	}
	if _, err := NewPolicy(nil, []netip.Prefix{{}}, ports); err == nil {
		t.Error("invalid deny prefix accepted")
	}
	if _, err := NewPolicy(nil, nil, config.PortSet{}); err == nil {
		t.Error("empty port set accepted")
	}
}

func TestControlHook(t *testing.T) {
	p := newPolicy(t, "127.0.0.0/8", "", defaultPorts)
	want := netip.MustParseAddrPort("127.0.0.1:8080")
	ctl := p.control(want)
	if err := ctl("tcp4", "127.0.0.1:8080", nil); err != nil {
		t.Errorf("checked address refused: %v", err)
	}
	if err := ctl("tcp4", "127.0.0.2:8080", nil); err == nil {
		t.Error("a different socket address than the checked one was allowed")
	}
	if err := ctl("udp4", "127.0.0.1:8080", nil); err == nil {
		t.Error("udp allowed")
	}
	// Even the checked address is refused if the policy says no.
	denied := netip.MustParseAddrPort("10.0.0.1:8080")
	var de *DeniedError
	if err := p.control(denied)("tcp4", "10.0.0.1:8080", nil); !errors.As(err, &de) {
		t.Errorf("denied address through the hook: %v", err)
	}
}

func BenchmarkPolicyCheck(b *testing.B) {
	p := newPolicy(b, "127.0.0.0/8", "203.0.113.0/24", defaultPorts)
	p.AddSelf(netip.MustParseAddrPort("127.0.0.1:443"))
	for _, s := range []string{"8.8.8.8:443", "10.0.0.1:443", "[2606:4700::1]:443", "[fd00::1]:443", "[::ffff:127.0.0.1]:443"} {
		ap := netip.MustParseAddrPort(s)
		b.Run(s, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = p.Check(ap)
			}
		})
	}
}

// A wildcard listener answers on every loopback address, so the whole
// loopback range on its port is the proxy itself, even when loopback is
// allowed (as in tests); a 0.0.0.0 listener does not take IPv6.
func TestCheckSelfWildcardCoversLoopbackRange(t *testing.T) {
	ports, _ := config.ParsePortSet("1-65535")
	p, err := NewPolicy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}, nil, ports)
	if err != nil {
		t.Fatal(err)
	}
	p.AddSelf(netip.MustParseAddrPort("0.0.0.0:8443"), netip.MustParseAddrPort("[::]:9443"))
	for addr, self := range map[string]bool{
		"127.0.0.2:8443":       true,
		"127.255.255.254:8443": true,
		"[::1]:8443":           false, // 0.0.0.0 is IPv4 only
		"127.0.0.2:8444":       false,
		"127.0.0.9:9443":       true, // :: is dual-stack
		"[::1]:9443":           true,
	} {
		err := p.Check(netip.MustParseAddrPort(addr))
		var de *DeniedError
		isSelf := errors.As(err, &de) && de.Reason == ReasonSelf
		if isSelf != self {
			t.Errorf("Check(%s) = %v, want self=%v", addr, err, self)
		}
	}
}
