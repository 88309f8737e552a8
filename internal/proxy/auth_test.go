package proxy_test

import (
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/miekg/dns"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// dnsServer answers A queries on loopback from a fixed table and counts
// every query, so tests can prove what was (not) resolved.
type dnsServer struct {
	addr    string
	queries atomic.Int64
	answers map[string]string // fqdn → IPv4; missing → NXDOMAIN
	silent  atomic.Bool       // never answer (timeouts)
}

func newDNSServer(t *testing.T, answers map[string]string) *dnsServer {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dnsServer{addr: pc.LocalAddr().String(), answers: answers}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		s.queries.Add(1)
		if s.silent.Load() {
			return
		}
		m := new(dns.Msg)
		m.SetReply(req)
		q := req.Question[0]
		ip, ok := s.answers[strings.ToLower(q.Name)]
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case q.Qtype == dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.ParseIP(ip)})
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return s
}

func TestAuthenticationOutcomes(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	basic := func(pass string) string {
		return "Basic " + base64.StdEncoding.EncodeToString([]byte("anyone:"+pass))
	}
	hs512, _ := jwt.NewWithClaims(jwt.SigningMethodHS512, jwt.MapClaims{
		"user_id": 9, "token_id": 77, "allowed_regions": []string{"us-east"}, "exp": time.Now().Add(time.Hour).Unix(),
	}).SignedString([]byte(testSecret))
	none, _ := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{
		"user_id": "u", "token_id": "t", "allowed_regions": []string{"*"}, "exp": time.Now().Add(time.Hour).Unix(),
	}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	expired, _ := auth.Mint([]byte(testSecret), auth.MintOptions{TokenID: "t", Regions: []string{"us-east"},
		TTL: time.Hour, Now: time.Now().Add(-3 * time.Hour)})
	cases := []struct {
		name   string
		auth   string
		status int
	}{
		{"bearer", e.bearer(), 200},
		{"basic with jwt password", basic(e.token), 200},
		{"HS512 numeric ids", "Bearer " + hs512, 200},
		{"wildcard region", "Bearer " + e.mint("u", "t-star", []string{"*"}, time.Hour), 200},
		{"missing", "", 407},
		{"garbage", "Bearer nonsense", 407},
		{"alg none", "Bearer " + none, 407},
		{"expired", "Bearer " + expired, 407},
		{"huge header", "Bearer " + strings.Repeat("x", 10000), 407},
		{"wrong region", "Bearer " + e.mint("u", "t-eu", []string{"eu-west"}, time.Hour), 403},
	}
	for _, c := range cases {
		conn, br, status := e.h1Connect(echo.addr(), c.auth, nil)
		_ = br
		conn.Close()
		if status != c.status {
			t.Errorf("%s: CONNECT status %d, want %d", c.name, status, c.status)
		}
	}
	// A 407 carries both challenges so browsers can answer with Basic.
	resp, err := e.h1Client("").Get("http://" + echo.addr() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ch := resp.Header.Values("Proxy-Authenticate")
	if resp.StatusCode != 407 || len(ch) != 2 || ch[0] != `Bearer realm="pinaka"` || ch[1] != `Basic realm="pinaka"` {
		t.Errorf("407 challenges: %d %q", resp.StatusCode, ch)
	}
	// HTTP/2 stream without credentials.
	resp2, up, err := h2Connect(e.h2Conn(), echo.addr(), "")
	if err != nil {
		t.Fatal(err)
	}
	up.Close()
	resp2.Body.Close()
	if resp2.StatusCode != 407 || len(resp2.Header.Values("Proxy-Authenticate")) != 2 {
		t.Errorf("h2 407: %d %v", resp2.StatusCode, resp2.Header)
	}
	// Refusals are recorded, with the identity when there is one.
	r := e.waitRecord(func(r recordT) bool { return r.StatusCode == 403 })
	if r.TokenID != "t-eu" || r.Success || r.Error != "region_not_allowed" {
		t.Errorf("403 record %+v", r)
	}
	r = e.waitRecord(func(r recordT) bool { return r.StatusCode == 407 })
	if r.TokenID != "" || r.Success || !strings.HasPrefix(r.Error, "auth_") {
		t.Errorf("407 record %+v", r)
	}
	if strings.Contains(e.logbuf.String(), e.token) || strings.Contains(e.logbuf.String(), testSecret) {
		t.Error("the log contains a whole token or the secret")
	}
}

// No DNS lookup and no dial happens for a request that fails
// authentication, whatever the target.
func TestAuthenticateBeforeResolving(t *testing.T) {
	ns := newDNSServer(t, map[string]string{"origin.test.": "127.0.0.1"})
	e := startProxy(t, map[string]string{"DNS_SERVERS": ns.addr})
	echo := newEchoServer(t)
	_, port, _ := net.SplitHostPort(echo.addr())
	target := "origin.test:" + port

	for _, auth := range []string{"", "Bearer bad", "Bearer " + e.mint("u", "t", []string{"eu-west"}, time.Hour)} {
		conn, _, status := e.h1Connect(target, auth, nil)
		conn.Close()
		if status != 407 && status != 403 {
			t.Fatalf("status %d", status)
		}
		resp, err := e.h1Client(auth).Get("http://" + target + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if q := ns.queries.Load(); q != 0 {
		t.Fatalf("%d DNS queries before authentication", q)
	}
	if n := echo.accepts(); n != 0 {
		t.Fatalf("%d connections reached the origin before authentication", n)
	}
	// Authenticated, the name resolves through DNS_SERVERS and connects.
	conn, _, status := e.h1Connect(target, e.bearer(), nil)
	conn.Close()
	if status != 200 || ns.queries.Load() == 0 {
		t.Fatalf("authenticated CONNECT: %d, %d queries", status, ns.queries.Load())
	}
}

func TestUpstreamErrorsMapToStatuses(t *testing.T) {
	ns := newDNSServer(t, map[string]string{
		"private.test.": "10.0.0.7",
		"meta.test.":    "169.254.169.254",
	})
	e := startProxy(t, map[string]string{"DNS_SERVERS": ns.addr, "UPSTREAM_RESPONSE_TIMEOUT": "300ms", "DNS_TIMEOUT": "300ms"})

	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedAddr := closed.Addr().String()
	closed.Close()

	// An origin that accepts and never answers.
	silent, _ := net.Listen("tcp", "127.0.0.1:0")
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c) }()
		}
	}()

	c := e.h1Client(e.bearer())
	cases := []struct {
		url         string
		status      int
		proxyStatus string
	}{
		{"http://nowhere.test/", 502, "dns_error"},
		{"http://" + closedAddr + "/", 502, "connection_refused"},
		{"http://" + silent.Addr().String() + "/", 504, "http_response_timeout"},
		{"http://private.test/", 403, "destination_ip_prohibited"},
		{"http://meta.test/latest/meta-data/", 403, "destination_ip_prohibited"},
	}
	for _, cs := range cases {
		resp, err := c.Get(cs.url)
		if err != nil {
			t.Errorf("%s: %v", cs.url, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != cs.status {
			t.Errorf("%s: %d %q, want %d", cs.url, resp.StatusCode, body, cs.status)
		}
		if cs.proxyStatus != "" && !strings.Contains(resp.Header.Get("Proxy-Status"), "error="+cs.proxyStatus) {
			t.Errorf("%s: Proxy-Status %q", cs.url, resp.Header.Get("Proxy-Status"))
		}
		if len(body) == 0 || len(body) > 200 {
			t.Errorf("%s: reason %q should be short and present", cs.url, body)
		}
	}
	// CONNECT errors too, then a DNS timeout.
	conn, _, status := e.h1Connect(closedAddr, e.bearer(), nil)
	conn.Close()
	if status != 502 {
		t.Errorf("CONNECT refused: %d", status)
	}
	ns.silent.Store(true)
	conn, _, status = e.h1Connect("slow.test:443", e.bearer(), nil)
	conn.Close()
	if status != 504 {
		t.Errorf("CONNECT with DNS timeout: %d, want 504", status)
	}
	// And the process is healthy afterwards.
	o := newOrigin(t)
	resp, err := c.Get(o.URL + "/after")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("after errors: %v %v", err, resp)
	}
	resp.Body.Close()
}

