package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

// clientPKI is a client CA on disk, as CLIENT_CA_PATH and CLIENT_CRL_PATH
// point at it, plus the proxy's certificate for curl's --proxy-cacert.
type clientPKI struct {
	t                      *testing.T
	dir                    string
	ca                     *testpki.CA
	caPath, crlPath        string
	proxyCAPath            string
	aliceCertPath, keyPath string // a good certificate: token cert-alice, user alice, region us-east
	alice                  *testpki.Leaf
}

func newClientPKI(t *testing.T) *clientPKI {
	t.Helper()
	p := &clientPKI{t: t, dir: t.TempDir(), ca: testpki.NewCA(t, "pinaka clients")}
	p.caPath = testpki.Write(t, p.dir, "client-ca.pem", p.ca.PEM)
	p.crlPath = testpki.Write(t, p.dir, "client.crl", p.ca.CRLPEM(t, time.Now().Add(time.Hour)))
	p.proxyCAPath = testpki.Write(t, p.dir, "proxy-ca.pem",
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: proxyCert.Certificate[0]}))
	p.alice = p.issue("alice", "cert-alice", "us-east")
	p.aliceCertPath, p.keyPath = p.files("alice", p.alice)
	return p
}

// issue makes a client certificate of the CA with the identity SANs.
func (p *clientPKI) issue(user, tokenID string, regions ...string) *testpki.Leaf {
	uris := []string{"urn:pinaka:token:" + tokenID, "urn:pinaka:user:" + user}
	for _, r := range regions {
		uris = append(uris, "urn:pinaka:region:"+r)
	}
	return p.ca.Issue(p.t, testpki.LeafOptions{CN: user, URIs: uris})
}

// files writes a certificate and its key for curl.
func (p *clientPKI) files(name string, l *testpki.Leaf) (cert, key string) {
	return testpki.Write(p.t, p.dir, name+".crt", l.CertPEM), testpki.Write(p.t, p.dir, name+".key", l.KeyPEM)
}

func (p *clientPKI) vars(mode string) map[string]string {
	return map[string]string{"CLIENT_CA_PATH": p.caPath, "CLIENT_CRL_PATH": p.crlPath, "CLIENT_CERT_MODE": mode}
}

// plainOrigin is an HTTP origin on loopback that answers "hello".
func plainOrigin(t *testing.T) *httptest.Server {
	o := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello")
	}))
	t.Cleanup(o.Close)
	return o
}

type curlOut struct {
	code   int // exit code
	status string
	body   string
	stderr string
}

// curlVia runs curl through the proxy with --proxytunnel, so that even a
// plain-HTTP origin is reached with CONNECT. Nothing of the environment
// or a curlrc applies.
func curlVia(t *testing.T, e *env, p *clientPKI, target string, args ...string) curlOut {
	t.Helper()
	bin, err := exec.LookPath("curl")
	if err != nil {
		if os.Getenv("E2E_REQUIRE") != "" {
			t.Fatal("curl not found")
		}
		t.Skip("curl not found")
	}
	all := append([]string{"-q", "-sS", "--max-time", "20", "-x", "https://" + e.addr, "--proxy-cacert", p.proxyCAPath,
		"--proxytunnel", "-w", "\n%{http_code} %{http_connect}"}, args...)
	cmd := exec.Command(bin, append(all, target)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + p.dir}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	code := 0
	if ee, ok := errors.AsType[*exec.ExitError](err); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	body, status := "", out.String()
	if i := strings.LastIndexByte(status, '\n'); i >= 0 {
		body, status = status[:i], status[i+1:]
	}
	// The origin's status, or the proxy's answer to a refused CONNECT.
	if origin, connect, _ := strings.Cut(status, " "); origin != "000" {
		status = origin
	} else {
		status = connect
	}
	return curlOut{code: code, status: status, body: body, stderr: errOut.String()}
}

// metric reads a counter or gauge of the proxy with these label pairs.
func (e *env) metric(name string, labels ...string) float64 {
	e.t.Helper()
	mfs, err := e.app.Metrics.Registry.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				if !hasLabel(m, labels[i], labels[i+1]) {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			}
		}
	}
	e.t.Fatalf("metric %s %v not found", name, labels)
	return 0
}

