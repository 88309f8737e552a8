package proxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/quic-go/quic-go/quicvarint"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// The CONNECT-UDP client of these tests is quic-go's own HTTP/3 client
// (v0.65.0, the proxy's) with HTTP Datagrams: RFC 9298's framing on top is
// one context-id byte. TestConnectUDPMasqueGo runs masque-go's client.

// h3DatagramConn opens an HTTP/3 connection with HTTP Datagrams enabled
// (QUIC DATAGRAM frames and SETTINGS_H3_DATAGRAM), or without when
// datagrams is false.
func h3DatagramConn(t *testing.T, addr string, roots *x509.CertPool, datagrams bool) *http3.ClientConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, addr,
		&tls.Config{RootCAs: roots, ServerName: "127.0.0.1", NextProtos: []string{http3.NextProtoH3}},
		&quic.Config{KeepAlivePeriod: 5 * time.Second, EnableDatagrams: datagrams, InitialPacketSize: 1350})
	if err != nil {
		t.Fatalf("QUIC handshake with %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = qc.CloseWithError(0, "") })
	cc := (&http3.Transport{EnableDatagrams: datagrams}).NewClientConn(qc)
	select {
	case <-cc.ReceivedSettings():
	case <-time.After(10 * time.Second):
		t.Fatal("no SETTINGS from the proxy")
	}
	if s := cc.Settings(); !s.EnableExtendedConnect || datagrams && !s.EnableDatagrams {
		t.Fatalf("proxy SETTINGS: extended CONNECT %v, datagrams %v", s.EnableExtendedConnect, s.EnableDatagrams)
	}
	return cc
}

// udpPath is the default URI template expanded for host and port: an IPv6
// literal's colons percent-encoded (RFC 9298 §2).
func udpPath(host string, port int) string {
	return "/.well-known/masque/udp/" + strings.ReplaceAll(host, ":", "%3A") + "/" + strconv.Itoa(port) + "/"
}

// udpConnect sends a CONNECT-UDP request for path and returns the stream
// and the response.
func udpConnect(t *testing.T, cc *http3.ClientConn, proxyAddr, path, authHeader string) (*http3.RequestStream, *http.Response) {
	t.Helper()
	str, err := cc.OpenRequestStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodConnect, "https://"+proxyAddr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Proto = "connect-udp"
	req.Header.Set("Capsule-Protocol", "?1")
	if authHeader != "" {
		req.Header.Set("Proxy-Authorization", authHeader)
	}
	if err := str.SendRequestHeader(req); err != nil {
		t.Fatal(err)
	}
	res, err := str.ReadResponse()
	if err != nil {
		t.Fatal(err)
	}
	return str, res
}

// udpSend sends payload as a UDP payload (context id 0).
func udpSend(t *testing.T, str *http3.RequestStream, payload []byte) {
	t.Helper()
	if err := str.SendDatagram(append([]byte{0}, payload...)); err != nil {
		t.Fatalf("sending a datagram: %v", err)
	}
}

// udpRecv returns the next UDP payload, or fails after 10s.
func udpRecv(t *testing.T, str *http3.RequestStream) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := str.ReceiveDatagram(ctx)
	if err != nil {
		t.Fatalf("receiving a datagram: %v", err)
	}
	if len(b) == 0 || b[0] != 0 {
		t.Fatalf("datagram %x: not context id 0", b)
	}
	return b[1:]
}

