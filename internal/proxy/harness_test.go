package proxy_test

import (
	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/server"
)

const testSecret = "0123456789abcdef0123456789abcdef-test-secret"

// env is a running Pinaka on a loopback TLS listener, wired exactly as
// `pinaka serve` wires it, with its log captured for record assertions.
type env struct {
	t      *testing.T
	app    *server.App
	addr   string
	roots  *x509.CertPool
	token  string
	logbuf *testutil.SyncBuffer
}

// startProxy starts a proxy with test defaults overridden by vars.
func startProxy(t *testing.T, vars map[string]string) *env {
	t.Helper()
	v := map[string]string{
		"JWT_SECRET":         testSecret,
		"PROXY_BIND":         "127.0.0.1",
		"PROXY_PORT":         "1",
		"ADMIN_ADDR":         "127.0.0.1:0",
		"PROBE_NODE_NAME":    "test-node",
		"PROBE_NODE_REGION":  "us-east",
		"EGRESS_ALLOW_CIDRS": "127.0.0.0/8,::1/128",
		"LOG_LEVEL":          "debug",
	}
	for k, val := range vars {
		v[k] = val
	}
	cfg, err := config.Load(func(k string) (string, bool) { s, ok := v[k]; return s, ok }, true)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	cfg.ProxyPort = 0 // any free port
	buf := &testutil.SyncBuffer{}
	log := slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	app, err := server.NewApp(cfg, log, server.AppOptions{
		Certs:       server.StaticCertStore(proxyCert),
		UpstreamTLS: &tls.Config{RootCAs: testRoots},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, app: app, addr: app.Server.ProxyAddr().String(), roots: testRoots, logbuf: buf}
	e.token = e.mint("user-1", "tok-1", []string{"us-east"}, time.Hour)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = app.Shutdown(ctx)
		if t.Failed() {
			t.Logf("proxy log:\n%s", buf.String())
		}
	})
	return e
}

// testRoots trusts the proxy's test certificate and httptest's origin
// certificate, so clients and the proxy verify TLS for real.
var (
	testRoots *x509.CertPool
	proxyCert tls.Certificate
)

func TestMain(m *testing.M) {
	var certPEM []byte
	var err error
	proxyCert, certPEM, _, err = selfsigned.Cert(24 * time.Hour)
	if err != nil {
		panic(err)
	}
	testRoots = x509.NewCertPool()
	testRoots.AppendCertsFromPEM(certPEM)
	ts := httptest.NewTLSServer(http.NotFoundHandler())
	testRoots.AddCert(ts.Certificate())
	ts.Close()
	os.Exit(m.Run())
}