func (e *env) certResult(result string) float64 {
	return e.metric("pinaka_client_cert_auth_total", "result", result)
}

// waitCertResult waits until the count of result is want: the server
// counts a refused handshake after sending its alert, so the client can
// see the refusal first.
func (e *env) waitCertResult(result string, want float64) float64 {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	got := e.certResult(result)
	for got != want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		got = e.certResult(result)
	}
	return got
}

func (e *env) waitRecordOf(tokenID string) accesslog.Record {
	return e.waitRecord(func(r accesslog.Record) bool { return r.TokenID == tokenID })
}

// curl with --proxy-cert/--proxy-key and no token: the certificate is the
// credential, in both modes, and the record carries its identity.
func TestClientCertCurlConnect(t *testing.T) {
	for _, mode := range []string{"optional", "require"} {
		t.Run(mode, func(t *testing.T) {
			p := newClientPKI(t)
			e := startProxy(t, p.vars(mode))
			origin := plainOrigin(t)
			r := curlVia(t, e, p, origin.URL+"/x", "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath)
			if r.code != 0 || r.status != "200" || r.body != "hello" {
				t.Fatalf("curl: exit %d, status %q, body %q, stderr %s", r.code, r.status, r.body, r.stderr)
			}
			rec := e.waitRecordOf("cert-alice")
			if rec.UserID != "alice" || rec.TokenType != "certificate" || rec.Method != "CONNECT" ||
				rec.Protocol != "HTTP/1.1" || rec.StatusCode != 200 || !rec.Success {
				t.Fatalf("record %+v", rec)
			}
			if got := e.waitCertResult("ok", 1); got != 1 {
				t.Fatalf("ok results = %v, want 1", got)
			}
			if got := e.metric("pinaka_client_ca_certificates"); got != 1 {
				t.Fatalf("CA gauge = %v", got)
			}
		})
	}
}

// Certificates the proxy must refuse at the handshake, each counted
// under its result, and none reaching the proxy handler.
func TestClientCertRefusedAtHandshake(t *testing.T) {
	p := newClientPKI(t)
	revoked := p.issue("mallory", "cert-revoked", "us-east")
	stranger := testpki.NewCA(t, "pinaka clients") // same name, another key
	past := time.Now().Add(-72 * time.Hour)
	cases := []struct {
		name   string
		leaf   *testpki.Leaf
		result string
	}{
		{"another CA", stranger.Issue(t, testpki.LeafOptions{CN: "eve", URIs: []string{"urn:pinaka:token:cert-eve", "urn:pinaka:region:*"}}), "unknown_ca"},
		{"revoked serial", revoked, "revoked"},
		{"no identity SAN", p.ca.Issue(t, testpki.LeafOptions{CN: "bob"}), "bad_identity"},
		{"expired", p.ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:cert-old"}, NotBefore: past, NotAfter: past.Add(time.Hour)}), "expired"},
		{"server certificate", p.ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:cert-srv"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}), "bad_usage"},
	}
	testpki.Write(t, p.dir, "client.crl", p.ca.CRLPEM(t, time.Now().Add(time.Hour), revoked.Cert.SerialNumber))
	e := startProxy(t, p.vars("optional"))
	if got := e.metric("pinaka_client_crl_entries"); got != 1 {
		t.Fatalf("CRL entries gauge = %v", got)
	}
	origin := plainOrigin(t)
	for _, c := range cases {
		cert, key := p.files(strings.ReplaceAll(c.name, " ", "-"), c.leaf)
		r := curlVia(t, e, p, origin.URL, "--proxy-cert", cert, "--proxy-key", key)
		if r.code == 0 || r.status == "200" {
			t.Errorf("%s: curl got through: exit %d, status %q", c.name, r.code, r.status)
		}
		if got := e.waitCertResult(c.result, 1); got != 1 {
			t.Errorf("%s: %s results = %v, want 1 (curl said %s)", c.name, c.result, got, strings.TrimSpace(r.stderr))
		}
	}
	if n := len(e.records()); n != 0 {
		t.Fatalf("%d records of refused handshakes, want none", n)
	}
	// Refusals of certificates a CA of ours signed are logged, and say why.
	for _, want := range []string{`"result":"revoked"`, `"result":"bad_identity"`, "no urn:pinaka:token"} {
		if !strings.Contains(e.logbuf.String(), want) {
			t.Errorf("log does not mention %s", want)
		}
	}
	// The good certificate still works.
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath); r.status != "200" {
		t.Fatalf("good certificate: exit %d, status %q, %s", r.code, r.status, r.stderr)
	}
}

// require refuses a client with only a token at the handshake; optional
// accepts it. With both, the token wins.
func TestClientCertModesAndTokens(t *testing.T) {
	p := newClientPKI(t)
	origin := plainOrigin(t)

	req := startProxy(t, p.vars("require"))
	r := curlVia(t, req, p, origin.URL, "--proxy-user", "x:"+req.token)
	if r.code == 0 || r.status == "200" || r.status == "407" {
		t.Fatalf("require, token only: exit %d, status %q", r.code, r.status)
	}
	if !strings.Contains(r.stderr, "certificate required") {
		t.Errorf("curl does not say why: %s", r.stderr)
	}
	if got := req.waitCertResult("no_cert", 1); got != 1 {
		t.Fatalf("require: no_cert = %v", got)
	}
	if n := len(req.records()); n != 0 {
		t.Fatalf("require: %d records", n)
	}

	opt := startProxy(t, p.vars("optional"))
	r = curlVia(t, opt, p, origin.URL, "--proxy-user", "x:"+opt.token)
	if r.status != "200" || r.body != "hello" {
		t.Fatalf("optional, token only: exit %d, status %q, %s", r.code, r.status, r.stderr)
	}
	if rec := opt.waitRecordOf("tok-1"); rec.TokenType != "manual" {
		t.Fatalf("token record %+v", rec)
	}
	// Neither: 407 with the usual challenges.
	r = curlVia(t, opt, p, origin.URL)
	if r.status != "407" {
		t.Fatalf("optional, nothing: status %q, %s", r.status, r.stderr)
	}
	// Both: the token is the request's credential.
	other := opt.mint("bob", "tok-bob", []string{"us-east"}, time.Hour)
	r = curlVia(t, opt, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath, "--proxy-user", "x:"+other)
	if r.status != "200" {
		t.Fatalf("optional, both: status %q, %s", r.status, r.stderr)
	}
	if rec := opt.waitRecordOf("tok-bob"); rec.UserID != "bob" {
		t.Fatalf("both: record %+v", rec)
	}
	// A bad token with a good certificate is a 407: no fall back.
	r = curlVia(t, opt, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath, "--proxy-user", "x:not-a-token")
	if r.status != "407" {
		t.Fatalf("bad token, good certificate: status %q", r.status)
	}
	for _, rec := range opt.records() {
		if rec.TokenID == "cert-alice" {
			t.Fatalf("a request was filed under the certificate: %+v", rec)
		}
	}
}

// A certificate's identity goes through authorize like a token's: the
// region check (403) and the rate limit of its token_id, which it shares
// with tokens of the same token_id.
func TestClientCertRegionAndRateLimit(t *testing.T) {
	p := newClientPKI(t)
	vars := p.vars("optional")
	vars["RATE_LIMIT_BURST_SIZE"] = "2"
	vars["RATE_LIMIT_REQUESTS_PER_MINUTE"] = "1"
	e := startProxy(t, vars)
	origin := plainOrigin(t)

	euCert, euKey := p.files("eu", p.issue("erin", "cert-eu", "eu-west"))
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", euCert, "--proxy-key", euKey); r.status != "403" {
		t.Fatalf("certificate for another region: status %q, %s", r.status, r.stderr)
	}
	if rec := e.waitRecordOf("cert-eu"); rec.Error != "region_not_allowed" || rec.TokenType != "certificate" {
		t.Fatalf("region record %+v", rec)
	}

	shared := e.mint("alice", "cert-alice", []string{"us-east"}, time.Hour)
	for i := range 2 {
		if r := curlVia(t, e, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath); r.status != "200" {
			t.Fatalf("request %d: status %q", i, r.status)
		}
	}
	if r := curlVia(t, e, p, origin.URL, "--proxy-user", "x:"+shared); r.status != "429" {
		t.Fatalf("token with the certificate's token_id after its burst: status %q, want 429", r.status)
	}
}

// A CRL or CA bundle reloaded (what SIGHUP calls) takes effect without a
// restart: new handshakes with a revoked certificate fail, and so does the
// next request of a connection opened before. A malformed file is refused
// and the trust in use kept.
func TestClientCertReload(t *testing.T) {
	p := newClientPKI(t)
	e := startProxy(t, p.vars("optional"))
	origin := plainOrigin(t)

	// A keep-alive connection with the certificate, forwarding plain HTTP.
	var reused []bool
	tr := &http.Transport{
		Proxy:           http.ProxyURL(&url.URL{Scheme: "https", Host: e.addr}),
		TLSClientConfig: &tls.Config{RootCAs: e.roots, Certificates: []tls.Certificate{p.alice.TLS}},
	}
	defer tr.CloseIdleConnections()
	get := func() int {
		t.Helper()
		ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) { reused = append(reused, i.Reused) },
		})
		req, _ := http.NewRequestWithContext(ctx, "GET", origin.URL+"/", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := get(); s != 200 {
		t.Fatalf("before the reload: %d", s)
	}

	testpki.Write(t, p.dir, "client.crl", p.ca.CRLPEM(t, time.Now().Add(time.Hour), p.alice.Cert.SerialNumber))
	if err := e.app.ReloadClientCerts(); err != nil {
		t.Fatal(err)
	}
	if s := get(); s != 407 || !reused[len(reused)-1] {
		t.Fatalf("open connection after the CRL reload: status %d, reused %v; want 407 on the same connection", s, reused)
	}
	r := curlVia(t, e, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath)
	if got := e.waitCertResult("revoked", 1); r.code == 0 || got != 1 {
		t.Fatalf("new handshake after the CRL reload: exit %d, status %q, revoked = %v", r.code, r.status, got)
	}
	if got := e.metric("pinaka_client_crl_entries"); got != 1 {
		t.Fatalf("CRL entries after reload = %v", got)
	}

	// A malformed CRL is refused: the last one stays in force.
	testpki.Write(t, p.dir, "client.crl", []byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"))
	if err := e.app.ReloadClientCerts(); err == nil || !strings.Contains(err.Error(), "CLIENT_CRL_PATH") {
		t.Fatalf("malformed CRL reload: %v", err)
	}
	if got := e.metric("pinaka_client_trust_reload_failures_total"); got != 1 {
		t.Fatalf("reload failures = %v", got)
	}
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", p.aliceCertPath, "--proxy-key", p.keyPath); r.code == 0 {
		t.Fatal("revoked certificate accepted after a refused reload")
	}
	bobCert, bobKey := p.files("bob", p.issue("bob", "cert-bob", "us-east"))
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", bobCert, "--proxy-key", bobKey); r.status != "200" {
		t.Fatalf("good certificate after a refused reload: status %q, %s", r.status, r.stderr)
	}

	// Rotating the CA: the new CA's certificates work, the old CA's stop.
	newCA := testpki.NewCA(t, "pinaka clients 2")
	testpki.Write(t, p.dir, "client-ca.pem", newCA.PEM)
	testpki.Write(t, p.dir, "client.crl", newCA.CRLPEM(t, time.Now().Add(time.Hour)))
	if err := e.app.ReloadClientCerts(); err != nil {
		t.Fatal(err)
	}
	carolCert, carolKey := p.files("carol", newCA.Issue(t, testpki.LeafOptions{CN: "carol", URIs: []string{"urn:pinaka:token:cert-carol", "urn:pinaka:region:us-east"}}))
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", carolCert, "--proxy-key", carolKey); r.status != "200" {
		t.Fatalf("new CA's certificate: status %q, %s", r.status, r.stderr)
	}
	if r := curlVia(t, e, p, origin.URL, "--proxy-cert", bobCert, "--proxy-key", bobKey); r.code == 0 {
		t.Fatalf("old CA's certificate accepted after rotation: status %q", r.status)
	}
}

