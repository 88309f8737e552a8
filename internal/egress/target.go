package egress

import (
	"net/netip"
	"strconv"
	"strings"
)

// Target is a parsed request authority: what a client asked the proxy to
// reach, after validation and canonicalisation.
type Target struct {
	// Host is lower-case, without brackets and without a trailing dot. When
	// the authority named an IP address, in any spelling, Host is the
	// canonical form of that address (Addr.String()).
	Host string
	Port uint16
	// Addr is valid when the authority was an IP literal, including the
	// numeric spellings a system resolver would accept ("127.1",
	// "2130706433", "0x7f.1"). Such targets are never looked up in DNS.
	Addr netip.Addr
}

// String returns host:port, with an IPv6 host in brackets, in a form that
// ParseAuthority accepts and maps back to the same Target.
func (t Target) String() string {
	port := strconv.FormatUint(uint64(t.Port), 10)
	if t.Addr.Is6() || strings.Contains(t.Host, ":") {
		return "[" + t.Host + "]:" + port
	}
	return t.Host + ":" + port
}

// TargetError reports an authority the proxy refuses to interpret. The
// proxy answers it with 400 Bad Request.
type TargetError struct {
	Reason string
}

func (e *TargetError) Error() string { return "bad target: " + e.Reason }

func badTarget(reason string) error { return &TargetError{Reason: reason} }

// maxAuthorityLen bounds the work done on hostile input: a DNS name is at most
// 253 octets, plus brackets, colon and port.
const maxAuthorityLen = 262

// ParseAuthority parses a request authority (host, host:port, [v6] or
// [v6]:port). defaultPort is used when the authority has no port; 0 means a
// port is required, as for CONNECT. Errors are *TargetError.
//
// Parsing is deliberately strict: anything a browser would not send (userinfo,
// zone ids, spaces, unbracketed IPv6) is refused rather than guessed at, and
// every numeric spelling of an IPv4 address that glibc's inet_aton would
// accept is turned into the address it means, so the policy judges the
// address and not its spelling.
func ParseAuthority(authority string, defaultPort uint16) (Target, error) {
	if authority == "" {
		return Target{}, badTarget("empty authority")
	}
	if len(authority) > maxAuthorityLen {
		return Target{}, badTarget("authority too long")
	}
	for i := 0; i < len(authority); i++ {
		c := authority[i]
		if c <= ' ' || c >= 0x7f {
			return Target{}, badTarget("invalid character in authority")
		}
	}
	if strings.Contains(authority, "@") {
		return Target{}, badTarget("userinfo not allowed")
	}

	var host, portStr string
	hasPort := false
	if authority[0] == '[' {
		end := strings.IndexByte(authority, ']')
		if end < 0 {
			return Target{}, badTarget("missing ']' in host")
		}
		host = authority[1:end]
		rest := authority[end+1:]
		switch {
		case rest == "":
		case rest[0] == ':':
			portStr, hasPort = rest[1:], true
		default:
			return Target{}, badTarget("unexpected text after ']'")
		}
		t, err := parseBracketed(host)
		if err != nil {
			return Target{}, err
		}
		t.Port, err = parsePort(portStr, hasPort, defaultPort)
		return t, err
	}

	host = authority
	if i := strings.LastIndexByte(authority, ':'); i >= 0 {
		host, portStr, hasPort = authority[:i], authority[i+1:], true
	}
	if strings.Contains(host, ":") {
		return Target{}, badTarget("IPv6 address must be in brackets")
	}
	if strings.ContainsAny(host, "[]") {
		return Target{}, badTarget("invalid character in host")
	}
	t, err := parseHost(host)
	if err != nil {
		return Target{}, err
	}
	t.Port, err = parsePort(portStr, hasPort, defaultPort)
	return t, err
}

// parseBracketed accepts only a plain IPv6 address inside brackets: an IPv4
// address or a name in brackets is not a valid URI host, and zone ids name a
// local interface, which a remote client has no business choosing.
func parseBracketed(host string) (Target, error) {
	if host == "" {
		return Target{}, badTarget("empty host")
	}
	if strings.Contains(host, "%") {
		return Target{}, badTarget("IPv6 zone identifier not allowed")
	}
	a, err := netip.ParseAddr(host)
	if err != nil || !a.Is6() {
		return Target{}, badTarget("bracketed host is not an IPv6 address")
	}
	return Target{Host: a.String(), Addr: a}, nil
}

