package e2e

// Attacks on the built binary, each bounded in count and time and sent only
// to loopback, each followed (or accompanied) by a bystander who must still
// be served. Attackers use their own loopback source addresses (127.0.0.2
// and up), as separate clients on the internet would; the bystander comes
// from 127.0.0.1.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// failsafe bounds every wait of these tests, so a defence that does not
// work fails the test instead of hanging it. No passing run comes near it.
const failsafe = 15 * time.Second

// hostile starts the binary with an admin listener (for /metrics) and
// extra settings, and returns it with the admin address.
func hostile(t *testing.T, extra ...string) (*proc, string) {
	t.Helper()
	admin := "127.0.0.1:" + testutil.FreePort(t)
	return startPinaka(t, append([]string{"ADMIN_ADDR=" + admin, "LOG_LEVEL=info"}, extra...)...), admin
}

// echoOrigin answers every request with its method and path, after reading
// the whole body.
func echoOrigin(t *testing.T) *httptest.Server {
	t.Helper()
	o := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "origin: %s %s %d", r.Method, r.URL.Path, n)
	}))
	t.Cleanup(o.Close)
	return o
}

// dialFrom opens a TLS connection to the proxy from a chosen loopback
// source address.
func dialFrom(p *proc, src string, protos ...string) (*tls.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: failsafe}
	raw, err := d.Dial("tcp", p.Addr)
	if err != nil {
		return nil, err
	}
	if len(protos) == 0 {
		protos = []string{"http/1.1"}
	}
	c := tls.Client(raw, tlsConfig(protos...))
	_ = c.SetDeadline(time.Now().Add(failsafe))
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

// bystander forwards one GET through the proxy from 127.0.0.1 with its own
// token and fails the test unless it is served.
func bystander(t *testing.T, p *proc, origin string) {
	t.Helper()
	c, err := dialFrom(p, "127.0.0.1")
	if err != nil {
		t.Fatalf("bystander: connecting: %v", err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s/bystander HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n",
		origin, strings.TrimPrefix(origin, "http://"), mint(t, "bystander", "us-east"))
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("bystander: no answer: %v", err)
	}
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "/bystander") {
		t.Fatalf("bystander: %d %q, want 200 from the origin", res.StatusCode, body)
	}
}

// metricsText returns the proxy's /metrics page.
func metricsText(t *testing.T, admin string) string {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading /metrics: %v", err)
	}
	return string(b)
}

