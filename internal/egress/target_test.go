package egress

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseAuthorityValid(t *testing.T) {
	v4 := netip.MustParseAddr
	tests := []struct {
		in          string
		defaultPort uint16
		want        Target
	}{
		{"example.com:443", 0, Target{Host: "example.com", Port: 443}},
		{"Example.COM.:443", 0, Target{Host: "example.com", Port: 443}},
		{"example.com", 80, Target{Host: "example.com", Port: 80}},
		{"example.com:", 80, Target{Host: "example.com", Port: 80}},
		{"example.com:8080", 80, Target{Host: "example.com", Port: 8080}},
		{"_dmarc.my-host.example:65535", 0, Target{Host: "_dmarc.my-host.example", Port: 65535}},
		{"xn--bcher-kva.example:443", 0, Target{Host: "xn--bcher-kva.example", Port: 443}},
		{"1e100.net:443", 0, Target{Host: "1e100.net", Port: 443}},
		{"localhost.:80", 0, Target{Host: "localhost", Port: 80}},
		{"LOCALHOST:80", 0, Target{Host: "localhost", Port: 80}},
		{"8.8.8.8:53", 0, Target{Host: "8.8.8.8", Port: 53, Addr: v4("8.8.8.8")}},
		{"[2606:4700::1]:443", 0, Target{Host: "2606:4700::1", Port: 443, Addr: v4("2606:4700::1")}},
		{"[2606:4700:0:0::1]", 443, Target{Host: "2606:4700::1", Port: 443, Addr: v4("2606:4700::1")}},
		{"[2606:4700::ABCD]:1", 0, Target{Host: "2606:4700::abcd", Port: 1, Addr: v4("2606:4700::abcd")}},
		{"example.com:00080", 0, Target{Host: "example.com", Port: 80}},
		// Numeric spellings glibc's inet_aton accepts become the address they mean.
		{"127.1:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"2130706433:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"0x7f.1:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"0X7F.0X0.0X0.0X1:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"0177.0.0.1:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"0x7f000001:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"017700000001:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"127.0.1:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"127.0.0.1.:80", 0, Target{Host: "127.0.0.1", Port: 80, Addr: v4("127.0.0.1")}},
		{"169.254.43518:80", 0, Target{Host: "169.254.169.254", Port: 80, Addr: v4("169.254.169.254")}},
		{"0xa9.0xfe.0xa9.0xfe:80", 0, Target{Host: "169.254.169.254", Port: 80, Addr: v4("169.254.169.254")}},
		{"0:80", 0, Target{Host: "0.0.0.0", Port: 80, Addr: v4("0.0.0.0")}},
		{"4294967295:80", 0, Target{Host: "255.255.255.255", Port: 80, Addr: v4("255.255.255.255")}},
		{"[::ffff:127.0.0.1]:80", 0, Target{Host: "::ffff:127.0.0.1", Port: 80, Addr: v4("::ffff:127.0.0.1")}},
		{"[::127.0.0.1]:80", 0, Target{Host: "::7f00:1", Port: 80, Addr: v4("::7f00:1")}},
	}
	for _, tt := range tests {
		got, err := ParseAuthority(tt.in, tt.defaultPort)
		if err != nil {
			t.Errorf("ParseAuthority(%q, %d): %v", tt.in, tt.defaultPort, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseAuthority(%q, %d) = %+v, want %+v", tt.in, tt.defaultPort, got, tt.want)
		}
	}
}

func TestParseAuthorityMalformed(t *testing.T) {
	tests := []struct {
		in          string
		defaultPort uint16
		reason      string // substring of the reason
	}{
		{"", 80, "empty authority"},
		{"[127.0.0.1]:80", 0, "not an IPv6 address"},
		{"[foo]:80", 0, "not an IPv6 address"},
		{"[]:80", 0, "empty host"},
		{"[fe80::1%eth0]:80", 0, "zone"},
		{"[fe80::1%25eth0]:80", 0, "zone"},
		{"[::1]", 0, "missing port"},
		{"[::1]x:80", 0, "after ']'"},
		{"[::1:80", 0, "missing ']'"},
		{"[[::1]]:80", 0, "after ']'"},
		{"::1:80", 0, "brackets"},
		{"2001:db8::1", 80, "brackets"},
		{":80", 0, "empty host"},
		{".:80", 0, "empty host"},
		{"example.com", 0, "missing port"},
		{"example.com:", 0, "missing port"},
		{"example.com:0", 0, "port 0"},
		{"example.com:65536", 0, "out of range"},
		{"example.com:99999", 0, "out of range"},
		{"example.com:123456", 0, "invalid port"},
		{"example.com:abc", 0, "invalid port"},
		{"example.com:-1", 0, "invalid port"},
		{"example.com:+80", 0, "invalid port"},
		{"example.com:0x50", 0, "invalid port"},
		{"user@example.com:80", 0, "userinfo"},
		{"user:pass@example.com:80", 0, "userinfo"},
		{"@example.com:80", 0, "userinfo"},
		{"exa mple.com:80", 0, "invalid character"},
		{"example.com: 80", 0, "invalid character"},
		{"example.com\x00:80", 0, "invalid character"},
		{"example.com\r\n:80", 0, "invalid character"},
		{"example.com\t:80", 0, "invalid character"},
		{"example\x7f.com:80", 0, "invalid character"},
		{"exämple.com:80", 0, "invalid character"},
		{"exa$mple.com:80", 0, "invalid character in host name"},
		{"exa*mple.com:80", 0, "invalid character in host name"},
		{"exa%41mple.com:80", 0, "invalid character in host name"},
		{"exa/mple.com:80", 0, "invalid character in host name"},
		{"a..b:80", 0, "empty label"},
		{".example.com:80", 0, "empty label"},
		{"example.com..:80", 0, "empty label"},
		{strings.Repeat("a", 64) + ".com:80", 0, "label too long"},
		{strings.Repeat("a.", 127) + "com:80", 0, "too long"},
		{"1.2.3.256:80", 0, "invalid IPv4"},
		{"08.0.0.1:80", 0, "invalid IPv4"},
		{"1.2.3.4.5:80", 0, "invalid IPv4"},
		{"4294967296:80", 0, "invalid IPv4"},
		{"0x:80", 0, "invalid IPv4"},
		{"1.0x:80", 0, "invalid IPv4"},
		{"256.1:80", 0, "invalid IPv4"},
		{"1.16777216:80", 0, "invalid IPv4"},
		{"1.1.65536:80", 0, "invalid IPv4"},
		{"example.123:80", 0, "invalid IPv4"},
		{"1..1:80", 0, "invalid IPv4"},
	}
	for _, tt := range tests {
		got, err := ParseAuthority(tt.in, tt.defaultPort)
		var te *TargetError
		if !errors.As(err, &te) {
			t.Errorf("ParseAuthority(%q, %d) = %+v, %v; want *TargetError", tt.in, tt.defaultPort, got, err)
			continue
		}
		if !strings.Contains(te.Reason, tt.reason) {
			t.Errorf("ParseAuthority(%q): reason %q, want it to mention %q", tt.in, te.Reason, tt.reason)
		}
		if !strings.HasPrefix(err.Error(), "bad target: ") {
			t.Errorf("error text %q lacks the bad target prefix", err)
		}
	}
}

func TestTargetStringRoundTrip(t *testing.T) {
	for _, in := range []string{"example.com:443", "[2001:db8::1]:8443", "127.0.0.1:80", "[::ffff:127.0.0.1]:80"} {
		tg, err := ParseAuthority(in, 0)
		if err != nil {
			t.Fatalf("ParseAuthority(%q): %v", in, err)
		}
		if got := tg.String(); got != in {
			t.Errorf("String() = %q, want %q", got, in)
		}
	}
}

func BenchmarkParseAuthority(b *testing.B) {
	for _, in := range []string{"www.example.com:443", "[2606:4700::1]:443", "0x7f.1:80"} {
		b.Run(in, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseAuthority(in, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
