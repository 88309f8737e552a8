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
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/server"
)

// These tests run the real binary and talk to it with real signals,
// because reload and drain are process behaviour.

const lifecycleSecret = "lifecycle-secret-lifecycle-secret-0123"

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func buildBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pinaka-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "pinaka")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	addr   string
	stderr *testutil.SyncBuffer
	done   chan error
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

func writeCert(t *testing.T, dir string) (certPath, keyPath string, certPEM []byte) {
	t.Helper()
	_, certPEM, keyPEM, err := server.SelfSigned(time.Hour)
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

func startBinary(t *testing.T, certPath, keyPath string, extra ...string) *proc {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(buildBinary(t), "serve")
	cmd.Dir = t.TempDir() // no .env there
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"JWT_SECRET=" + lifecycleSecret,
		"TLS_CERT_PATH=" + certPath,
		"TLS_KEY_PATH=" + keyPath,
		"PROXY_BIND=127.0.0.1",
		"PROXY_PORT=" + port,
		"ADMIN_ADDR=off",
		"PROBE_NODE_REGION=test",
		"EGRESS_ALLOW_CIDRS=127.0.0.0/8",
	}, extra...)
	p := &proc{t: t, cmd: cmd, addr: "127.0.0.1:" + port, stderr: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("pinaka stderr:\n%s", p.stderr.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.Dial("tcp", p.addr)
		if err == nil {
			c.Close()
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("proxy did not start: %v\n%s", err, p.stderr.String())
		}
		select {
		case err := <-p.done:
			t.Fatalf("proxy exited at start: %v\n%s", err, p.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (p *proc) waitExit(within time.Duration) (int, time.Duration) {
	p.t.Helper()
	start := time.Now()
	select {
	case err := <-p.done:
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			p.t.Fatalf("wait: %v", err)
		}
		return code, time.Since(start)
	case <-time.After(within):
		p.t.Fatalf("process did not exit within %s", within)
	}
	return -1, 0
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
	first := servingCert(t, p.addr)
	origin := echoOrigin(t)
	conn, br := tunnel1(t, p.addr, origin, testToken(t))
	defer conn.Close()

	// New pair on disk, SIGHUP: new handshakes get it, the open tunnel is untouched.
	writeCert(t, dir)
	p.cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(10 * time.Second)
	var second *x509.Certificate
	for {
		second = servingCert(t, p.addr)
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
	p.cmd.Process.Signal(syscall.SIGHUP)
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(p.stderr.String(), "certificate reload refused") {
		if time.Now().After(deadline) {
			t.Fatal("no error logged for a bad certificate")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !servingCert(t, p.addr).Equal(second) {
		t.Error("a bad pair replaced the serving certificate")
	}
	conn.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code, _ := p.waitExit(20 * time.Second); code != 0 {
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

	c1, br1 := tunnel1(t, p.addr, origin, tok)
	defer c1.Close()

	tc, err := tls.Dial("tcp", p.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
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

	p.cmd.Process.Signal(syscall.SIGTERM)
	// The listener closes: new connections are refused.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
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
	p.cmd.Process.Signal(syscall.SIGHUP)
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitForLog := time.Now().Add(10 * time.Second)
	for strings.Count(p.stderr.String(), "signal ignored: already shutting down") < 2 {
		if time.Now().After(waitForLog) {
			t.Fatal("signals during the drain were not handled")
		}
		time.Sleep(20 * time.Millisecond)
	}
	echoOnce(t, c1, br1, "after-more-signals")
	select {
	case err := <-p.done:
		t.Fatalf("exited while tunnels were open: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	// When they finish, the process exits 0 without waiting for the timeout.
	c1.Close()
	pw.Close()
	io.Copy(io.Discard, resp.Body)
	code, took := p.waitExit(15 * time.Second)
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
	c1, br1 := tunnel1(t, p.addr, origin, testToken(t))
	defer c1.Close()
	echoOnce(t, c1, br1, "hello")
	p.cmd.Process.Signal(syscall.SIGTERM)
	c1.SetReadDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.ReadAll(br1); err != nil && !strings.Contains(err.Error(), "reset") {
		t.Errorf("tunnel was not closed at the deadline: %v", err)
	}
	if code, _ := p.waitExit(15 * time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	if !strings.Contains(p.stderr.String(), "closing requests and tunnels still open") {
		t.Error("the forced close was not logged")
	}
	if !strings.Contains(p.stderr.String(), `"error":"tunnel_shutdown"`) {
		t.Error("the tunnel closed at the deadline was not recorded as tunnel_shutdown")
	}
}

func insecureTLS() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }
