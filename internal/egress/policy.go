// Package egress decides where the proxy may connect and makes the
// connections: target parsing, the SSRF policy, a caching DNS resolver and a
// dialer that checks every address it dials.
//
// The policy is enforced at dial time, after DNS resolution, on the exact
// socket address: names are resolved once by our Resolver, every address is
// checked, and only IP literals are dialed, with a net.Dialer Control hook
// checking the address the kernel is about to connect to. There is no second
// lookup, so a DNS answer cannot change between check and connect.
package egress

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"code.dny.dev/ssrf"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

// DeniedError reports a destination refused by the egress policy. The proxy
// answers it with 403 Forbidden; no connection to the address was attempted.
type DeniedError struct {
	Addr   netip.AddrPort // the address refused; Addr() is invalid for a port-only refusal of a name
	Host   string         // the requested host, when known
	Reason string         // short and fixed, suitable as a metrics label
}

func (e *DeniedError) Error() string { return "destination not allowed: " + e.Reason }

// Reasons a destination is refused that do not come from the range table.
const (
	ReasonPort      = "port not allowed"
	ReasonSelf      = "proxy's own address"
	ReasonDenyCIDRs = "denied by EGRESS_DENY_CIDRS"
	ReasonMapped    = "IPv4-mapped IPv6 address"
	ReasonZone      = "IPv6 address with zone"
	ReasonInvalid   = "invalid address"
	ReasonReserved  = "reserved address"
)

// specialRange labels a special-purpose prefix with the reason shown to the
// client. The deny decision itself comes from ssrf.Guardian; this table only
// names it, most specific prefix first.
type specialRange struct {
	prefix netip.Prefix
	reason string
}

var specialRanges = func() []specialRange {
	rs := []struct{ p, reason string }{
		// IPv4, IANA IPv4 Special-Purpose Address Registry.
		{"0.0.0.0/8", "unspecified address"},         // "this network", RFC 791
		{"10.0.0.0/8", "private address"},            // RFC 1918
		{"100.64.0.0/10", "shared address (CGNAT)"},  // RFC 6598
		{"127.0.0.0/8", "loopback address"},          // RFC 1122
		{"169.254.0.0/16", "link-local address"},     // RFC 3927; cloud metadata 169.254.169.254
		{"172.16.0.0/12", "private address"},         // RFC 1918
		{"192.0.0.0/24", "IETF protocol assignment"}, // RFC 6890
		{"192.0.2.0/24", "documentation address"},    // RFC 5737
		{"192.31.196.0/24", "AS112 address"},         // RFC 7535
		{"192.52.193.0/24", "AMT address"},           // RFC 7450
		{"192.88.99.0/24", "6to4 relay address"},     // RFC 7526
		{"192.168.0.0/16", "private address"},        // RFC 1918
		{"192.175.48.0/24", "AS112 address"},         // RFC 7534
		{"198.18.0.0/15", "benchmarking address"},    // RFC 2544
		{"198.51.100.0/24", "documentation address"}, // RFC 5737
		{"203.0.113.0/24", "documentation address"},  // RFC 5737
		{"224.0.0.0/4", "multicast address"},         // RFC 5771
		{"255.255.255.255/32", "broadcast address"},  // RFC 919
		{"240.0.0.0/4", "reserved address"},          // RFC 1112
		// IPv6, IANA IPv6 Special-Purpose Address Registry. ssrf.Guardian
		// denies everything outside 2000::/3 wholesale; the entries outside
		// it are here only to give a precise reason.
		{"::/128", "unspecified address"},          // RFC 4291
		{"::1/128", "loopback address"},            // RFC 4291
		{"::ffff:0:0/96", ReasonMapped},            // RFC 4291
		{"::/96", "IPv4-compatible IPv6 address"},  // RFC 4291 (deprecated)
		{"64:ff9b::/96", "NAT64 address"},          // RFC 6052
		{"64:ff9b:1::/48", "NAT64 address"},        // RFC 8215
		{"100::/64", "discard-only address"},       // RFC 6666
		{"2001::/32", "Teredo address"},            // RFC 4380
		{"2001:db8::/32", "documentation address"}, // RFC 3849
		{"2001::/23", "IETF protocol assignment"},  // RFC 2928
		{"2002::/16", "6to4 address"},              // RFC 3056
		{"2620:4f:8000::/48", "AS112 address"},     // RFC 7534
		{"3fff::/20", "documentation address"},     // RFC 9637
		{"fc00::/7", "unique local address"},       // RFC 4193
		{"fe80::/10", "link-local address"},        // RFC 4291
		{"fec0::/10", "site-local address"},        // RFC 3879 (deprecated)
		{"ff00::/8", "multicast address"},          // RFC 4291
	}
	out := make([]specialRange, len(rs))
	for i, r := range rs {
		out[i] = specialRange{netip.MustParsePrefix(r.p), r.reason}
	}
	return out
}()

// Policy decides where egress may go. It is safe for concurrent use.
//
// Check order, first match wins: port, EGRESS_DENY_CIDRS, the proxy's own
// addresses, EGRESS_ALLOW_CIDRS, the special-purpose ranges. So deny wins over
// allow, and the proxy never connects to itself even when an allow-list
// covers it (that would be a request loop).
type Policy struct {
	ports    config.PortSet
	udpPorts config.PortSet // CONNECT-UDP (SetUDPPorts); none until set
	deny     []netip.Prefix
	guardian *ssrf.Guardian

	mu   sync.RWMutex
	self map[netip.AddrPort]struct{}
	// selfLoopbackPorts: ports of wildcard listeners, reachable on any
	// loopback address; true when the listener is dual-stack (::).
	selfLoopbackPorts map[uint16]bool
}

// NewPolicy builds a policy from EGRESS_ALLOW_CIDRS, EGRESS_DENY_CIDRS and
// ALLOWED_PORTS.
func NewPolicy(allow, deny []netip.Prefix, ports config.PortSet) (*Policy, error) {
	if ports.String() == "" {
		return nil, errors.New("egress policy: no ports allowed")
	}
	var allow4, allow6 []netip.Prefix
	for _, p := range allow {
		if !p.IsValid() {
			return nil, fmt.Errorf("egress policy: invalid allow prefix %v", p)
		}
		if p = p.Masked(); p.Addr().Is4() {
			allow4 = append(allow4, p)
		} else {
			allow6 = append(allow6, p)
		}
	}
	p := &Policy{
		ports:             ports,
		self:              make(map[netip.AddrPort]struct{}),
		selfLoopbackPorts: make(map[uint16]bool),
	}
	for _, d := range deny {
		if !d.IsValid() {
			return nil, fmt.Errorf("egress policy: invalid deny prefix %v", d)
		}
		p.deny = append(p.deny, d.Masked())
	}
	// Ports are checked against the PortSet here: ssrf's port list is a
	// linear slice, unsuited to the default 1024-65535. Networks are left at
	// ssrf's default (tcp4, tcp6), which our Control hook relies on.
	p.guardian = ssrf.New(
		ssrf.WithAnyPort(),
		ssrf.WithAllowedV4Prefixes(allow4...),
		ssrf.WithAllowedV6Prefixes(allow6...),
	)
	return p, nil
}

// AddSelf records the proxy's own listening addresses, which are never a
// valid destination. An unspecified address (0.0.0.0 or ::) stands for every
// address of every local interface on that port, enumerated now.
func (p *Policy) AddSelf(addrs ...netip.AddrPort) {
	var add []netip.AddrPort
	for _, ap := range addrs {
		a := ap.Addr().Unmap().WithZone("")
		add = append(add, netip.AddrPortFrom(a, ap.Port()))
		if !a.IsUnspecified() {
			continue
		}
		ifaddrs, err := net.InterfaceAddrs()
		if err != nil {
			continue // the wildcard itself is still recorded
		}
		for _, ia := range ifaddrs {
			ipn, ok := ia.(*net.IPNet)
			if !ok {
				continue
			}
			la, ok := netip.AddrFromSlice(ipn.IP)
			if !ok {
				continue
			}
			la = la.Unmap()
			// A 0.0.0.0 listener only takes IPv4; a :: listener is dual-stack.
			if a.Is4() && !la.Is4() {
				continue
			}
			add = append(add, netip.AddrPortFrom(la, ap.Port()))
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ap := range add {
		p.self[ap] = struct{}{}
	}
	for _, ap := range addrs {
		if a := ap.Addr().Unmap(); a.IsUnspecified() {
			// A wildcard listener also answers on every loopback address
			// (all of 127.0.0.0/8 is local on Linux), not only on the
			// interface addresses enumerated above; 0.0.0.0 on IPv4 only.
			p.selfLoopbackPorts[ap.Port()] = p.selfLoopbackPorts[ap.Port()] || a.Is6()
		}
	}
}

func (p *Policy) isSelf(ap netip.AddrPort) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if _, ok := p.self[ap]; ok {
		return true
	}
	dual, wildcard := p.selfLoopbackPorts[ap.Port()]
	a := ap.Addr().Unmap()
	return wildcard && a.IsLoopback() && (a.Is4() || dual)
}

// Check decides whether the proxy may connect to ap. It is the one function
// that says where egress may go: the dialer calls it for every resolved
// address and again from the socket's Control hook. It returns nil or a
// *DeniedError.
func (p *Policy) Check(ap netip.AddrPort) error {
	return p.check(ap, p.ports)
}

// SetUDPPorts sets the UDP ports CONNECT-UDP flows may reach
// (ALLOWED_UDP_PORTS). Until it is called no UDP port is allowed. It is
// called once, while the proxy is wired, before any flow.
func (p *Policy) SetUDPPorts(ports config.PortSet) { p.udpPorts = ports }

// CheckUDP is Check for a UDP destination: the same address rules, with
// the UDP ports instead of the TCP ones.
func (p *Policy) CheckUDP(ap netip.AddrPort) error {
	return p.check(ap, p.udpPorts)
}

func (p *Policy) check(ap netip.AddrPort, ports config.PortSet) error {
	reason := p.denyReason(ap, ports)
	if reason == "" {
		return nil
	}
	return &DeniedError{Addr: ap, Reason: reason}
}

func (p *Policy) denyReason(ap netip.AddrPort, ports config.PortSet) string {
	a := ap.Addr()
	switch {
	case !a.IsValid():
		return ReasonInvalid
	case a.Zone() != "":
		return ReasonZone
	case !ports.Contains(ap.Port()):
		return ReasonPort
	}
	plain := a.Unmap()
	for _, d := range p.deny {
		if d.Contains(a) || d.Contains(plain) {
			return ReasonDenyCIDRs
		}
	}
	if p.isSelf(netip.AddrPortFrom(plain, ap.Port())) {
		return ReasonSelf
	}
	if p.guardian.SafeAddr(a) == nil {
		return ""
	}
	// An IPv4-mapped address is denied as a range (it is never what a
	// browser dials), but say what the embedded IPv4 address is when that
	// is the more useful reason, e.g. "loopback address" for ::ffff:127.0.0.1.
	if a.Is4In6() {
		if p.guardian.SafeAddr(plain) != nil {
			return rangeReason(plain)
		}
		return ReasonMapped
	}
	return rangeReason(a)
}

// rangeReason names the special-purpose range a denied address is in.
func rangeReason(a netip.Addr) string {
	for _, r := range specialRanges {
		if r.prefix.Contains(a) {
			return r.reason
		}
	}
	return ReasonReserved
}

// CheckTarget applies what can be decided before any DNS lookup or dial: the
// port, and the whole policy when the target is an IP literal. It returns nil
// or a *DeniedError.
func (p *Policy) CheckTarget(t Target) error {
	return p.checkTarget(t, p.ports)
}

// CheckTargetUDP is CheckTarget for a CONNECT-UDP target.
func (p *Policy) CheckTargetUDP(t Target) error {
	return p.checkTarget(t, p.udpPorts)
}

func (p *Policy) checkTarget(t Target, ports config.PortSet) error {
	if t.Addr.IsValid() {
		if err := p.check(netip.AddrPortFrom(t.Addr, t.Port), ports); err != nil {
			err.(*DeniedError).Host = t.Host
			return err
		}
		return nil
	}
	if !ports.Contains(t.Port) {
		return &DeniedError{Addr: netip.AddrPortFrom(netip.Addr{}, t.Port), Host: t.Host, Reason: ReasonPort}
	}
	return nil
}

// control is the net.Dialer Control hook: it re-checks the exact socket
// address the kernel is about to connect to, and that it is the address
// that was checked before dialing.
func (p *Policy) control(want netip.AddrPort) func(network, address string, _ syscall.RawConn) error {
	return p.controlFor(want, "tcp4", "tcp6", p.Check)
}

// controlUDP is control for a CONNECT-UDP flow's connected socket.
func (p *Policy) controlUDP(want netip.AddrPort) func(network, address string, _ syscall.RawConn) error {
	return p.controlFor(want, "udp4", "udp6", p.CheckUDP)
}

func (p *Policy) controlFor(want netip.AddrPort, net4, net6 string, check func(netip.AddrPort) error) func(network, address string, _ syscall.RawConn) error {
	return func(network, address string, _ syscall.RawConn) error {
		if network != net4 && network != net6 {
			return fmt.Errorf("egress: refusing network %q", network)
		}
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return fmt.Errorf("egress: unparsable socket address %q: %w", address, err)
		}
		if ap.Addr().Unmap() != want.Addr().Unmap() || ap.Port() != want.Port() {
			return fmt.Errorf("egress: socket address %s is not the checked address %s", ap, want)
		}
		return check(ap)
	}
}