func (e *env) mint(user, tokenID string, regions []string, ttl time.Duration) string {
	tok, err := auth.Mint([]byte(testSecret), auth.MintOptions{UserID: user, TokenID: tokenID, Regions: regions, TTL: ttl})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func (e *env) bearer() string { return "Bearer " + e.token }

// records returns the request records logged so far.
func (e *env) records() []accesslog.Record {
	var out []accesslog.Record
	for _, line := range strings.Split(e.logbuf.String(), "\n") {
		if !strings.Contains(line, `"msg":"request"`) {
			continue
		}
		var r accesslog.Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			e.t.Fatalf("bad record line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// waitRecord waits for a record matching f (records are written when the
// handler returns, which can be just after the client saw the response).
func (e *env) waitRecord(f func(accesslog.Record) bool) accesslog.Record {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, r := range e.records() {
			if f(r) {
				return r
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.t.Fatalf("no matching record; log:\n%s", e.logbuf.String())
	return accesslog.Record{}
}

func (e *env) tlsConfig(protos ...string) *tls.Config {
	return &tls.Config{RootCAs: e.roots, ServerName: "127.0.0.1", NextProtos: protos}
}

// h1Client is an HTTP/1.1 client that sends every request through the
// proxy, authenticating CONNECTs and forwarded requests with authHeader.
func (e *env) h1Client(authHeader string) *http.Client {
	pu := &url.URL{Scheme: "https", Host: e.addr}
	tr := &http.Transport{
		Proxy:              http.ProxyURL(pu),
		TLSClientConfig:    &tls.Config{RootCAs: testRoots},
		DisableCompression: true,
	}
	if authHeader != "" {
		tr.ProxyConnectHeader = http.Header{"Proxy-Authorization": {authHeader}}
	}
	return &http.Client{
		Transport:     authForward{tr, authHeader},
		Timeout:       60 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// authForward adds Proxy-Authorization to plain-HTTP requests: Go's
// transport only sends proxy credentials from the proxy URL's userinfo.
type authForward struct {
	tr   *http.Transport
	auth string
}

func (a authForward) RoundTrip(r *http.Request) (*http.Response, error) {
	if a.auth != "" && r.URL.Scheme == "http" {
		r = r.Clone(r.Context())
		r.Header.Set("Proxy-Authorization", a.auth)
	}
	return a.tr.RoundTrip(r)
}

// h2Conn opens an HTTP/2 connection to the proxy.
func (e *env) h2Conn() *http2.ClientConn {
	e.t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("h2"))
	if err != nil {
		e.t.Fatal(err)
	}
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		e.t.Fatalf("ALPN negotiated %q, want h2", p)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cc.Close() })
	return cc
}

// h2Raw opens an HTTP/2 connection to the proxy with the bare frame
// client, for requests Go's client will not send on every Go version
// (extended CONNECT: Go 1.27's x/net client refuses :protocol).
func (e *env) h2Raw() *testutil.H2Raw {
	e.t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("h2"))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		e.t.Fatalf("ALPN negotiated %q, want h2", p)
	}
	return testutil.NewH2Raw(e.t, c)
}

// h2Connect opens a CONNECT tunnel on cc. The returned writer is the
// upload side (Close = END_STREAM); resp.Body is the download side.
func h2Connect(cc *http2.ClientConn, target, authHeader string) (*http.Response, *io.PipeWriter, error) {
	pr, pw := io.Pipe()
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Host: target},
		Host:   target,
		Header: http.Header{},
		Body:   pr,
	}
	if authHeader != "" {
		req.Header.Set("Proxy-Authorization", authHeader)
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		pw.Close()
		return nil, nil, err
	}
	return resp, pw, nil
}

// h1Connect sends CONNECT over a fresh TLS connection (HTTP/1.1) and
// returns the connection after a 200, plus the status.
func (e *env) h1Connect(target, authHeader string, early []byte) (*tls.Conn, *bufio.Reader, int) {
	e.t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		e.t.Fatal(err)
	}
	req := fmt.Sprintf("CONNECT %s HTTP/1.1\r\nHost: %s\r\n", target, target)
	if authHeader != "" {
		req += "Proxy-Authorization: " + authHeader + "\r\n"
	}
	req += "\r\n"
	// early bytes go in the same write, as a client racing its ClientHello
	// behind the CONNECT would send them.
	if _, err := c.Write(append([]byte(req), early...)); err != nil {
		e.t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		e.t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		_ = body
		c.Close()
	}
	return c, br, resp.StatusCode
}

// echoServer is a TCP origin that echoes what it reads; on EOF it writes
// "<bye>" and half-closes, so tests can see half-close in both directions.
type recordT = accesslog.Record

type echoServer struct {
	ln       net.Listener
	accepted chan struct{}
	mu       sync.Mutex
	count    int
}

func newEchoServer(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln, accepted: make(chan struct{}, 1024)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.count++
			s.mu.Unlock()
			s.accepted <- struct{}{}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
				_, _ = c.Write([]byte("<bye>"))
				_ = c.(*net.TCPConn).CloseWrite()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return s
}

func (s *echoServer) addr() string { return s.ln.Addr().String() }

func (s *echoServer) accepts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count
}

// rawStatus writes req verbatim over a fresh TLS connection and returns the
// response status.
func (e *env) rawStatus(req string) int {
	e.t.Helper()
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		e.t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		e.t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		e.t.Fatalf("reading response to %q: %v", req, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func tlsDialConfig(addr string, cfg *tls.Config) (net.Conn, error) {
	return tls.Dial("tcp", addr, cfg)
}
