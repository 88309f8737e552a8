package proxy_test

import (
	"net"
	"net/http"
	"sync/atomic"
	"testing"
)

// countingListener counts connections that reach it.
func countingListener(t *testing.T, addr string) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().String(), &n
}

// Every spelling a resolver might turn into loopback is refused with 403,
// and nothing connects to the loopback listener, over CONNECT and
// forwarding alike.
func TestEgressOddSpellingsOfLoopbackAreRefused(t *testing.T) {
	e := startProxy(t, map[string]string{"EGRESS_ALLOW_CIDRS": ""}) // default policy
	addr, accepts := countingListener(t, "127.0.0.1:0")
	_, port, _ := net.SplitHostPort(addr)
	spellings := []string{"127.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.000.000.001",
		"[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[::127.0.0.1]", "localhost", "localhost.", "LOCALHOST", "foo.localhost", "0.0.0.0", "[::]"}
	for _, host := range spellings {
		target := host + ":" + port
		conn, _, status := e.h1Connect(target, e.bearer(), nil)
		conn.Close()
		if status != http.StatusForbidden {
			t.Errorf("CONNECT %s: %d, want 403", target, status)
		}
		resp, err := e.h1Client(e.bearer()).Get("http://" + target + "/")
		if err != nil {
			t.Errorf("GET %s: %v", target, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("GET http://%s/: %d, want 403", target, resp.StatusCode)
		}
	}
	if n := accepts.Load(); n != 0 {
		t.Fatalf("%d connections reached the loopback listener", n)
	}
	// Denied CONNECT records name the target in canonical form, whatever
	// the spelling.
	for _, r := range e.records() {
		if r.Method == "CONNECT" && r.TargetURL == "0x7f.1:"+port {
			t.Errorf("record kept the raw spelling: %+v", r)
		}
	}
	e.waitRecord(func(r recordT) bool {
		return r.Method == "CONNECT" && r.TargetURL == "127.0.0.1:"+port && r.StatusCode == 403
	})
}

// A name whose DNS answer is a denied address is refused after resolution,
// and the denied address is never dialed.
func TestEgressDeniedDNSAnswers(t *testing.T) {
	victim, accepts := countingListener(t, "127.0.0.2:0")
	_, port, _ := net.SplitHostPort(victim)
	ns := newDNSServer(t, map[string]string{
		"rebind.test.":   "127.0.0.2",
		"internal.test.": "192.168.1.10",
		"cgnat.test.":    "100.64.0.1",
		"meta.test.":     "169.254.169.254",
	})
	e := startProxy(t, map[string]string{
		"DNS_SERVERS":        ns.addr,
		"EGRESS_ALLOW_CIDRS": "127.0.0.0/8",
		"EGRESS_DENY_CIDRS":  "127.0.0.2/32",
	})
	for _, host := range []string{"rebind.test", "internal.test", "cgnat.test", "meta.test"} {
		conn, _, status := e.h1Connect(host+":"+port, e.bearer(), nil)
		conn.Close()
		if status != http.StatusForbidden {
			t.Errorf("CONNECT %s: %d, want 403", host, status)
		}
		resp, up, err := h2Connect(e.h2Conn(), host+":"+port, e.bearer())
		if err != nil {
			t.Fatal(err)
		}
		up.Close()
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("h2 CONNECT %s: %d, want 403", host, resp.StatusCode)
		}
	}
	if n := accepts.Load(); n != 0 {
		t.Fatalf("%d connections reached the denied address", n)
	}
	r := e.waitRecord(func(r recordT) bool { return r.StatusCode == 403 })
	if r.Error != "egress_denied" || r.TokenID != "tok-1" {
		t.Errorf("403 record %+v", r)
	}
}

// Each HTTP/2 stream costs one unit of the token's bucket.
func TestRateLimitCountsHTTP2Streams(t *testing.T) {
	e := startProxy(t, map[string]string{"RATE_LIMIT_REQUESTS_PER_MINUTE": "1", "RATE_LIMIT_BURST_SIZE": "4"})
	o := newOrigin(t)
	cc := e.h2Conn()
	var codes []int
	for i := 0; i < 6; i++ {
		req, _ := http.NewRequest("GET", o.URL+"/", nil)
		req.Header.Set("Proxy-Authorization", e.bearer())
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		codes = append(codes, resp.StatusCode)
		if resp.StatusCode == 429 && resp.Header.Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
	}
	want := []int{200, 200, 200, 200, 429, 429}
	for i := range want {
		if codes[i] != want[i] {
			t.Fatalf("statuses %v, want %v", codes, want)
		}
	}
}