// HTTP/2 (our engine) with a client certificate: CONNECT without a
// token, the record carries the certificate's identity.
func TestClientCertHTTP2Connect(t *testing.T) {
	p := newClientPKI(t)
	e := startProxy(t, p.vars("require"))
	echo := newEchoServer(t)

	cfg := e.tlsConfig("h2")
	cfg.Certificates = []tls.Certificate{p.alice.TLS}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if proto := c.ConnectionState().NegotiatedProtocol; proto != "h2" {
		t.Fatalf("ALPN %q", proto)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, up, err := h2Connect(cc, echo.addr(), "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT status %d", resp.StatusCode)
	}
	if _, err := io.WriteString(up, "ping"); err != nil {
		t.Fatal(err)
	}
	up.Close()
	got, _ := io.ReadAll(resp.Body)
	if string(got) != "ping<bye>" {
		t.Fatalf("tunnel echoed %q", got)
	}
	rec := e.waitRecordOf("cert-alice")
	if rec.Protocol != "HTTP/2" || rec.UserID != "alice" || rec.TokenType != "certificate" || rec.Method != "CONNECT" || !rec.Success {
		t.Fatalf("record %+v", rec)
	}
}

// A TLS session resumed after a CRL reload is checked too: a session
// ticket must not outlive the revocation of the certificate it was issued
// for.
func TestClientCertResumptionChecksCRL(t *testing.T) {
	p := newClientPKI(t)
	e := startProxy(t, p.vars("optional"))
	echo := newEchoServer(t)
	cache := tls.NewLRUClientSessionCache(8)
	connect := func() (resumed bool, status int) {
		t.Helper()
		cfg := e.tlsConfig("http/1.1")
		cfg.Certificates = []tls.Certificate{p.alice.TLS}
		cfg.ClientSessionCache = cache
		c, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			return false, 0
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %[1]s\r\n\r\n", echo.addr())
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		if err != nil {
			return c.ConnectionState().DidResume, 0
		}
		return c.ConnectionState().DidResume, resp.StatusCode
	}
	if _, s := connect(); s != 200 {
		t.Fatalf("first connection: %d", s)
	}
	if resumed, s := connect(); !resumed || s != 200 {
		t.Fatalf("second connection: resumed %v, status %d; want a resumed session", resumed, s)
	}
	testpki.Write(t, p.dir, "client.crl", p.ca.CRLPEM(t, time.Now().Add(time.Hour), p.alice.Cert.SerialNumber))
	if err := e.app.ReloadClientCerts(); err != nil {
		t.Fatal(err)
	}
	if _, s := connect(); s == 200 {
		t.Fatal("a resumed session of a revoked certificate got through")
	}
	if got := e.waitCertResult("revoked", 1); got != 1 {
		t.Fatalf("revoked = %v, want 1", got)
	}
}

