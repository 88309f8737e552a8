package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// These tests run the real binary and talk to it with real signals,
// because reload and drain are process behaviour.

const lifecycleSecret = "lifecycle-secret-lifecycle-secret-0123"

func TestMain(m *testing.M) {
	code := m.Run()
	testutil.RemoveBuilt()
	os.Exit(code)
}

func writeCert(t *testing.T, dir string) (certPath, keyPath string, certPEM []byte) {
	t.Helper()
	_, certPEM, keyPEM, err := selfsigned.Cert(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certPath, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return certPath, keyPath, certPEM
}

// startBinary runs `pinaka serve` with a test secret, the given pair and
// loopback allowed, plus extra ("NAME=value").
func startBinary(t *testing.T, certPath, keyPath string, extra ...string) *testutil.Pinaka {
	t.Helper()
	return testutil.StartPinaka(t, append([]string{
		"JWT_SECRET=" + lifecycleSecret,
		"TLS_CERT_PATH=" + certPath,
		"TLS_KEY_PATH=" + keyPath,
		"ADMIN_ADDR=off",
		"PROBE_NODE_REGION=test",
		"EGRESS_ALLOW_CIDRS=127.0.0.0/8",
	}, extra...)...)
}

func testToken(t *testing.T) string {
	tok, err := auth.Mint([]byte(lifecycleSecret), auth.MintOptions{UserID: "u", TokenID: "t", Regions: []string{"test"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// echoOrigin echoes bytes until EOF.
func echoOrigin(t *testing.T) string {
	return testutil.ServeTCP(t, func(c net.Conn) { defer c.Close(); io.Copy(c, c) })
}

func servingCert(t *testing.T, addr string) *x509.Certificate {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0]
}

// tunnel1 opens an HTTP/1.1 CONNECT tunnel.
func tunnel1(t *testing.T, addr, target, tok string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n", target, target, tok)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", err, resp)
	}
	return c, br
}

func echoOnce(t *testing.T, w io.Writer, r io.Reader, msg string) {
	t.Helper()
	if _, err := io.WriteString(w, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, buf, err)
	}
}

func TestSIGHUPReloadsCertificate(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath)
	first := servingCert(t, p.Addr)
	origin := echoOrigin(t)
	conn, br := tunnel1(t, p.Addr, origin, testToken(t))
	defer conn.Close()

	// New pair on disk, SIGHUP: new handshakes get it, the open tunnel is untouched.
	writeCert(t, dir)
	p.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(10 * time.Second)
	var second *x509.Certificate
	for {
		second = servingCert(t, p.Addr)
		if !second.Equal(first) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("certificate not reloaded after SIGHUP")
		}
		time.Sleep(20 * time.Millisecond)
	}
	echoOnce(t, conn, br, "still-open")

	// A bad pair is refused and the current one kept, with an error logged.
	os.WriteFile(certPath, []byte("not a certificate"), 0o600)
	p.Signal(syscall.SIGHUP)
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Log.String(), "certificate reload refused") {
		if time.Now().After(deadline) {
			t.Fatal("no error logged for a bad certificate")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !servingCert(t, p.Addr).Equal(second) {
		t.Error("a bad pair replaced the serving certificate")
	}
	conn.Close()
	p.Signal(syscall.SIGTERM)
	if code, _ := p.Wait(t, 20*time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
}

// SIGTERM: stop accepting, let in-flight requests and tunnels (HTTP/1.1
// hijacked ones and HTTP/2 streams) finish, then exit 0.
func TestSIGTERMDrainsTunnels(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath, "SHUTDOWN_TIMEOUT=20s")
	origin := echoOrigin(t)
	tok := testToken(t)

	c1, br1 := tunnel1(t, p.Addr, origin, tok)
	defer c1.Close()

	tc, err := tls.Dial("tcp", p.Addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	resp, err := cc.RoundTrip(&http.Request{Method: "CONNECT", URL: &url.URL{Host: origin}, Host: origin,
		Header: http.Header{"Proxy-Authorization": {"Bearer " + tok}}, Body: pr})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %v %v", err, resp)
	}
	echoOnce(t, c1, br1, "before")
	echoOnce(t, pw, resp.Body, "before")

	p.Signal(syscall.SIGTERM)
	// The listener closes: new connections are refused.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", p.Addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("still accepting after SIGTERM")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// In-flight tunnels keep working during the drain, and neither a
	// certificate renewal's SIGHUP nor a second SIGTERM kills the process
	// before its records are flushed.
	echoOnce(t, c1, br1, "during-drain")
	echoOnce(t, pw, resp.Body, "during-drain")
	p.Signal(syscall.SIGHUP)
	p.Signal(syscall.SIGTERM)
	waitForLog := time.Now().Add(10 * time.Second)
	for strings.Count(p.Log.String(), "signal ignored: already shutting down") < 2 {
		if time.Now().After(waitForLog) {
			t.Fatal("signals during the drain were not handled")
		}
		time.Sleep(20 * time.Millisecond)
	}
	echoOnce(t, c1, br1, "after-more-signals")
	select {
	case <-p.Exited():
		t.Fatalf("exited while tunnels were open")
	case <-time.After(300 * time.Millisecond):
	}
	// When they finish, the process exits 0 without waiting for the timeout.
	c1.Close()
	pw.Close()
	io.Copy(io.Discard, resp.Body)
	code, took := p.Wait(t, 15*time.Second)
	if code != 0 {
		t.Errorf("exit code %d", code)
	}
	if took > 10*time.Second {
		t.Errorf("exit took %s after the tunnels closed", took)
	}
}

// At SHUTDOWN_TIMEOUT, what is still open is closed and the exit is clean.
func TestSIGTERMClosesTunnelsAtTimeout(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath, "SHUTDOWN_TIMEOUT=1s")
	origin := echoOrigin(t)
	c1, br1 := tunnel1(t, p.Addr, origin, testToken(t))
	defer c1.Close()
	echoOnce(t, c1, br1, "hello")
	p.Signal(syscall.SIGTERM)
	c1.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadAll(br1); err != nil && !strings.Contains(err.Error(), "reset") {
		t.Errorf("tunnel was not closed at the deadline: %v", err)
	}
	if code, _ := p.Wait(t, 15*time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	if !strings.Contains(p.Log.String(), "closing requests and tunnels still open") {
		t.Error("the forced close was not logged")
	}
	if !strings.Contains(p.Log.String(), `"error":"tunnel_shutdown"`) {
		t.Error("the tunnel closed at the deadline was not recorded as tunnel_shutdown")
	}
}

func insecureTLS() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }
