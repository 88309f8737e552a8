package proxy_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// firstByteDelay is how long the test origins wait before their first
// byte: a delay the test causes, so ttfb_ms must be at least this (a lower
// bound, not a performance threshold).
const firstByteDelay = 200 * time.Millisecond

// us is a record timing in microseconds (its resolution); -1 when absent.
func us(m accesslog.Millis) int64 {
	d, ok := m.Duration()
	if !ok {
		return -1
	}
	return d.Microseconds()
}

// checkTimings asserts the invariant of every record: the phases on the
// way to the origin fit before its first byte, which fits in the
// duration. Compared in integer microseconds (the fields' resolution):
// float sums could be off by one ulp.
func checkTimings(t *testing.T, what string, r recordT) {
	t.Helper()
	sum := max(us(r.DNSMS), 0) + max(us(r.ConnectMS), 0) + max(us(r.TLSMS), 0)
	ttfb := us(r.TTFBMS)
	if ttfb >= 0 && sum > ttfb {
		t.Errorf("%s: dns %v + connect %v + tls %v > ttfb %v", what, us(r.DNSMS), us(r.ConnectMS), us(r.TLSMS), ttfb)
	}
	if ttfb > r.DurationMS*1000 {
		t.Errorf("%s: ttfb %dµs > duration %dms", what, ttfb, r.DurationMS)
	}
	if sum > r.DurationMS*1000 {
		t.Errorf("%s: phases %dµs > duration %dms", what, sum, r.DurationMS)
	}
}

// timedOrigin is an HTTP origin: /slow answers after firstByteDelay,
// /close answers at once and closes the connection, /spoof sends 103 and
// then 200, both with a Pinaka-Request-Id of its own.
func timedOrigin(t *testing.T, secure bool) *httptest.Server {
	t.Helper()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/slow":
			time.Sleep(firstByteDelay)
		case "/close":
			w.Header().Set("Connection", "close")
		case "/spoof":
			w.Header().Set(accesslog.RequestIDHeader, "origin-made-this-up")
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
		}
		w.Header().Set(accesslog.RequestIDHeader, "origin-made-this-up")
		io.WriteString(w, "ok "+r.URL.Path)
	})
	var s *httptest.Server
	if secure {
		s = httptest.NewTLSServer(h)
	} else {
		s = httptest.NewServer(h)
	}
	t.Cleanup(s.Close)
	return s
}

// histCount is the sample count of a histogram series of the proxy's
// registry; 0 when there is none.
func histCount(t *testing.T, e *env, name string, labels ...string) uint64 {
	t.Helper()
	mfs, err := e.app.Metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for i := 0; i < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue series
				}
			}
			return m.GetHistogram().GetSampleCount()
		}
	}
	return 0
}