// metricValue sums the samples of one metric whose labels contain
// labelPart ("" for all).
func metricValue(text, name, labelPart string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? ([0-9.e+-]+)$`)
	sum := 0.0
	for _, m := range re.FindAllStringSubmatch(text, -1) {
		if labelPart == "" || strings.Contains(m[1], labelPart) {
			v, _ := strconv.ParseFloat(m[2], 64)
			sum += v
		}
	}
	return sum
}

// rssMB is the resident memory of the proxy process.
func rssMB(t *testing.T, p *proc) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Cmd.Process.Pid))
	if err != nil {
		t.Fatalf("reading the proxy's memory: %v", err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no VmRSS in /proc status")
	}
	kb, _ := strconv.Atoi(string(m[1]))
	return float64(kb) / 1024
}

// parallel runs f(i) for i in [0, n) with at most width at once and waits
// for all of them, at most failsafe.
func parallel(t *testing.T, n, width int, f func(i int)) {
	t.Helper()
	sem := make(chan struct{}, width)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f(i)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * failsafe):
		t.Fatal("attack clients still waiting: a connection hangs")
	}
}

// Item 1: requests that announce a body and never send it. Refusals must
// answer at once and close; forwards must end at REQUEST_BODY_IDLE_TIMEOUT;
// one address must not take every connection slot.
func TestAttackUnsentBodies(t *testing.T) {
	origin := echoOrigin(t)
	p, admin := hostile(t,
		"MAX_CONNECTIONS=200", "MAX_CONNECTIONS_PER_IP=60", "MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP=20",
		"REQUEST_BODY_IDLE_TIMEOUT=2s", "HEADER_READ_TIMEOUT=30s")

	// Without credentials, 300 connections from one address, each sending
	// a request with a body it never sends (Content-Length and chunked).
	var answered, closed, shed atomic.Int64
	parallel(t, 300, 100, func(i int) {
		c, err := dialFrom(p, "127.0.0.2")
		if err != nil {
			shed.Add(1) // closed at accept: the per-address caps
			return
		}
		defer c.Close()
		framing := "Content-Length: 100000"
		if i%2 == 1 {
			framing = "Transfer-Encoding: chunked"
		}
		if _, err := fmt.Fprintf(c, "POST %s/upload HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", origin.URL, framing); err != nil {
			shed.Add(1)
			return
		}
		br := bufio.NewReader(c)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			shed.Add(1) // shed after the handshake began
			return
		}
		if res.StatusCode == http.StatusProxyAuthRequired {
			answered.Add(1)
		}
		res.Body.Close()
		if _, err := io.Copy(io.Discard, br); err == nil {
			closed.Add(1) // EOF: the proxy closed the connection
		}
	})
	t.Logf("300 credential-less unsent bodies: %d answered 407, %d closed by the proxy, %d shed at accept",
		answered.Load(), closed.Load(), shed.Load())
	if answered.Load() == 0 || answered.Load()+shed.Load() != 300 || closed.Load() != answered.Load() {
		t.Fatalf("want every connection answered 407 and closed, or shed: %d answered, %d closed, %d shed",
			answered.Load(), closed.Load(), shed.Load())
	}
	bystander(t, p, origin.URL)

	// Connections that finish the handshake and send nothing: one address
	// gets MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP of them, the rest are
	// shed, and the bystander is still served while they are held.
	var held []*tls.Conn
	heldShed := 0
	for i := 0; i < 60; i++ {
		c, err := dialFrom(p, "127.0.0.3")
		if err != nil {
			heldShed++
			continue
		}
		// A shed connection fails its handshake or reads EOF at once.
		_ = c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			c.Close()
			heldShed++
			continue
		}
		held = append(held, c)
	}
	t.Logf("idle connections from one address: %d held, %d shed", len(held), heldShed)
	if len(held) != 20 {
		t.Errorf("one address holds %d idle unauthenticated connections, want MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP=20", len(held))
	}
	bystander(t, p, origin.URL)
	for _, c := range held {
		c.Close()
	}

	// With credentials: forwards whose body never comes end with 408 at
	// REQUEST_BODY_IDLE_TIMEOUT, over HTTP/1.1 and HTTP/2.
	tok := mint(t, "slow-body", "us-east")
	var timedOut atomic.Int64
	parallel(t, 20, 20, func(i int) {
		c, err := dialFrom(p, "127.0.0.4")
		if err != nil {
			t.Errorf("authenticated client %d: %v", i, err)
			return
		}
		defer c.Close()
		fmt.Fprintf(c, "POST %s/slow HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\nContent-Length: 1000\r\n\r\npartial", origin.URL, tok)
		br := bufio.NewReader(c)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Errorf("authenticated client %d: no answer: %v", i, err)
			return
		}
		res.Body.Close()
		if res.StatusCode == http.StatusRequestTimeout {
			timedOut.Add(1)
		}
	})
	if timedOut.Load() != 20 {
		t.Errorf("%d of 20 stalled HTTP/1.1 bodies got 408", timedOut.Load())
	}
	h2c, err := dialFrom(p, "127.0.0.4", "h2")
	if err != nil {
		t.Fatal(err)
	}
	_ = h2c.SetDeadline(time.Time{})
	cc, err := (&http2.Transport{}).NewClientConn(h2c)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	defer pw.Close()
	u, _ := url.Parse(origin.URL + "/slow-h2")
	req := &http.Request{Method: http.MethodPost, URL: u, Host: u.Host, Body: pr, ContentLength: 1000,
		Header: http.Header{"Proxy-Authorization": {"Bearer " + tok}}}
	ctx, cancel := context.WithTimeout(context.Background(), failsafe)
	defer cancel()
	res, err := cc.RoundTrip(req.WithContext(ctx))
	if err != nil {
		t.Fatalf("HTTP/2 stalled body: %v", err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusRequestTimeout {
		t.Errorf("HTTP/2 stalled body: status %d, want 408", res.StatusCode)
	}
	rec := p.waitRecord(t, "the HTTP/2 stalled body", func(r accesslog.Record) bool { return strings.HasSuffix(r.TargetURL, "/slow-h2") })
	if rec.StatusCode != http.StatusRequestTimeout || rec.Error != "client_body_timeout" {
		t.Errorf("record = %+v, want 408 client_body_timeout", rec)
	}
	bystander(t, p, origin.URL)

	m := metricsText(t, admin)
	if v := metricValue(m, "pinaka_connections_refused_total", `reason="per_ip_unauthenticated"`); v == 0 {
		t.Error("no connection counted as refused by the per-address unauthenticated cap")
	}
	rss := rssMB(t, p)
	t.Logf("proxy RSS after the attacks: %.1f MB", rss)
	if rss > 300 {
		t.Errorf("proxy RSS %.1f MB after a few hundred connections", rss)
	}
}

// Item 2: every label value comes from a fixed set. Thousands of unique
// methods, with and without credentials, leave /metrics as it was.
func TestAttackUniqueMethodsDoNotGrowMetrics(t *testing.T) {
	origin := echoOrigin(t)
	p, admin := hostile(t)
	bystander(t, p, origin.URL)
	before := len(metricsText(t, admin))

	tok := mint(t, "methods", "us-east")
	send := func(src string, n int, withToken bool) {
		c, err := dialFrom(p, src)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(4 * failsafe))
		br := bufio.NewReader(c)
		for i := 0; i < n; i++ {
			auth := ""
			if withToken {
				auth = "Proxy-Authorization: Bearer " + tok + "\r\n"
			}
			if i == n/2 {
				bystander(t, p, origin.URL) // while the methods pour in
			}
			fmt.Fprintf(c, "M%s%05d %s/m HTTP/1.1\r\nHost: x\r\n%s\r\n", src[len(src)-1:], i, origin.URL, auth)
			res, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}
	send("127.0.0.5", 3000, false)
	send("127.0.0.6", 300, true)
	after := metricsText(t, admin)
	t.Logf("/metrics: %d bytes before, %d after 3300 unique methods", before, len(after))
	if strings.Contains(after, `method="M`) {
		t.Fatal("a client's method became a label value")
	}
	if v := metricValue(after, "pinaka_requests_total", `method="other"`); v < 3300 {
		t.Errorf("pinaka_requests_total{method=\"other\"} = %v, want at least 3300", v)
	}
	if len(after)-before > 8<<10 {
		t.Errorf("/metrics grew by %d bytes", len(after)-before)
	}
	bystander(t, p, origin.URL)
}