// udpEchoServer answers every datagram with "echo:" and the datagram, on
// network's loopback, and returns its port.
func udpEchoServer(t *testing.T, network, addr string) int {
	t.Helper()
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		b := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("echo:"), b[:n]...), from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// TestConnectUDPEcho: datagrams cross a flow both ways; a DATAGRAM capsule
// on the stream is relayed too; datagrams of another context id and
// oversize ones are dropped and counted; closing the stream ends the flow,
// whose one record counts it all.
func TestConnectUDPEcho(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true"})
	port := udpEchoServer(t, "udp4", "127.0.0.1:0")
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	str, res := udpConnect(t, cc, e.h3Addr(), udpPath("127.0.0.1", port), e.bearer())
	if res.StatusCode != http.StatusOK || res.Header.Get("Capsule-Protocol") != "?1" {
		t.Fatalf("CONNECT-UDP: %s %v", res.Status, res.Header)
	}
	var sent, got int
	for i := range 3 {
		msg := []byte(fmt.Sprintf("datagram %d", i))
		udpSend(t, str, msg)
		sent += len(msg)
		if b := udpRecv(t, str); string(b) != "echo:"+string(msg) {
			t.Fatalf("echo: %q", b)
		}
		got += len(msg) + 5
	}
	// Dropped: a context id the proxy does not serve, and a DATAGRAM
	// capsule too large to relay. Relayed: a DATAGRAM capsule.
	if err := str.SendDatagram([]byte{0x01, 'x'}); err != nil {
		t.Fatal(err)
	}
	if err := writeCapsule(str, 0, append([]byte{0}, bytes.Repeat([]byte("y"), 2000)...)); err != nil {
		t.Fatal(err)
	}
	if err := writeCapsule(str, 0, append([]byte{0}, "capsule"...)); err != nil {
		t.Fatal(err)
	}
	if b := udpRecv(t, str); string(b) != "echo:capsule" {
		t.Fatalf("echo of the capsule: %q", b)
	}
	sent, got = sent+len("capsule"), got+len("echo:capsule")
	// An unknown capsule type is skipped; the flow goes on.
	if err := writeCapsule(str, 0x2a, []byte("ignored")); err != nil {
		t.Fatal(err)
	}
	udpSend(t, str, []byte("last"))
	if b := udpRecv(t, str); string(b) != "echo:last" {
		t.Fatalf("after an unknown capsule: %q", b)
	}
	sent, got = sent+4, got+9
	if v := e.metric("pinaka_udp_flows_active"); v != 1 {
		t.Errorf("pinaka_udp_flows_active = %v with a flow open", v)
	}
	_ = str.Close() // the client ends the flow
	str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))

	target := "udp://127.0.0.1:" + strconv.Itoa(port)
	rec := e.waitRecord(func(r accesslog.Record) bool { return r.TargetURL == target })
	if rec.Protocol != "HTTP/3" || rec.Method != http.MethodConnect || rec.StatusCode != 200 || !rec.Success || rec.Error != "" ||
		rec.TokenID != "tok-1" || rec.CloseReason != "client_closed" || rec.UpstreamAddr != "127.0.0.1:"+strconv.Itoa(port) {
		t.Fatalf("record: %+v", rec)
	}
	if rec.DatagramsUp == nil || *rec.DatagramsUp != 5 || rec.DatagramsDown == nil || *rec.DatagramsDown != 5 ||
		rec.DatagramsDropped == nil || *rec.DatagramsDropped != 2 {
		t.Fatalf("record's datagram counts: up %v down %v dropped %v, want 5 5 2", ptrVal(rec.DatagramsUp), ptrVal(rec.DatagramsDown), ptrVal(rec.DatagramsDropped))
	}
	if rec.RequestSize != int64(sent) || rec.ResponseSize != int64(got) {
		t.Fatalf("record's sizes: %d up, %d down; want %d, %d", rec.RequestSize, rec.ResponseSize, sent, got)
	}
	if rec.TTFBMS.IsZero() || rec.RequestID == "" {
		t.Fatalf("record's ttfb_ms or request_id missing: %+v", rec)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"pinaka_udp_datagrams_total", []string{"direction", "upstream"}, 5},
		{"pinaka_udp_datagrams_total", []string{"direction", "downstream"}, 5},
		{"pinaka_udp_datagrams_dropped_total", []string{"reason", "context_id"}, 1},
		{"pinaka_udp_datagrams_dropped_total", []string{"reason", "oversize"}, 1},
		{"pinaka_udp_flows_active", nil, 0},
		{"pinaka_requests_total", []string{"method", "CONNECT", "protocol", "HTTP/3", "status", "200"}, 1},
	} {
		if got := e.metric(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

// writeCapsule writes one capsule (RFC 9297 §3.2) on the request stream.
func writeCapsule(w io.Writer, typ uint64, value []byte) error {
	b := quicvarint.Append(quicvarint.Append(nil, typ), uint64(len(value)))
	_, err := w.Write(append(b, value...))
	return err
}

func ptrVal(p *int64) any {
	if p == nil {
		return nil
	}
	return *p
}

// TestConnectUDPDNS: a flow to a name (resolved by the proxy's resolver,
// the address checked and used) carries a DNS query to a DNS server on
// loopback and its answer back; a name resolving to a private address is
// refused before any socket is made.
func TestConnectUDPDNS(t *testing.T) {
	ns := testutil.StartDNS(t, map[string]string{
		"dns.test.": "127.0.0.1", "www.example.test.": "192.0.2.80", "private.test.": "10.1.2.3",
	})
	_, nsPort, _ := net.SplitHostPort(ns)
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true", "DNS_SERVERS": ns})
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	port, _ := strconv.Atoi(nsPort)
	str, res := udpConnect(t, cc, e.h3Addr(), udpPath("dns.test", port), e.bearer())
	if res.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT-UDP to dns.test: %s", res.Status)
	}
	q := new(dns.Msg)
	q.SetQuestion("www.example.test.", dns.TypeA)
	wire, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	udpSend(t, str, wire)
	a := new(dns.Msg)
	if err := a.Unpack(udpRecv(t, str)); err != nil {
		t.Fatalf("DNS answer: %v", err)
	}
	if a.Id != q.Id || len(a.Answer) != 1 || a.Answer[0].(*dns.A).A.String() != "192.0.2.80" {
		t.Fatalf("DNS answer through the flow: %v", a)
	}
	_ = str.Close()
	str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	rec := e.waitRecord(func(r accesslog.Record) bool { return r.TargetURL == "udp://dns.test:"+nsPort })
	if rec.StatusCode != 200 || rec.UpstreamAddr != "127.0.0.1:"+nsPort || rec.DNSMS.IsZero() ||
		ptrVal(rec.DatagramsUp) != int64(1) || ptrVal(rec.DatagramsDown) != int64(1) {
		t.Fatalf("record: %+v", rec)
	}

	_, res = udpConnect(t, cc, e.h3Addr(), udpPath("private.test", port), e.bearer())
	if res.StatusCode != http.StatusForbidden {
		t.Fatalf("CONNECT-UDP to a name of a private address: %s", res.Status)
	}
	e.waitRecord(func(r accesslog.Record) bool {
		return r.TargetURL == "udp://private.test:"+nsPort && r.StatusCode == 403 && r.Error == "egress_denied"
	})
}

// TestConnectUDPRefusals: every refusal is a proper answer with its record,
// and no refused request gets a flow.
func TestConnectUDPRefusals(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true"})
	port := udpEchoServer(t, "udp4", "127.0.0.1:0")
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	for _, c := range []struct {
		name, path, auth string
		status           int
		code, target     string
	}{
		{"no token", udpPath("127.0.0.1", port), "", 407, "auth_missing", ""},
		{"bad token", udpPath("127.0.0.1", port), "Bearer nope", 407, "auth_invalid", ""},
		{"private target", udpPath("10.0.0.1", 53), e.bearer(), 403, "egress_denied", "udp://10.0.0.1:53"},
		{"metadata address", udpPath("169.254.169.254", 53), e.bearer(), 403, "egress_denied", "udp://169.254.169.254:53"},
		{"port not in ALLOWED_UDP_PORTS", udpPath("127.0.0.1", 123), e.bearer(), 403, "egress_denied", "udp://127.0.0.1:123"},
		{"the proxy's own QUIC port", udpPath("127.0.0.1", e.app.Server.H3Addr().(*net.UDPAddr).Port), e.bearer(), 403, "egress_denied", ""},
		{"bad template", "/.well-known/masque/udp/127.0.0.1/", e.bearer(), 400, "bad_target", ""},
		{"bad host", "/.well-known/masque/udp/a%2Fb/53/", e.bearer(), 400, "bad_target", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			str, res := udpConnect(t, cc, e.h3Addr(), c.path, c.auth)
			defer str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
			if res.StatusCode != c.status {
				t.Fatalf("%s: %s", c.path, res.Status)
			}
			if c.status == 407 && len(res.Header.Values("Proxy-Authenticate")) != 2 {
				t.Fatalf("407 without challenges: %v", res.Header)
			}
			id := res.Header.Get(accesslog.RequestIDHeader)
			rec := e.waitRecord(func(r accesslog.Record) bool { return r.RequestID == id })
			if rec.Protocol != "HTTP/3" || rec.Error != c.code || rec.StatusCode != c.status || rec.DatagramsUp != nil ||
				c.target != "" && rec.TargetURL != c.target {
				t.Fatalf("record: %+v", rec)
			}
		})
	}
	if v := e.metric("pinaka_egress_denied_total", "reason", "port not allowed"); v != 1 {
		t.Errorf(`pinaka_egress_denied_total{reason="port not allowed"} = %v, want 1`, v)
	}

	// A client that did not enable HTTP Datagrams cannot have a flow.
	plain := h3DatagramConn(t, e.h3Addr(), e.roots, false)
	str, res := udpConnect(t, plain, e.h3Addr(), udpPath("127.0.0.1", port), e.bearer())
	str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	if res.StatusCode != http.StatusBadRequest {
		t.Fatalf("CONNECT-UDP without SETTINGS_H3_DATAGRAM: %s", res.Status)
	}
	e.waitRecord(func(r accesslog.Record) bool { return r.Error == "datagrams_disabled" && r.StatusCode == 400 })
}