func port(t *testing.T, hostport string) string {
	t.Helper()
	_, p, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Forwarding over HTTP/1.1 to an origin behind the test's DNS server that
// delays its first byte: a fresh name is resolved (dns_ms > 0), a second
// connection finds it in the cache (dns_ms 0), a pooled connection has
// neither DNS nor connect; ttfb_ms covers the delay; the request id in the
// record is the one the client got.
func TestRecordTimingsForwardHTTP1(t *testing.T) {
	o := timedOrigin(t, false)
	dnsSrv := newDNSServer(t, map[string]string{"origin.test.": "127.0.0.1"})
	e := startProxy(t, map[string]string{"DNS_SERVERS": dnsSrv.addr})
	c := e.h1Client(e.bearer())
	base := "http://origin.test:" + port(t, o.Listener.Addr().String())

	get := func(path string) (accesslog.Record, string) {
		t.Helper()
		resp, err := c.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok "+path {
			t.Fatalf("GET %s: %d %q", path, resp.StatusCode, body)
		}
		id := resp.Header.Get(accesslog.RequestIDHeader)
		if id == "" || len(resp.Header.Values(accesslog.RequestIDHeader)) != 1 {
			t.Fatalf("GET %s: %s = %q", path, accesslog.RequestIDHeader, resp.Header.Values(accesslog.RequestIDHeader))
		}
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == id })
		checkTimings(t, path, r)
		return r, id
	}

	// 1: fresh name, fresh connection, which the origin then closes.
	r, _ := get("/close")
	if us(r.DNSMS) <= 0 || us(r.ConnectMS) < 0 || us(r.TLSMS) != -1 || us(r.TTFBMS) <= 0 {
		t.Errorf("fresh: dns %d connect %d tls %d ttfb %d (µs), want dns > 0, connect and ttfb set, no tls", us(r.DNSMS), us(r.ConnectMS), us(r.TLSMS), us(r.TTFBMS))
	}
	if r.UpstreamAddr != o.Listener.Addr().String() {
		t.Errorf("upstream_addr %q, want %q", r.UpstreamAddr, o.Listener.Addr())
	}
	if dnsSrv.queries.Load() == 0 {
		t.Error("the DNS server saw no query")
	}

	// 2: a new connection; the name is in the cache.
	r, _ = get("/slow")
	if us(r.DNSMS) != 0 || us(r.ConnectMS) < 0 {
		t.Errorf("cached: dns %d connect %d (µs), want dns 0 (cache) and a connect", us(r.DNSMS), us(r.ConnectMS))
	}
	if us(r.TTFBMS) < firstByteDelay.Microseconds() {
		t.Errorf("ttfb %dµs, but the origin waited %v before its first byte", us(r.TTFBMS), firstByteDelay)
	}

	// 3: the pooled connection: no DNS, no connect; the address is known.
	r, _ = get("/slow")
	if us(r.DNSMS) != -1 || us(r.ConnectMS) != -1 || us(r.TTFBMS) < firstByteDelay.Microseconds() {
		t.Errorf("pooled: dns %d connect %d ttfb %d (µs), want no dns, no connect, ttfb ≥ %v", us(r.DNSMS), us(r.ConnectMS), us(r.TTFBMS), firstByteDelay)
	}
	if r.UpstreamAddr != o.Listener.Addr().String() {
		t.Errorf("pooled upstream_addr %q", r.UpstreamAddr)
	}
	if r.CloseReason != "" {
		t.Errorf("close_reason %q on a forwarded request", r.CloseReason)
	}

	for _, h := range []struct {
		name   string
		labels []string
		want   uint64
	}{
		{"pinaka_dns_lookup_seconds", []string{"protocol", "HTTP/1.1", "kind", "forward", "outcome", "ok"}, 1},
		{"pinaka_dns_lookup_seconds", []string{"protocol", "HTTP/1.1", "kind", "forward", "outcome", "cached"}, 1},
		{"pinaka_upstream_connect_seconds", []string{"protocol", "HTTP/1.1", "kind", "forward", "outcome", "ok"}, 2},
		{"pinaka_upstream_ttfb_seconds", []string{"protocol", "HTTP/1.1", "kind", "forward", "outcome", "ok"}, 3},
	} {
		if n := histCount(t, e, h.name, h.labels...); n != h.want {
			t.Errorf("%s%v: %d samples, want %d", h.name, h.labels, n, h.want)
		}
	}
}

// Forwarding to an https origin (absolute-form over HTTP/1.1): the TLS
// handshake Pinaka does is in tls_ms.
func TestRecordTimingsForwardHTTPS(t *testing.T) {
	o := timedOrigin(t, true)
	// httptest's certificate is for example.com: the test's DNS says where
	// that is.
	dnsSrv := newDNSServer(t, map[string]string{"example.com.": "127.0.0.1"})
	e := startProxy(t, map[string]string{"DNS_SERVERS": dnsSrv.addr})
	target := "https://example.com:" + port(t, o.Listener.Addr().String()) + "/slow"
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: %s\r\n\r\n", target, e.bearer())
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "ok /slow" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	id := resp.Header.Get(accesslog.RequestIDHeader)
	r := e.waitRecord(func(r recordT) bool { return r.RequestID == id && id != "" })
	checkTimings(t, "https", r)
	if us(r.DNSMS) <= 0 || us(r.ConnectMS) < 0 || us(r.TLSMS) <= 0 || us(r.TTFBMS) < firstByteDelay.Microseconds() {
		t.Errorf("dns %d connect %d tls %d ttfb %d (µs), want dns > 0, tls > 0, ttfb ≥ %v", us(r.DNSMS), us(r.ConnectMS), us(r.TLSMS), us(r.TTFBMS), firstByteDelay)
	}
	if r.UpstreamAddr != o.Listener.Addr().String() {
		t.Errorf("upstream_addr %q, want %q", r.UpstreamAddr, o.Listener.Addr())
	}
}

// Forwarding over HTTP/2 (our engine): the id arrives in the response
// header and in the record, and the origin's own Pinaka-Request-Id never
// reaches the client, even after a 103.
func TestRecordTimingsForwardHTTP2(t *testing.T) {
	o := timedOrigin(t, false)
	e := startProxy(t, nil)
	cc := e.h2Conn()
	for _, path := range []string{"/slow", "/spoof"} {
		req, _ := http.NewRequest("GET", o.URL+path, nil)
		req.Header.Set("Proxy-Authorization", e.bearer())
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		ids := resp.Header.Values(accesslog.RequestIDHeader)
		if resp.StatusCode != 200 || string(body) != "ok "+path || len(ids) != 1 || ids[0] == "origin-made-this-up" {
			t.Fatalf("%s: %d %q, %s %q", path, resp.StatusCode, body, accesslog.RequestIDHeader, ids)
		}
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == ids[0] })
		checkTimings(t, path, r)
		if r.Protocol != "HTTP/2" || us(r.TTFBMS) <= 0 || r.UpstreamAddr != o.Listener.Addr().String() {
			t.Errorf("%s record: %+v", path, r)
		}
		if path == "/slow" && us(r.TTFBMS) < firstByteDelay.Microseconds() {
			t.Errorf("ttfb %dµs < the origin's delay %v", us(r.TTFBMS), firstByteDelay)
		}
	}
	if n := histCount(t, e, "pinaka_upstream_ttfb_seconds", "protocol", "HTTP/2", "kind", "forward", "outcome", "ok"); n != 2 {
		t.Errorf("HTTP/2 forward ttfb samples: %d, want 2", n)
	}
}

// tcpOrigin waits firstByteDelay after accepting, writes "hello", then
// echoes until EOF (closeFirst: closes right after "hello" instead).
func tcpOrigin(t *testing.T, closeFirst bool) string {
	return testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		time.Sleep(firstByteDelay)
		if _, err := io.WriteString(c, "hello"); err != nil || closeFirst {
			return
		}
		_, _ = io.Copy(c, c)
	})
}

// CONNECT tunnels: ttfb_ms is the first byte back from the origin, the 200
// carries the request id, and close_reason says who ended the tunnel.
func TestRecordTimingsConnectTunnels(t *testing.T) {
	echo := tcpOrigin(t, false)
	closing := tcpOrigin(t, true)
	dnsSrv := newDNSServer(t, map[string]string{"tunnel.test.": "127.0.0.1"})
	e := startProxy(t, map[string]string{"DNS_SERVERS": dnsSrv.addr, "TUNNEL_IDLE_TIMEOUT": "1s"})

	t.Run("HTTP/1.1, client closes", func(t *testing.T) {
		target := "tunnel.test:" + port(t, echo)
		c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n", target, target, e.bearer())
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		id := resp.Header.Get(accesslog.RequestIDHeader)
		echoOnceConn(t, c, br, "hello", "")
		echoOnceConn(t, c, br, "ping", "ping")
		c.Close()
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == id && id != "" })
		checkTimings(t, "h1 tunnel", r)
		if us(r.DNSMS) <= 0 || us(r.ConnectMS) < 0 || us(r.TLSMS) != -1 || us(r.TTFBMS) < firstByteDelay.Microseconds() {
			t.Errorf("dns %d connect %d tls %d ttfb %d (µs)", us(r.DNSMS), us(r.ConnectMS), us(r.TLSMS), us(r.TTFBMS))
		}
		if r.CloseReason != "client_closed" || r.UpstreamAddr != echo || r.TargetURL != target {
			t.Errorf("close_reason %q upstream_addr %q target %q", r.CloseReason, r.UpstreamAddr, r.TargetURL)
		}
	})

	t.Run("HTTP/2, origin closes", func(t *testing.T) {
		cc := e.h2Conn()
		resp, pw, err := h2Connect(cc, closing, e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		id := resp.Header.Get(accesslog.RequestIDHeader)
		got, _ := io.ReadAll(resp.Body) // until the origin's END_STREAM
		if string(got) != "hello" {
			t.Fatalf("read %q", got)
		}
		pw.Close()
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == id && id != "" })
		checkTimings(t, "h2 tunnel", r)
		if us(r.DNSMS) != -1 || us(r.TTFBMS) < firstByteDelay.Microseconds() || r.CloseReason != "origin_closed" {
			t.Errorf("dns %d ttfb %d (µs), close_reason %q; want no dns (IP literal), ttfb ≥ %v, origin_closed", us(r.DNSMS), us(r.TTFBMS), r.CloseReason, firstByteDelay)
		}
	})

	t.Run("idle timeout", func(t *testing.T) {
		cc := e.h2Conn()
		resp, pw, err := h2Connect(cc, echo, e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		defer pw.Close()
		id := resp.Header.Get(accesslog.RequestIDHeader)
		_, _ = io.ReadAll(resp.Body) // "hello", then quiet until TUNNEL_IDLE_TIMEOUT
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == id && id != "" })
		if r.CloseReason != "idle_timeout" || r.Error != "tunnel_idle_timeout" {
			t.Errorf("close_reason %q error %q, want idle_timeout", r.CloseReason, r.Error)
		}
	})

	if n := histCount(t, e, "pinaka_upstream_ttfb_seconds", "protocol", "HTTP/2", "kind", "connect", "outcome", "ok"); n != 2 {
		t.Errorf("HTTP/2 tunnel ttfb samples: %d, want 2", n)
	}
	if n := histCount(t, e, "pinaka_upstream_connect_seconds", "protocol", "HTTP/1.1", "kind", "connect", "outcome", "ok"); n != 1 {
		t.Errorf("HTTP/1.1 tunnel connect samples: %d, want 1", n)
	}
}

// echoOnceConn writes msg (if any) and reads want back.
func echoOnceConn(t *testing.T, w io.Writer, r io.Reader, want, msg string) {
	t.Helper()
	if msg != "" {
		if _, err := io.WriteString(w, msg); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, len(want))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != want {
		t.Fatalf("read %q, %v; want %q", buf, err, want)
	}
}

// An RFC 8441 WebSocket to a wss origin: the TLS handshake Pinaka does is
// in tls_ms, ttfb_ms is the origin's 101, and the client ending the stream
// is client_closed.
func TestRecordTimingsWebSocket(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, true)
	hc := e.h2Raw()
	resp, pw := extendedConnect(t, hc, "https", o.hostPort(), "/echo", "websocket", e.bearer(), http.Header{"Sec-Websocket-Version": {"13"}})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	id := resp.Header.Get(accesslog.RequestIDHeader)
	wsEcho(t, pw, resp.Body)
	pw.Close() // END_STREAM: the origin sees EOF and closes after it
	_, _ = io.Copy(io.Discard, resp.Body)
	r := e.waitRecord(func(r recordT) bool { return r.RequestID == id && id != "" })
	checkTimings(t, "wss", r)
	if us(r.ConnectMS) < 0 || us(r.TLSMS) <= 0 || us(r.TTFBMS) <= 0 || r.CloseReason != "client_closed" || r.UpstreamAddr != o.hostPort() {
		t.Errorf("connect %d tls %d ttfb %d (µs), close_reason %q, upstream_addr %q", us(r.ConnectMS), us(r.TLSMS), us(r.TTFBMS), r.CloseReason, r.UpstreamAddr)
	}
	if n := histCount(t, e, "pinaka_upstream_ttfb_seconds", "protocol", "HTTP/2", "kind", "websocket", "outcome", "ok"); n != 1 {
		t.Errorf("websocket ttfb samples: %d, want 1", n)
	}
}