// Item 3: a credential-less flood writes a bounded number of records and
// log lines, the suppressed ones are counted (in metrics and on the next
// record), and a valid token from the flooding address is still served.
func TestAttackCredentiallessFloodLogIsBounded(t *testing.T) {
	origin := echoOrigin(t)
	p, admin := hostile(t, "UNAUTHENTICATED_RECORDS_PER_MINUTE=60", "AUTH_FAILURES_PER_MINUTE=30")
	logBefore := len(p.Log.String())
	const flood = 3000
	c, err := dialFrom(p, "127.0.0.7")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(4 * failsafe))
	br := bufio.NewReader(c)
	statuses := map[int]int{}
	for i := 0; i < flood; i++ {
		auth := ""
		if i%2 == 1 { // half with a forged token: these trip the failed-auth throttle
			auth = "Proxy-Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.forged\r\n"
		}
		if i == flood/2 {
			bystander(t, p, origin.URL) // while the flood is on
		}
		fmt.Fprintf(c, "GET %s/flood HTTP/1.1\r\nHost: x\r\n%s\r\n", origin.URL, auth)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("flood request %d: %v", i, err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		statuses[res.StatusCode]++
	}
	logBytes := len(p.Log.String()) - logBefore
	written := countRecords(p, "127.0.0.7")
	t.Logf("flood of %d credential-less requests (%v): %d records, %d bytes of log", flood, statuses, written, logBytes)
	if statuses[http.StatusTooManyRequests] == 0 {
		t.Error("forged tokens were never throttled")
	}
	if written > 70 {
		t.Errorf("%d records written for one address's flood, want at most about UNAUTHENTICATED_RECORDS_PER_MINUTE", written)
	}
	if logBytes > 100<<10 {
		t.Errorf("the flood wrote %d bytes of log", logBytes)
	}

	// A valid token from the throttled address is served.
	c2, err := dialFrom(p, "127.0.0.7")
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	fmt.Fprintf(c2, "GET %s/office-colleague HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\n\r\n", origin.URL, mint(t, "colleague", "us-east"))
	res, err := http.ReadResponse(bufio.NewReader(c2), nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("a valid token from the throttled address got %d, want 200", res.StatusCode)
	}

	// The next refusal once the budget refills (one a second) carries the
	// suppressed count: records plus their counts add up to the flood.
	time.Sleep(1100 * time.Millisecond)
	fmt.Fprintf(c, "GET %s/flood HTTP/1.1\r\nHost: x\r\n\r\n", origin.URL)
	if res, err := http.ReadResponse(br, nil); err != nil {
		t.Fatal(err)
	} else {
		res.Body.Close()
	}
	var accounted, ownRecords int64
	waitFor(t, "the suppressed count on a record", func() bool {
		accounted, ownRecords = 0, 0
		for _, r := range p.records(t) {
			switch {
			case r.ClientIP != "127.0.0.7" || r.TokenID != "":
			case r.Error == "refusals_suppressed": // a summary stands for suppressed ones only
				accounted += r.Suppressed
			default:
				ownRecords++
				accounted += 1 + r.Suppressed
			}
		}
		return accounted == flood+1
	})
	t.Logf("%d records of that address account for %d refusals", ownRecords, accounted)
	m := metricsText(t, admin)
	if v := metricValue(m, "pinaka_unauthenticated_records_suppressed_total", ""); int64(v) != flood+1-ownRecords {
		t.Errorf("suppressed counter %v, want %d", v, flood+1-ownRecords)
	}
	bystander(t, p, origin.URL)
}

// countRecords counts the credential-less records of one client address.
func countRecords(p *proc, ip string) int {
	n := 0
	for _, line := range strings.Split(p.Log.String(), "\n") {
		if strings.Contains(line, `"msg":"request"`) && strings.Contains(line, `"client_ip":"`+ip+`"`) && strings.Contains(line, `"token_id":""`) {
			n++
		}
	}
	return n
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(failsafe)
	for !f() {
		if time.Now().After(deadline) {
			f()
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// streamingOrigin is a TCP origin that writes as fast as it can to every
// connection until it breaks.
func streamingOrigin(t *testing.T) string {
	t.Helper()
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	return testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(4 * failsafe))
		for i := 0; i < 8192; i++ { // 256 MB at most
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
}

// newH2Raw connects a bare HTTP/2 client to the proxy from src: the
// attacker controls every frame, including windows it never opens.
func newH2Raw(t *testing.T, p *proc, src string, settings ...http2.Setting) *testutil.H2Raw {
	t.Helper()
	c, err := dialFrom(p, src, "h2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(4 * failsafe))
	return testutil.NewH2Raw(t, c, settings...)
}

// Item 5: an HTTP/2 CONNECT tunnel whose client never opens its window
// makes no progress; it ends at TUNNEL_IDLE_TIMEOUT with its record.
func TestAttackZeroWindowTunnelEndsAtIdleTimeout(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, "TUNNEL_IDLE_TIMEOUT=2s")
	stream := streamingOrigin(t)
	h := newH2Raw(t, p, "127.0.0.8", http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	h.Headers(t, 1, false, ":method", "CONNECT", ":authority", stream,
		"proxy-authorization", "Bearer "+mint(t, "zero-window", "us-east"))
	start := time.Now()
	var got200, reset bool
	for !reset {
		f, err := h.Framer.ReadFrame()
		if err != nil {
			t.Fatalf("reading frames (200: %v): %v", got200, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = h.Framer.WriteSettingsAck()
			}
		case *http2.HeadersFrame:
			got200 = f.StreamID == 1
		case *http2.RSTStreamFrame:
			reset = f.StreamID == 1
		case *http2.DataFrame:
			if f.StreamID == 1 && f.StreamEnded() {
				reset = true
			}
		}
	}
	t.Logf("zero-window tunnel ended %v after it opened (TUNNEL_IDLE_TIMEOUT=2s)", time.Since(start).Round(10*time.Millisecond))
	if !got200 {
		t.Fatal("the tunnel never opened")
	}
	rec := p.waitRecord(t, "the zero-window tunnel", func(r accesslog.Record) bool { return r.TokenID == "zero-window" })
	if rec.Error != "tunnel_idle_timeout" {
		t.Errorf("record = %+v, want error tunnel_idle_timeout", rec)
	}
	bystander(t, p, origin.URL)
}

// Item 5: a forwarded HTTP/1.1 WebSocket upgrade that goes quiet ends at
// TUNNEL_IDLE_TIMEOUT, like a CONNECT tunnel.
func TestAttackIdleForwardedUpgradeEnds(t *testing.T) {
	origin := echoOrigin(t)
	upgrader := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		_ = brw.Flush()
		_, _ = io.Copy(io.Discard, c) // then silence, until the proxy hangs up
	}))
	t.Cleanup(upgrader.Close)
	p, _ := hostile(t, "TUNNEL_IDLE_TIMEOUT=2s")
	c, err := dialFrom(p, "127.0.0.9")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nProxy-Authorization: Bearer %s\r\n\r\n",
		upgrader.URL, mint(t, "idle-upgrade", "us-east"))
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", res, err)
	}
	start := time.Now()
	if _, err := io.Copy(io.Discard, br); err != nil {
		t.Fatalf("the idle upgraded connection was not closed: %v", err)
	}
	t.Logf("idle forwarded upgrade closed %v after the 101", time.Since(start).Round(10*time.Millisecond))
	rec := p.waitRecord(t, "the idle upgrade", func(r accesslog.Record) bool { return r.TokenID == "idle-upgrade" })
	if rec.StatusCode != http.StatusSwitchingProtocols || rec.Error != "tunnel_idle_timeout" {
		t.Errorf("record = %+v, want 101 tunnel_idle_timeout", rec)
	}
	bystander(t, p, origin.URL)
}