// parseHost validates a DNS name or an IPv4 address in any inet_aton spelling.
func parseHost(host string) (Target, error) {
	host = strings.TrimSuffix(host, ".")
	if host == "" {
		return Target{}, badTarget("empty host")
	}
	if len(host) > 253 {
		return Target{}, badTarget("host name too long")
	}
	host = strings.ToLower(host)
	labels := strings.Split(host, ".")
	// As in the WHATWG URL standard, a host whose last label is a number is an
	// IPv4 address or nothing: no public DNS name has a numeric TLD, and
	// letting "1.2.3.256" reach a system resolver would invite it to guess.
	if isNumericLabel(labels[len(labels)-1]) {
		a, ok := parseInetAton(labels)
		if !ok {
			return Target{}, badTarget("invalid IPv4 address")
		}
		return Target{Host: a.String(), Addr: a}, nil
	}
	for _, l := range labels {
		if l == "" {
			return Target{}, badTarget("empty label in host name")
		}
		if len(l) > 63 {
			return Target{}, badTarget("host name label too long")
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return Target{}, badTarget("invalid character in host name")
			}
		}
	}
	return Target{Host: host}, nil
}

// isNumericLabel reports whether a label is written as a number: decimal or
// octal digits, or 0x followed by hex digits.
func isNumericLabel(l string) bool {
	if l == "" {
		return false
	}
	if len(l) >= 2 && l[0] == '0' && (l[1] == 'x' || l[1] == 'X') {
		for i := 2; i < len(l); i++ {
			if !isHex(l[i]) {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(l); i++ {
		if l[i] < '0' || l[i] > '9' {
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseInetAton interprets 1 to 4 dot-separated parts the way glibc's
// inet_aton does: each part decimal, octal (leading 0) or hex (0x); the last
// part fills all remaining bytes ("127.1" is 127.0.0.1, "2130706433" is
// 127.0.0.1).
func parseInetAton(parts []string) (netip.Addr, bool) {
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var v uint32
	for i, p := range parts {
		n, ok := parseInetPart(p)
		if !ok {
			return netip.Addr{}, false
		}
		if i < len(parts)-1 {
			if n > 0xff {
				return netip.Addr{}, false
			}
			v |= uint32(n) << (8 * (3 - i))
			continue
		}
		// The last part covers the remaining 4-i bytes.
		if bits := 8 * (4 - i); bits < 32 && n >= 1<<bits {
			return netip.Addr{}, false
		}
		v |= uint32(n)
	}
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// parseInetPart parses one inet_aton part; values above 2^32-1 fail.
func parseInetPart(p string) (uint64, bool) {
	base := uint64(10)
	digits := p
	switch {
	case len(p) >= 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X'):
		base, digits = 16, p[2:]
	case len(p) >= 2 && p[0] == '0':
		base, digits = 8, p[1:]
	}
	if digits == "" {
		return 0, false
	}
	var n uint64
	for i := 0; i < len(digits); i++ {
		c := digits[i]
		var d uint64
		switch {
		case '0' <= c && c <= '9':
			d = uint64(c - '0')
		case 'a' <= c && c <= 'f':
			d = uint64(c-'a') + 10
		case 'A' <= c && c <= 'F':
			d = uint64(c-'A') + 10
		default:
			return 0, false
		}
		if d >= base {
			return 0, false
		}
		n = n*base + d
		if n > 0xffffffff {
			return 0, false
		}
	}
	return n, true
}

// parsePort parses a decimal port in 1-65535. An absent port, or an empty
// one ("host:" is valid URI syntax), means defaultPort if there is one.
func parsePort(s string, present bool, defaultPort uint16) (uint16, error) {
	if !present || s == "" {
		if defaultPort == 0 {
			return 0, badTarget("missing port")
		}
		return defaultPort, nil
	}
	if len(s) > 5 {
		return 0, badTarget("invalid port")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, badTarget("invalid port")
		}
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, badTarget("port out of range")
	}
	if n == 0 {
		return 0, badTarget("port 0 not allowed")
	}
	return uint16(n), nil
}