// Every answer carries the request id, refusals included, over HTTP/1.1
// and HTTP/2, and it is the record's.
func TestRequestIDOnEveryAnswer(t *testing.T) {
	e := startProxy(t, nil)
	o := timedOrigin(t, false)
	wrongRegion := "Bearer " + e.mint("user-2", "tok-2", []string{"eu-west"}, time.Hour)
	refused := testutil.FreePort(t) // nothing listens there
	cc := e.h2Conn()
	type answer struct {
		status int
		id     string
	}
	h1 := func(method, target, auth string) answer {
		c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		host := "localhost" // origin-form: the proxy itself
		if u, err := url.Parse(target); err == nil && u.Host != "" {
			host = u.Host
		} else if method == http.MethodConnect {
			host = target
		}
		req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\n", method, target, host)
		if auth != "" {
			req += "Proxy-Authorization: " + auth + "\r\n"
		}
		io.WriteString(c, req+"\r\n")
		br := bufio.NewReader(c)
		var first string // the id of an interim (1xx) answer
		for {
			resp, err := http.ReadResponse(br, &http.Request{Method: method})
			if err != nil {
				t.Fatalf("%s %s: %v", method, target, err)
			}
			ids := resp.Header.Values(accesslog.RequestIDHeader)
			if len(ids) != 1 {
				t.Errorf("%s %s: %d answered with %s %q, want exactly one", method, target, resp.StatusCode, accesslog.RequestIDHeader, ids)
				return answer{resp.StatusCode, ""}
			}
			if resp.StatusCode >= 200 {
				if first != "" && first != ids[0] {
					t.Errorf("%s %s: the 1xx had id %q, the answer %q", method, target, first, ids[0])
				}
				return answer{resp.StatusCode, ids[0]}
			}
			first = ids[0]
		}
	}
	h2 := func(method, target, auth string) answer {
		var req *http.Request
		if method == http.MethodConnect {
			resp, pw, err := h2Connect(cc, target, auth)
			if err != nil {
				t.Fatal(err)
			}
			pw.Close()
			resp.Body.Close()
			return answer{resp.StatusCode, resp.Header.Get(accesslog.RequestIDHeader)}
		}
		req, _ = http.NewRequest(method, target, nil)
		if auth != "" {
			req.Header.Set("Proxy-Authorization", auth)
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return answer{resp.StatusCode, resp.Header.Get(accesslog.RequestIDHeader)}
	}
	seen := map[string]bool{}
	for _, tc := range []struct {
		name         string
		send         func(method, target, auth string) answer
		method, auth string
		target       string
		status       int
	}{
		{"h1 407", h1, "GET", "", o.URL + "/", 407},
		{"h2 407", h2, "GET", "", o.URL + "/", 407},
		{"h1 CONNECT 407", h1, "CONNECT", "Bearer nonsense", o.Listener.Addr().String(), 407},
		{"h1 403 region", h1, "GET", wrongRegion, o.URL + "/", 403},
		{"h2 403 region", h2, "GET", wrongRegion, o.URL + "/", 403},
		{"h1 502 refused", h1, "GET", e.bearer(), "http://127.0.0.1:" + refused + "/", 502},
		{"h2 CONNECT 200", h2, "CONNECT", e.bearer(), o.Listener.Addr().String(), 200},
		{"h1 CONNECT 200", h1, "CONNECT", e.bearer(), o.Listener.Addr().String(), 200},
		{"h1 200 after 103", h1, "GET", e.bearer(), o.URL + "/spoof", 200},
		{"h1 400 not a proxy request", h1, "GET", "", "/", 400},
	} {
		a := tc.send(tc.method, tc.target, tc.auth)
		if a.status != tc.status || a.id == "" || a.id == "origin-made-this-up" || seen[a.id] {
			t.Errorf("%s: status %d, %s %q; want %d and a fresh id of ours", tc.name, a.status, accesslog.RequestIDHeader, a.id, tc.status)
			continue
		}
		seen[a.id] = true
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == a.id })
		if r.StatusCode != tc.status {
			t.Errorf("%s: the record with the id has status %d", tc.name, r.StatusCode)
		}
	}
}