// Item 5: an HTTP/2 client that keeps the connection alive with PINGs but
// never reads. Its incoming segments keep resetting the kernel's
// zero-window probe clock, so TCP_USER_TIMEOUT never fires; the write-stall
// guard closes it.
func TestAttackPingsButNeverReads(t *testing.T) {
	origin := echoOrigin(t)
	p, admin := hostile(t, "TUNNEL_IDLE_TIMEOUT=2s")
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("y"), 32<<10)
		for i := 0; i < 8192; i++ {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(big.Close)
	h := newH2Raw(t, p, "127.0.0.10", http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1})
	if err := h.Framer.WriteWindowUpdate(0, 1<<31-1-65535); err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(big.URL)
	h.Headers(t, 1, true, ":method", "GET", ":scheme", "http", ":authority", u.Host, ":path", "/big",
		"proxy-authorization", "Bearer "+mint(t, "never-reads", "us-east"))
	// Never read; ping until the proxy hangs up.
	start := time.Now()
	var werr error
	for i := 0; werr == nil && time.Since(start) < failsafe; i++ {
		var data [8]byte
		binary.BigEndian.PutUint64(data[:], uint64(i))
		werr = h.Framer.WritePing(false, data)
		time.Sleep(100 * time.Millisecond)
	}
	if werr == nil {
		t.Fatal("the proxy kept a connection whose client never reads")
	}
	t.Logf("connection of a client that pings but never reads closed after %v", time.Since(start).Round(10*time.Millisecond))
	rec := p.waitRecord(t, "the unread stream", func(r accesslog.Record) bool { return r.TokenID == "never-reads" })
	if rec.Success || rec.Error == "" {
		t.Errorf("record = %+v, want a failure", rec)
	}
	if v := metricValue(metricsText(t, admin), "pinaka_connections_write_stalled_total", ""); v < 1 {
		t.Error("pinaka_connections_write_stalled_total did not count the stalled connection")
	}
	bystander(t, p, origin.URL)
}