func TestRateLimitPerToken(t *testing.T) {
	e := startProxy(t, map[string]string{"RATE_LIMIT_REQUESTS_PER_MINUTE": "60", "RATE_LIMIT_BURST_SIZE": "3"})
	o := newOrigin(t)
	c := e.h1Client(e.bearer())
	var statuses []int
	var retryAfter string
	for i := 0; i < 5; i++ {
		resp, err := c.Get(o.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		statuses = append(statuses, resp.StatusCode)
		if resp.StatusCode == 429 {
			retryAfter = resp.Header.Get("Retry-After")
		}
	}
	if statuses[0] != 200 || statuses[2] != 200 || statuses[3] != 429 || statuses[4] != 429 {
		t.Fatalf("statuses %v, want 3×200 then 429", statuses)
	}
	if retryAfter != "1" && retryAfter != "2" {
		t.Errorf("Retry-After %q, want about 1s at 60/min", retryAfter)
	}
	// CONNECT and HTTP/2 streams draw from the same bucket.
	conn, _, status := e.h1Connect(o.Listener.Addr().String(), e.bearer(), nil)
	conn.Close()
	if status != 429 {
		t.Errorf("CONNECT over the limit: %d", status)
	}
	// Another token is unaffected.
	other := e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	resp, err := e.h1Client("Bearer " + other).Get(o.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("other token: %d", resp.StatusCode)
	}
	r := e.waitRecord(func(r recordT) bool { return r.StatusCode == 429 })
	if !r.RateLimited || r.TokenID != "tok-1" || r.Success {
		t.Errorf("429 record %+v", r)
	}
}

func TestFailedAuthThrottledPerIP(t *testing.T) {
	e := startProxy(t, map[string]string{"AUTH_FAILURES_PER_MINUTE": "3"})
	echo := newEchoServer(t)
	var last int
	for i := 0; i < 6; i++ {
		conn, _, status := e.h1Connect(echo.addr(), "Bearer wrong", nil)
		conn.Close()
		last = status
	}
	if last != http.StatusTooManyRequests {
		t.Errorf("after 6 failures: %d, want 429", last)
	}
}

// Malformed forwarding targets, sent as raw request lines because Go's
// client would normalise them.
func TestForwardMalformedTargets(t *testing.T) {
	e := startProxy(t, nil)
	for _, target := range []string{
		"http://[fe80::1%25eth0]/",
		"http://[127.0.0.1]/",
		"http://user:pw@127.0.0.1:8080/",
		"http://127.0.0.1:0/",
		"http://127.0.0.1:99999/",
		"ftp://127.0.0.1/",
	} {
		if got := e.rawStatus("GET " + target + " HTTP/1.1\r\nHost: x\r\nProxy-Authorization: " + e.bearer() + "\r\n\r\n"); got != 400 {
			t.Errorf("GET %s: %d, want 400", target, got)
		}
	}
}