// TestConnectUDPFlowCap: MAX_UDP_FLOWS_PER_TOKEN flows at once per token;
// the next is refused with 429 until one ends; other tokens are not held.
func TestConnectUDPFlowCap(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true", "MAX_UDP_FLOWS_PER_TOKEN": "2"})
	port := udpEchoServer(t, "udp4", "127.0.0.1:0")
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	path := udpPath("127.0.0.1", port)
	var open []*http3.RequestStream
	for range 2 {
		str, res := udpConnect(t, cc, e.h3Addr(), path, e.bearer())
		if res.StatusCode != 200 {
			t.Fatalf("flow within the cap: %s", res.Status)
		}
		open = append(open, str)
	}
	str, res := udpConnect(t, cc, e.h3Addr(), path, e.bearer())
	str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	if res.StatusCode != http.StatusTooManyRequests || res.Header.Get("Retry-After") == "" {
		t.Fatalf("third flow with MAX_UDP_FLOWS_PER_TOKEN=2: %s", res.Status)
	}
	e.waitRecord(func(r accesslog.Record) bool {
		return r.Error == "udp_flow_limit" && r.StatusCode == 429 && !r.RateLimited
	})
	other := "Bearer " + e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	if str, res := udpConnect(t, cc, e.h3Addr(), path, other); res.StatusCode != 200 {
		t.Fatalf("another token's flow: %s", res.Status)
	} else {
		_ = str.Close()
	}

	// Ending one frees its place.
	_ = open[0].Close()
	open[0].CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	e.waitRecord(func(r accesslog.Record) bool { return r.TokenID == "tok-1" && r.CloseReason == "client_closed" })
	str, res = udpConnect(t, cc, e.h3Addr(), path, e.bearer())
	if res.StatusCode != 200 {
		t.Fatalf("a flow after one ended: %s", res.Status)
	}
	udpSend(t, str, []byte("still works"))
	if b := udpRecv(t, str); string(b) != "echo:still works" {
		t.Fatalf("echo: %q", b)
	}
}