// Revocation applies to a certificate's identity as to a token's: revoking
// its token_id closes the tunnel it has open, records token_revoked, and the
// next request on the same connection gets 407.
func TestClientCertTokenRevoked(t *testing.T) {
	p := newClientPKI(t)
	ls := newListServer(t)
	vars := p.vars("optional")
	vars["REVOCATION_URL"], vars["REVOCATION_INTERVAL"], vars["BACKEND_API_KEY"] = ls.URL+revocation.Path, "1s", "node-key"
	e := startProxy(t, vars)
	echo := newEchoServer(t)

	cfg := e.tlsConfig("h2")
	cfg.Certificates = []tls.Certificate{p.alice.TLS}
	c, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, up, err := h2Connect(cc, echo.addr(), "")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT with the certificate: %v %v", resp, err)
	}
	defer up.Close()
	h1Echo(t, up, bufio.NewReader(resp.Body), "before")

	ls.set("cert-alice")
	rec := e.waitRecord(func(r recordT) bool { return r.TokenID == "cert-alice" && r.Method == "CONNECT" })
	if rec.Error != "token_revoked" || rec.TokenType != "certificate" {
		t.Errorf("the tunnel's record: error %q token_type %q, want token_revoked, certificate", rec.Error, rec.TokenType)
	}
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("the revoked certificate's tunnel ended cleanly; want a reset")
	}
	resp2, _, err := h2Connect(cc, echo.addr(), "")
	if err != nil {
		t.Fatal(err)
	}
	if resp2.StatusCode != http.StatusProxyAuthRequired {
		t.Errorf("CONNECT after the revocation: %d, want 407", resp2.StatusCode)
	}
}