// Item 6: long-lived forwarded requests count against a per-token cap.
func TestAttackSlowForwardsAreCapped(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, "MAX_FORWARDS_PER_TOKEN=5", "REQUEST_BODY_IDLE_TIMEOUT=60s")
	tok := mint(t, "slow-forwards", "us-east")
	conns := make([]net.Conn, 12)
	for i := range conns {
		c, err := dialFrom(p, "127.0.0.11")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST %s/slow HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\nContent-Length: 1000000\r\n\r\nsome", origin.URL, tok)
		conns[i] = c
	}
	// The refused ones are answered and recorded at once; the others are
	// in flight, held by their slow bodies, for REQUEST_BODY_IDLE_TIMEOUT.
	waitFor(t, "seven refusals recorded", func() bool {
		n := 0
		for _, r := range p.records(t) {
			if r.TokenID == "slow-forwards" && r.Error == "forward_limit" {
				n++
			}
		}
		return n >= 7
	})
	var mu sync.Mutex
	var held []net.Conn
	refused := 0
	parallel(t, len(conns), len(conns), func(i int) {
		c := conns[i]
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		res, err := http.ReadResponse(bufio.NewReader(c), nil)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			held = append(held, c)
			return
		}
		res.Body.Close()
		if res.StatusCode != http.StatusTooManyRequests {
			t.Errorf("forward %d: status %d", i, res.StatusCode)
		}
		refused++
	})
	t.Logf("12 slow-body forwards with MAX_FORWARDS_PER_TOKEN=5: %d in flight, %d refused", len(held), refused)
	if len(held) != 5 || refused != 7 {
		t.Fatalf("%d in flight and %d refused, want 5 and 7", len(held), refused)
	}
	rec := p.waitRecord(t, "a refused forward", func(r accesslog.Record) bool { return r.TokenID == "slow-forwards" })
	if rec.StatusCode != http.StatusTooManyRequests || rec.Error != "forward_limit" {
		t.Errorf("record = %+v, want 429 forward_limit", rec)
	}
	bystander(t, p, origin.URL)
}

// Item 7: a trailer is filtered like a header: Proxy-Authorization declared
// as a chunked trailer never reaches the origin; an ordinary trailer does.
func TestAttackCredentialsInTrailer(t *testing.T) {
	got := make(chan http.Header, 2)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		all := r.Header.Clone()
		for k, v := range r.Trailer {
			all["Trailer-"+k] = v
		}
		got <- all
	}))
	t.Cleanup(origin.Close)
	p, _ := hostile(t)
	tok := mint(t, "trailers", "us-east")
	c, err := dialFrom(p, "127.0.0.12")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST %s/t HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n"+
		"Trailer: Proxy-Authorization, Authorization, X-Checksum\r\n\r\n"+
		"5\r\nhello\r\n0\r\nProxy-Authorization: Bearer %s\r\nAuthorization: Basic c2VjcmV0\r\nX-Checksum: abc\r\n\r\n", origin.URL, tok, tok)
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d", res.StatusCode)
	}
	h := <-got
	for k, v := range h {
		if strings.Contains(strings.Join(v, ","), tok) || strings.Contains(k, "Authorization") || strings.Contains(strings.Join(v, ","), "c2VjcmV0") {
			t.Errorf("origin received %s: %q", k, v)
		}
	}
	if h.Get("Trailer-X-Checksum") != "abc" {
		t.Errorf("the ordinary trailer did not arrive: %v", h)
	}
}

