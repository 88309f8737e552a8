package egress

import (
	"strings"
	"testing"
)

// FuzzParseAuthority checks that parsing never panics, that a parsed Target
// prints as an authority that parses back to itself, and that a host never
// carries characters that could smuggle anything past later stages.
func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{
		"example.com:443", "Example.COM.:80", "[2001:db8::1]:443", "[::ffff:127.0.0.1]:80",
		"127.1:80", "2130706433:80", "0x7f.1:80", "0177.0.0.1:80", "localhost.:80",
		"[127.0.0.1]:80", "[fe80::1%eth0]:80", "user@host:80", ":80", "host:0", "host:65536",
		"host", "[::1]", "a..b:80", "1.2.3.256:80", "ex ample:80", "host:\x00",
	} {
		f.Add(s, uint16(0))
		f.Add(s, uint16(80))
	}
	f.Fuzz(func(t *testing.T, in string, defaultPort uint16) {
		tg, err := ParseAuthority(in, defaultPort)
		if err != nil {
			if _, ok := err.(*TargetError); !ok {
				t.Fatalf("error %T is not *TargetError", err)
			}
			return
		}
		if tg.Host == "" || tg.Port == 0 {
			t.Fatalf("empty host or port 0 in %+v", tg)
		}
		if strings.ContainsAny(tg.Host, "[]@/%") || strings.HasSuffix(tg.Host, ".") || tg.Host != strings.ToLower(tg.Host) {
			t.Fatalf("host %q is not canonical", tg.Host)
		}
		for _, c := range []byte(tg.Host) {
			if c <= ' ' || c >= 0x7f {
				t.Fatalf("host %q has a control, space or non-ASCII byte", tg.Host)
			}
		}
		if tg.Addr.IsValid() && (tg.Host != tg.Addr.String() || tg.Addr.Zone() != "") {
			t.Fatalf("address target %+v is not canonical", tg)
		}
		if !tg.Addr.IsValid() && strings.Contains(tg.Host, ":") {
			t.Fatalf("name %q contains a colon", tg.Host)
		}
		again, err := ParseAuthority(tg.String(), 0)
		if err != nil {
			t.Fatalf("%q parsed to %+v, whose String %q does not parse: %v", in, tg, tg.String(), err)
		}
		if again != tg {
			t.Fatalf("%q → %+v → %q → %+v", in, tg, tg.String(), again)
		}
	})
}
