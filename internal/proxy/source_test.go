package proxy_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/proxy"
)

// scriptedOrigin accepts one connection and runs script on it.
func scriptedOrigin(t *testing.T, script func(c *net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		script(c.(*net.TCPConn))
	}()
	return ln.Addr().String()
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// A bulk download through an HTTP/2 tunnel is read from the origin socket
// by the engine's writer itself (httpx.Sourcer): while it streams, no relay
// goroutine runs for the tunnel (the upload side is parked on its stream,
// the download side belongs to the writer). The origin pauses between two
// bursts, so the source waits on the parker and the writer reads on when
// it wakes; the bytes arrive whole and in order, then END_STREAM when the
// origin closes, counted once in the record.
func TestHTTP2BulkDownloadIsReadByTheWriter(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("sources need readv(2) and the parker (Linux)")
	}
	e := startProxy(t, nil)
	first, second := randomBytes(24<<20), randomBytes(8<<20)
	origin := scriptedOrigin(t, func(c *net.TCPConn) {
		c.Write(first)
		time.Sleep(300 * time.Millisecond)
		c.Write(second)
	})
	resp, up, err := h2Connect(e.h2Conn(), origin, e.bearer())
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	defer up.Close()
	h := sha256.New()
	// Read a part, then stop reading: the writer holds the source, blocked
	// on the window, and no relay goroutine should be left. Without a
	// source the download's relay goroutine waits in Write all along.
	if _, err := io.CopyN(h, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for relayGoroutines(t) != 0 {
		if time.Now().After(deadline) {
			var b bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&b, 2)
			for _, g := range strings.Split(b.String(), "\n\n") {
				if strings.Contains(g, "(*direction).run(") {
					t.Log(g)
				}
			}
			t.Fatalf("%d relay goroutines during a bulk download; want 0 (the writer reads the origin)", relayGoroutines(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
	n, err := io.Copy(h, resp.Body)
	total := n + 1<<20
	want := sha256.Sum256(append(append([]byte{}, first...), second...))
	if err != nil || total != int64(len(first)+len(second)) || [32]byte(h.Sum(nil)) != want {
		t.Fatalf("download: %d bytes, err %v, hash match %v", total, err, [32]byte(h.Sum(nil)) == want)
	}
	up.Close()
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if !r.Success || r.ResponseSize != total || r.RequestSize != 0 || r.CloseReason != "origin_closed" {
		t.Errorf("record %+v", r)
	}
}

// However a tunnel ends while the writer holds its source (blocked on
// the client's window), the source is
// given back and the download direction finishes once, with the record
// of a tunnel without a source.
func TestHTTP2SourceEnds(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("sources need readv(2) and the parker (Linux)")
	}
	// bulk: an origin that keeps writing until the client goes away.
	bulk := func(c *net.TCPConn) {
		b := randomBytes(256 << 10)
		for {
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	}
	// stalled opens a tunnel to origin and reads 2 MiB, then stops
	// reading: the writer holds the source, blocked on the window.
	stalled := func(t *testing.T, e *env, origin string) (io.ReadCloser, io.Closer) {
		resp, up, err := h2Connect(e.h2Conn(), origin, e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		if _, err := io.CopyN(io.Discard, resp.Body, 2<<20); err != nil {
			t.Fatal(err)
		}
		return resp.Body, up
	}

	t.Run("client reset", func(t *testing.T) {
		e := startProxy(t, nil)
		body, up := stalled(t, e, scriptedOrigin(t, bulk))
		defer up.Close()
		body.Close() // RST_STREAM(CANCEL)
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if !r.Success || r.CloseReason != "client_closed" || r.ResponseSize < 2<<20 {
			t.Errorf("record %+v", r)
		}
		waitNoRelay(t, e)
	})
	t.Run("idle timeout", func(t *testing.T) {
		e := startProxy(t, map[string]string{"TUNNEL_IDLE_TIMEOUT": "1s"})
		body, up := stalled(t, e, scriptedOrigin(t, bulk))
		defer up.Close()
		defer body.Close()
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if r.Success || r.Error != "tunnel_idle_timeout" || r.CloseReason != "idle_timeout" {
			t.Errorf("record %+v", r)
		}
		waitNoRelay(t, e)
	})
	t.Run("origin reset", func(t *testing.T) {
		e := startProxy(t, nil)
		payload := randomBytes(4 << 20)
		origin := scriptedOrigin(t, func(c *net.TCPConn) {
			c.Write(payload)
			c.SetLinger(0) // close with RST
		})
		resp, up, err := h2Connect(e.h2Conn(), origin, e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		defer up.Close()
		got, _ := io.ReadAll(resp.Body) // a reset after what arrived, or all of it and END_STREAM
		if !bytes.Equal(got, payload[:len(got)]) {
			t.Fatalf("downloaded bytes differ from the origin's (%d bytes)", len(got))
		}
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if r.CloseReason != "origin_closed" || r.ResponseSize != int64(len(got)) {
			t.Errorf("record %+v (client got %d bytes)", r, len(got))
		}
		waitNoRelay(t, e)
	})
}

// waitNoRelay waits until no relay direction runs or is parked: the tunnel
// is over and nothing of it is left.
func waitNoRelay(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.app.Proxy.ParkedDirections() != 0 || relayGoroutines(t) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after the tunnel ended: %d directions parked, %d relay goroutines",
				e.app.Proxy.ParkedDirections(), relayGoroutines(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A source waiting on the parker (the origin is quiet) is given back when
// the tunnel ends for any reason, and its direction finishes exactly once:
// the idle timeout, the client's reset, and an origin that closes after a
// pause each leave no parked direction and a right record.
func TestHTTP2WaitingSourceEnds(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("sources need readv(2) and the parker (Linux)")
	}
	t.Run("idle timeout", func(t *testing.T) {
		e := startProxy(t, map[string]string{"TUNNEL_IDLE_TIMEOUT": (3 * proxy.ParkAfter).String()})
		echo := newEchoServer(t)
		resp, up, err := h2Connect(e.h2Conn(), echo.addr(), e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		defer up.Close()
		if _, err := io.WriteString(up, "ping"); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 4)
		if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != "ping" {
			t.Fatalf("echo: %q %v", got, err)
		}
		e.waitParked(2) // the upload on its stream, the download's source on the parker
		if _, err := io.ReadAll(resp.Body); err == nil {
			t.Error("the idle tunnel's stream ended cleanly; want a reset")
		}
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if r.Error != "tunnel_idle_timeout" || r.RequestSize != 4 || r.ResponseSize != 4 {
			t.Errorf("record %+v", r)
		}
		waitNoParked(t, e)
	})
	t.Run("client reset while the source waits", func(t *testing.T) {
		e := startProxy(t, nil)
		echo := newEchoServer(t)
		resp, up, err := h2Connect(e.h2Conn(), echo.addr(), e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		if _, err := io.WriteString(up, "hello"); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 5)
		if _, err := io.ReadFull(resp.Body, got); err != nil {
			t.Fatal(err)
		}
		e.waitParked(2)
		resp.Body.Close() // RST_STREAM(CANCEL)
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if !r.Success || r.RequestSize != 5 || r.ResponseSize != 5 {
			t.Errorf("record %+v", r)
		}
		waitNoParked(t, e)
	})
	t.Run("origin closes after a pause", func(t *testing.T) {
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
			c.Write([]byte("first"))
			time.Sleep(proxy.ParkAfter / 2) // the source waits on the parker meanwhile
			c.Write([]byte("second"))
			c.Close()
		}()
		resp, up, err := h2Connect(e.h2Conn(), ln.Addr().String(), e.bearer())
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		defer up.Close()
		body, err := io.ReadAll(resp.Body) // END_STREAM after the origin's FIN
		if err != nil || string(body) != "firstsecond" {
			t.Fatalf("download: %q %v", body, err)
		}
		up.Close()
		r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
		if !r.Success || r.ResponseSize != 11 {
			t.Errorf("record %+v", r)
		}
		waitNoParked(t, e)
	})
}

func waitNoParked(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.app.Proxy.ParkedDirections() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d directions still parked after the tunnel ended", e.app.Proxy.ParkedDirections())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
