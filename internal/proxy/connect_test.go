package proxy_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

func TestConnectHTTP1EchoEarlyBytesAndHalfClose(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	// The first bytes ride in the same packet as the CONNECT: the proxy
	// must replay what it had already buffered.
	conn, br, status := e.h1Connect(echo.addr(), e.bearer(), []byte("early-"))
	if status != 200 {
		t.Fatalf("CONNECT status %d", status)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("data")); err != nil {
		t.Fatal(err)
	}
	// Half-close our side: the origin sees EOF, answers "<bye>" and closes;
	// we must still be able to read everything it sent after our close.
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(br)
	if err != nil {
		t.Fatalf("reading after half-close: %v", err)
	}
	if string(got) != "early-data<bye>" {
		t.Errorf("got %q, want %q", got, "early-data<bye>")
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.StatusCode != 200 || !r.Success || r.TargetURL != echo.addr() || r.RequestSize != 10 || r.ResponseSize != 15 || r.Protocol != "HTTP/1.1" {
		t.Errorf("record = %+v", r)
	}
}

func TestConnectHTTP2EchoAndEndStream(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	cc := e.h2Conn()
	resp, up, err := h2Connect(cc, echo.addr(), e.bearer())
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if _, err := up.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	// END_STREAM from the client is a half-close: the origin sees EOF and
	// its last words still arrive, then END_STREAM from the proxy.
	up.Close()
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "<bye>" {
		t.Fatalf("after END_STREAM: %q %v", rest, err)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.Protocol != "HTTP/2" || r.StatusCode != 200 || r.RequestSize != 4 || r.ResponseSize != 9 {
		t.Errorf("record = %+v", r)
	}
}

// Many tunnels share one HTTP/2 connection; one that nobody reads from
// must not stop the others (per-stream flow control).
func TestConnectHTTP2ConcurrentTunnelsMakeProgress(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	cc := e.h2Conn()

	// A stalled tunnel: its origin floods data that the client never reads.
	flood, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer flood.Close()
	go func() {
		c, err := flood.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}()
	stalled, stalledUp, err := h2Connect(cc, flood.Addr().String(), e.bearer())
	if err != nil || stalled.StatusCode != 200 {
		t.Fatalf("stalled tunnel: %v", err)
	}
	defer stalledUp.Close()

	const n = 40
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			resp, up, err := h2Connect(cc, echo.addr(), e.bearer())
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			msg := bytes.Repeat([]byte(fmt.Sprintf("tunnel-%02d;", i)), 2000)
			go func() {
				up.Write(msg)
				up.Close()
			}()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				errs <- fmt.Errorf("tunnel %d: %v", i, err)
				return
			}
			if !bytes.Equal(got, append(msg, "<bye>"...)) {
				errs <- fmt.Errorf("tunnel %d: got %d bytes, want %d", i, len(got), len(msg)+5)
			}
		}(i)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("concurrent tunnels did not finish: one stalled stream blocked the connection")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Large transfers both ways at once, over HTTP/1.1 and HTTP/2.
func TestConnectLargeBothWays(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	payload := make([]byte, 24<<20)
	rand.Read(payload)
	want := sha256.Sum256(append(append([]byte{}, payload...), "<bye>"...))

	check := func(name string, w io.WriteCloser, r io.Reader) {
		t.Helper()
		go func() {
			w.Write(payload)
			w.Close()
		}()
		h := sha256.New()
		n, err := io.Copy(h, r)
		if err != nil {
			t.Fatalf("%s: after %d bytes: %v", name, n, err)
		}
		var got [32]byte
		copy(got[:], h.Sum(nil))
		if got != want || n != int64(len(payload)+5) {
			t.Errorf("%s: echoed %d bytes, hash mismatch=%v", name, n, got != want)
		}
	}
	conn, br, status := e.h1Connect(echo.addr(), e.bearer(), nil)
	if status != 200 {
		t.Fatal(status)
	}
	check("HTTP/1.1", halfCloser{conn}, br)
	conn.Close()

	resp, up, err := h2Connect(e.h2Conn(), echo.addr(), e.bearer())
	if err != nil {
		t.Fatal(err)
	}
	check("HTTP/2", up, resp.Body)
}

// An HTTP/2 upload to an origin that stops reading for a while: the
// engine's reader writes what arrives straight upstream while the socket
// takes it (httpx.Sinker), the relay goroutine takes over when it does not,
// and the bytes still arrive whole, in order, and counted once.
func TestConnectHTTP2UploadToStallingOrigin(t *testing.T) {
	e := startProxy(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		buf := make([]byte, 32<<10)
		for i := 0; ; i++ {
			if i%64 == 0 {
				// Not a timing assertion: a pause that lets the proxy's
				// socket to us fill up, several times per upload.
				time.Sleep(50 * time.Millisecond)
			}
			n, err := c.Read(buf)
			h.Write(buf[:n])
			if err != nil {
				break
			}
		}
		_, _ = c.Write(h.Sum(nil))
	}()

	payload := make([]byte, 32<<20)
	rand.Read(payload)
	want := sha256.Sum256(payload)
	resp, up, err := h2Connect(e.h2Conn(), ln.Addr().String(), e.bearer())
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	go func() {
		_, _ = up.Write(payload)
		_ = up.Close()
	}()
	got, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(got, want[:]) {
		t.Fatalf("the origin's hash of the upload: %x, %v; want %x", got, err, want)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.RequestSize != int64(len(payload)) || r.ResponseSize != int64(len(want)) {
		t.Errorf("record sizes: request %d response %d, want %d %d", r.RequestSize, r.ResponseSize, len(payload), len(want))
	}
}

type halfCloser struct {
	c interface {
		io.Writer
		CloseWrite() error
	}
}

func (h halfCloser) Write(b []byte) (int, error) { return h.c.Write(b) }
func (h halfCloser) Close() error                { return h.c.CloseWrite() }

func TestConnectMalformedAndDeniedTargets(t *testing.T) {
	e := startProxy(t, map[string]string{"EGRESS_ALLOW_CIDRS": ""})
	cases := []struct {
		target string
		status int
	}{
		{"127.0.0.1:0", 400},
		{"[127.0.0.1]:443", 400},
		{"example.com:99999", 400},
		{"user@example.com:443", 400},
		{"example.com", 400}, // CONNECT needs a port
		{"127.0.0.1:443", 403},
		{"10.1.2.3:443", 403},
		{"169.254.169.254:80", 403},
		{"[::1]:443", 403},
		{"127.1:443", 403},
		{"8.8.8.8:25", 403}, // port not allowed
	}
	for _, c := range cases {
		conn, _, status := e.h1Connect(c.target, e.bearer(), nil)
		conn.Close()
		if status != c.status {
			t.Errorf("CONNECT %s: %d, want %d", c.target, status, c.status)
		}
	}
	// HTTP/2 too.
	cc := e.h2Conn()
	resp, up, err := h2Connect(cc, "10.0.0.1:443", e.bearer())
	if err != nil {
		t.Fatal(err)
	}
	up.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 403 || !bytes.Contains(body, []byte("destination not allowed: private address")) {
		t.Errorf("h2 CONNECT 10.0.0.1: %d %q", resp.StatusCode, body)
	}
}

func TestTunnelLimitPerToken(t *testing.T) {
	e := startProxy(t, map[string]string{"MAX_TUNNELS_PER_TOKEN": "2"})
	echo := newEchoServer(t)
	c1, _, s1 := e.h1Connect(echo.addr(), e.bearer(), nil)
	c2, _, s2 := e.h1Connect(echo.addr(), e.bearer(), nil)
	c3, _, s3 := e.h1Connect(echo.addr(), e.bearer(), nil)
	other := e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	c4, _, s4 := e.h1Connect(echo.addr(), "Bearer "+other, nil)
	defer c1.Close()
	defer c2.Close()
	defer c3.Close()
	defer c4.Close()
	if s1 != 200 || s2 != 200 || s3 != 429 || s4 != 200 {
		t.Fatalf("statuses %d %d %d %d, want 200 200 429 200", s1, s2, s3, s4)
	}
	// Closing one frees a slot.
	c1.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c5, _, s5 := e.h1Connect(echo.addr(), e.bearer(), nil)
		c5.Close()
		if s5 == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot never freed: %d", s5)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestTunnelIdleTimeout(t *testing.T) {
	e := startProxy(t, map[string]string{"TUNNEL_IDLE_TIMEOUT": "300ms"})
	echo := newEchoServer(t)
	conn, br, status := e.h1Connect(echo.addr(), e.bearer(), nil)
	if status != 200 {
		t.Fatal(status)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	// Nothing is sent: the proxy closes the idle tunnel, we read EOF.
	if _, err := io.ReadAll(br); err != nil {
		t.Fatalf("idle tunnel: %v (want clean EOF)", err)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.Error != "tunnel_idle_timeout" || r.Success {
		t.Errorf("record %+v", r)
	}
}

// Browsers end HTTP/2 tunnels by resetting the stream; that is a normal
// end, recorded as a success with the bytes moved.
func TestConnectHTTP2ClientResetIsSuccess(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	cc := e.h2Conn()
	resp, up, err := h2Connect(cc, echo.addr(), e.bearer())
	if err != nil || resp.StatusCode != 200 {
		t.Fatal(err)
	}
	up.Write([]byte("hello"))
	buf := make([]byte, 5)
	io.ReadFull(resp.Body, buf)
	resp.Body.Close() // RST_STREAM(CANCEL) from the client
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if !r.Success || r.Error != "" || r.RequestSize != 5 || r.ResponseSize != 5 {
		t.Errorf("record %+v", r)
	}
}