// A WebSocket forwarded as an HTTP/1.1 Upgrade: the 101 carries the id,
// ttfb_ms is the origin's 101, and the client closing is client_closed.
func TestRecordTimingsUpgradeForwarded(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "GET http://%s/echo HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\nProxy-Authorization: %s\r\n\r\n",
		o.hostPort(), o.hostPort(), e.bearer())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("%v %v", resp, err)
	}
	ids := resp.Header.Values(accesslog.RequestIDHeader)
	if len(ids) != 1 {
		t.Fatalf("101 with %s %q", accesslog.RequestIDHeader, ids)
	}
	wsEcho(t, c, br)
	c.Close()
	r := e.waitRecord(func(r recordT) bool { return r.RequestID == ids[0] })
	checkTimings(t, "upgrade", r)
	if us(r.ConnectMS) < 0 || us(r.TTFBMS) <= 0 || r.CloseReason != "client_closed" || r.UpstreamAddr != o.hostPort() {
		t.Errorf("connect %d ttfb %d (µs), close_reason %q, upstream_addr %q", us(r.ConnectMS), us(r.TTFBMS), r.CloseReason, r.UpstreamAddr)
	}
	if n := histCount(t, e, "pinaka_upstream_ttfb_seconds", "protocol", "HTTP/1.1", "kind", "websocket", "outcome", "ok"); n != 1 {
		t.Errorf("forwarded upgrade ttfb samples (kind websocket): %d, want 1", n)
	}
}

// An origin that takes the request and never answers: no ttfb_ms in the
// record, and the ttfb histogram counts a timeout; a refused connection is
// a connect outcome "refused" with its connect_ms.
func TestRecordTimingsUpstreamFailures(t *testing.T) {
	e := startProxy(t, map[string]string{"UPSTREAM_RESPONSE_TIMEOUT": "300ms"})
	silent := testutil.ServeTCP(t, func(c net.Conn) { defer c.Close(); _, _ = io.Copy(io.Discard, c) })
	refused := "127.0.0.1:" + testutil.FreePort(t)
	c := e.h1Client(e.bearer())
	for _, tc := range []struct {
		target string
		status int
	}{{silent, http.StatusGatewayTimeout}, {refused, http.StatusBadGateway}} {
		resp, err := c.Get("http://" + tc.target + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		id := resp.Header.Get(accesslog.RequestIDHeader)
		if resp.StatusCode != tc.status || id == "" {
			t.Fatalf("%s: %d, id %q", tc.target, resp.StatusCode, id)
		}
		r := e.waitRecord(func(r recordT) bool { return r.RequestID == id })
		checkTimings(t, tc.target, r)
		if us(r.TTFBMS) != -1 || us(r.ConnectMS) < 0 || r.UpstreamAddr != tc.target {
			t.Errorf("%s: ttfb %d connect %d (µs) upstream_addr %q; want no ttfb, a connect, the address", tc.target, us(r.TTFBMS), us(r.ConnectMS), r.UpstreamAddr)
		}
	}
	for _, h := range []struct {
		name, outcome string
	}{
		{"pinaka_upstream_ttfb_seconds", "timeout"},
		{"pinaka_upstream_connect_seconds", "refused"},
		{"pinaka_upstream_connect_seconds", "ok"},
	} {
		if n := histCount(t, e, h.name, "protocol", "HTTP/1.1", "kind", "forward", "outcome", h.outcome); n != 1 {
			t.Errorf("%s{outcome=%q}: %d samples, want 1", h.name, h.outcome, n)
		}
	}
}