// TestConnectUDPIdleTimeout: a flow without a datagram for UDP_IDLE_TIMEOUT
// is closed (the client sees its stream end) and its record says so; a
// flow with traffic is not.
func TestConnectUDPIdleTimeout(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true", "UDP_IDLE_TIMEOUT": "400ms"})
	port := udpEchoServer(t, "udp4", "127.0.0.1:0")
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	str, res := udpConnect(t, cc, e.h3Addr(), udpPath("127.0.0.1", port), e.bearer())
	if res.StatusCode != 200 {
		t.Fatal(res.Status)
	}
	udpSend(t, str, []byte("hello"))
	udpRecv(t, str)
	closed := readUntilClosed(str)
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("an idle flow was not closed")
	}
	rec := e.waitRecord(func(r accesslog.Record) bool { return strings.HasPrefix(r.TargetURL, "udp://") })
	if rec.Error != "tunnel_idle_timeout" || rec.CloseReason != "idle_timeout" || rec.Success ||
		ptrVal(rec.DatagramsUp) != int64(1) || ptrVal(rec.DatagramsDown) != int64(1) {
		t.Fatalf("record: %+v", rec)
	}
	if v := e.metric("pinaka_udp_flows_active"); v != 0 {
		t.Errorf("pinaka_udp_flows_active = %v after the idle close", v)
	}
}

