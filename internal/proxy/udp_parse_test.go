package proxy

import (
	"errors"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/egress"
)

func TestParseUDPTarget(t *testing.T) {
	for _, c := range []struct {
		path string
		want string // Target.String(); "" when refused
	}{
		{"/.well-known/masque/udp/example.com/443/", "example.com:443"},
		{"/.well-known/masque/udp/example.com/443", "example.com:443"}, // trailing slash left out
		{"/.well-known/masque/udp/EXAMPLE.com./53/", "example.com:53"},
		{"/.well-known/masque/udp/192.0.2.7/53/", "192.0.2.7:53"},
		{"/.well-known/masque/udp/127.1/8080/", "127.0.0.1:8080"},      // inet_aton spellings, as for CONNECT
		{"/.well-known/masque/udp/2130706433/8080/", "127.0.0.1:8080"}, // likewise
		{"/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/", "[2001:db8::42]:443"},
		{"/.well-known/masque/udp/2001%3adb8%3a%3a42/443/", "[2001:db8::42]:443"}, // lower-case hex
		{"/.well-known/masque/udp/%3A%3A1/443/", "[::1]:443"},
		{"/.well-known/masque/udp/exa%6Dple.com/443/", "example.com:443"}, // any octet may be encoded
		{"/.well-known/masque/udp/example.com/0443/", "example.com:443"},

		{"/.well-known/masque/udp/example.com/", ""},                      // no port
		{"/.well-known/masque/udp/example.com//", ""},                     // empty port
		{"/.well-known/masque/udp//443/", ""},                             // empty host
		{"/.well-known/masque/udp/example.com/443/extra/", ""},            // too many segments
		{"/.well-known/masque/udp/example.com/443/?x=1", ""},              // query
		{"/.well-known/masque/udp/example.com/0/", ""},                    // port 0
		{"/.well-known/masque/udp/example.com/65536/", ""},                // out of range
		{"/.well-known/masque/udp/example.com/+443/", ""},                 // not digits
		{"/.well-known/masque/udp/example.com/%34%34%33/", ""},            // the port is digits only
		{"/.well-known/masque/udp/example.com/443443/", ""},               // too long
		{"/.well-known/masque/udp/2001:db8::1/443/", "[2001:db8::1]:443"}, // raw colons are valid in a path segment (RFC 3986 pchar): accepted
		{"/.well-known/masque/udp/[2001%3Adb8%3A%3A1]/443/", ""},          // brackets are not template syntax
		{"/.well-known/masque/udp/%5B2001%3Adb8%3A%3A1%5D/443/", ""},      // nor encoded brackets
		{"/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/", ""},           // zone id
		{"/.well-known/masque/udp/a%2Fb/443/", ""},                        // an encoded slash
		{"/.well-known/masque/udp/a%00b/443/", ""},                        // NUL
		{"/.well-known/masque/udp/a%zzb/443/", ""},                        // bad percent-encoding
		{"/.well-known/masque/udp/user@example.com/443/", ""},             // userinfo
		{"/.well-known/masque/udp/1.2.3.256/443/", ""},                    // a bad IPv4 address
		{"/.well-known/masque/udp/example.com%2525/443/", ""},             // double-encoded
		{"/.well-known/masque/tcp/example.com/443/", ""},                  // not the UDP template
		{"/.well-known/masque/udp", ""},
		{"/", ""},
		{"", ""},
		{"/.well-known/masque/udp/" + strings.Repeat("a", 1000) + "/443/", ""},
	} {
		got, err := parseUDPTarget(c.path)
		if c.want == "" {
			var te *egress.TargetError
			if !errors.As(err, &te) {
				t.Errorf("%q: got %v, %v; want a *egress.TargetError", c.path, got, err)
			}
			continue
		}
		if err != nil || got.String() != c.want {
			t.Errorf("%q: got %v, %v; want %s", c.path, got, err, c.want)
		}
	}
}

// FuzzParseUDPTarget: whatever the path, the parser refuses with a
// TargetError or returns a target that ParseAuthority maps to itself, with
// a port, and whose host holds nothing a URI authority cannot.
func FuzzParseUDPTarget(f *testing.F) {
	for _, s := range []string{
		"/.well-known/masque/udp/example.com/443/", "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/",
		"/.well-known/masque/udp/127.1/53", "/.well-known/masque/udp/%5B%3A%3A1%5D/1/", "/.well-known/masque/udp/a%25b/9/",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		got, err := parseUDPTarget(path)
		if err != nil {
			var te *egress.TargetError
			if !errors.As(err, &te) {
				t.Fatalf("%q: error %T %v, want *egress.TargetError", path, err, err)
			}
			return
		}
		if got.Port == 0 || got.Host == "" || strings.ContainsAny(got.Host, "/%@[]? \x00") {
			t.Fatalf("%q: accepted %+v", path, got)
		}
		back, err := egress.ParseAuthority(got.String(), 0)
		if err != nil || back != got {
			t.Fatalf("%q: %+v does not round-trip: %+v, %v", path, got, back, err)
		}
	})
}

func TestParseVarint(t *testing.T) {
	for _, c := range []struct {
		in   []byte
		v    uint64
		n    int
		okay bool
	}{
		{[]byte{0x00}, 0, 1, true},
		{[]byte{0x25, 0xff}, 37, 1, true},
		{[]byte{0x7b, 0xbd}, 15293, 2, true},                                                  // RFC 9000 §A.1
		{[]byte{0x9d, 0x7f, 0x3e, 0x7d}, 494878333, 4, true},                                  // RFC 9000 §A.1
		{[]byte{0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c}, 151288809941952652, 8, true}, // RFC 9000 §A.1
		{[]byte{0x40}, 0, 0, false},
		{nil, 0, 0, false},
	} {
		v, n, ok := parseVarint(c.in)
		if v != c.v || n != c.n || ok != c.okay {
			t.Errorf("parseVarint(%x) = %d, %d, %v; want %d, %d, %v", c.in, v, n, ok, c.v, c.n, c.okay)
		}
	}
}