// Item 8: a request with both Content-Length and Transfer-Encoding is
// answered by its Transfer-Encoding, then the connection closes (RFC 9112
// §6.1): what follows on it may be a request smuggled past another parser,
// and is never served. Without the conflict the same pipeline is served.
func TestAttackContentLengthWithTransferEncodingCloses(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t)
	tok := mint(t, "smuggle", "us-east")
	pipeline := func(conflict bool) (first *http.Response, second error) {
		c, err := dialFrom(p, "127.0.0.13")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cl := ""
		if conflict {
			cl = "Content-Length: 4\r\n"
		}
		fmt.Fprintf(c, "POST %s/first HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\n%sTransfer-Encoding: chunked\r\n\r\n"+
			"5\r\nhello\r\n0\r\n\r\n"+
			"GET %s/second HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\n\r\n", origin.URL, tok, cl, origin.URL, tok)
		br := bufio.NewReader(c)
		first, err = http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("first answer: %v", err)
		}
		body, _ := io.ReadAll(first.Body)
		if !strings.Contains(string(body), "POST /first 5") {
			t.Errorf("first request not answered by its chunked body: %d %q", first.StatusCode, body)
		}
		res, err := http.ReadResponse(br, nil)
		if err == nil {
			res.Body.Close()
		}
		return first, err
	}
	first, second := pipeline(true)
	if !first.Close || second == nil {
		t.Fatalf("with both fields: first answer Close=%v, second request answered=%v; want the connection closed after the first", first.Close, second == nil)
	}
	first, second = pipeline(false)
	if first.Close || second != nil {
		t.Fatalf("chunked alone: first answer Close=%v, second: %v; want both served", first.Close, second)
	}
	bystander(t, p, origin.URL)
}

// The stall guard must not mistake a slow reader for a stalled one: the
// kernel wakes a blocked writer only once much of the send buffer has
// drained, so a client reading steadily at a few KB/s has writes pending
// far longer than the guard's limit. It keeps being served.
func TestSlowReaderIsNotAStalledReader(t *testing.T) {
	p, admin := hostile(t, "TUNNEL_IDLE_TIMEOUT=2s")
	big := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("z"), 32<<10)
		for i := 0; i < 256; i++ { // 8 MB
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(big.Close)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.14")}, Timeout: failsafe}
	raw, err := d.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.(*net.TCPConn).SetReadBuffer(8 << 10) // the proxy's writes block soon
	c := tls.Client(raw, tlsConfig("http/1.1"))
	_ = c.SetDeadline(time.Now().Add(4 * failsafe))
	fmt.Fprintf(c, "GET %s/big HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer %s\r\n\r\n", big.URL, mint(t, "slow-reader", "us-east"))
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	// (No res.Body.Close: it would read the rest; raw.Close ends it.)
	// 32 KB/s for 6 s: three times the guard's 2 s limit.
	start, read := time.Now(), 0
	buf := make([]byte, 4<<10)
	for time.Since(start) < 6*time.Second {
		n, err := io.ReadFull(res.Body, buf)
		read += n
		if err != nil {
			t.Fatalf("the slow reader was cut off after %d bytes and %v: %v", read, time.Since(start).Round(time.Millisecond), err)
		}
		time.Sleep(125 * time.Millisecond)
	}
	if v := metricValue(metricsText(t, admin), "pinaka_connections_write_stalled_total", ""); v != 0 {
		t.Errorf("pinaka_connections_write_stalled_total = %v for a client that kept reading", v)
	}
	t.Logf("slow reader: %d KB in %v, not cut off", read>>10, time.Since(start).Round(time.Millisecond))
}