// TestConnectUDPRevokedAndDrained: revoking a token ends its flow (record
// token_revoked) and leaves another token's; the drain deadline at
// SIGTERM ends what is left (record tunnel_shutdown).
func TestConnectUDPRevokedAndDrained(t *testing.T) {
	ls := newListServer(t)
	e := startProxy(t, map[string]string{
		"HTTP3_ENABLED": "true", "REVOCATION_URL": ls.URL + revocation.Path, "REVOCATION_INTERVAL": "1s", "BACKEND_API_KEY": "node-key",
	})
	port := udpEchoServer(t, "udp4", "127.0.0.1:0")
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	path := udpPath("127.0.0.1", port)
	mine, res := udpConnect(t, cc, e.h3Addr(), path, e.bearer())
	if res.StatusCode != 200 {
		t.Fatal(res.Status)
	}
	other := "Bearer " + e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	theirs, res := udpConnect(t, cc, e.h3Addr(), path, other)
	if res.StatusCode != 200 {
		t.Fatal(res.Status)
	}
	mineClosed := readUntilClosed(mine)
	ls.set("tok-1")
	waitClosed(t, "tok-1's UDP flow", mineClosed)
	rec := e.waitRecord(func(r accesslog.Record) bool { return r.TokenID == "tok-1" && r.StatusCode == 200 })
	if rec.Error != "token_revoked" || rec.CloseReason != "token_revoked" {
		t.Fatalf("revoked flow's record: %+v", rec)
	}
	udpSend(t, theirs, []byte("tok-2 goes on"))
	if b := udpRecv(t, theirs); string(b) != "echo:tok-2 goes on" {
		t.Fatalf("tok-2's flow after the revocation: %q", b)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := e.app.Server.Shutdown(ctx); err == nil || !strings.Contains(err.Error(), "closed 1") {
		t.Fatalf("Shutdown with a flow open past the deadline: %v", err)
	}
	if _, err := io.ReadAll(theirs); err == nil {
		t.Log("the flow's stream ended with a FIN at the deadline")
	}
	rec = e.waitRecord(func(r accesslog.Record) bool { return r.TokenID == "tok-2" && r.StatusCode == 200 })
	if rec.Error != "tunnel_shutdown" || rec.CloseReason != "shutdown" || ptrVal(rec.DatagramsUp) != int64(1) {
		t.Fatalf("drained flow's record: %+v", rec)
	}
}

// TestConnectUDPIPv6Literal: an IPv6 target, its colons percent-encoded.
func TestConnectUDPIPv6Literal(t *testing.T) {
	port := udpEchoServer(t, "udp6", "[::1]:0")
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true"})
	cc := h3DatagramConn(t, e.h3Addr(), e.roots, true)
	str, res := udpConnect(t, cc, e.h3Addr(), udpPath("::1", port), e.bearer())
	if res.StatusCode != 200 {
		t.Fatalf("CONNECT-UDP to [::1]: %s", res.Status)
	}
	udpSend(t, str, []byte("six"))
	if b := udpRecv(t, str); string(b) != "echo:six" {
		t.Fatalf("echo: %q", b)
	}
	_ = str.Close()
	e.waitRecord(func(r accesslog.Record) bool {
		return r.TargetURL == fmt.Sprintf("udp://[::1]:%d", port) && r.StatusCode == 200
	})
}
