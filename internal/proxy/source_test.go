package proxy_test

import (
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/proxy"
)

// streamOrigin accepts one connection and writes payload to it, then
// closes it; reading nothing, it answers nothing.
func streamOrigin(t *testing.T, payload []byte) string {
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
		_, _ = c.Write(payload)
	}()
	return ln.Addr().String()
}

// A download through an HTTP/2 tunnel is read from the origin socket by
// the engine's writer itself (httpx.Sourcer): while it streams, no relay
// goroutine runs for the tunnel (the upload side is parked on its stream,
// the download side belongs to the writer), and the bytes arrive whole,
// in order, followed by END_STREAM when the origin closes, counted once
// in the record.
func TestHTTP2DownloadIsReadByTheWriter(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("sources need readv(2) and the parker (Linux)")
	}
	e := startProxy(t, nil)
	payload := make([]byte, 32<<20)
	rand.Read(payload)
	origin := streamOrigin(t, payload)
	resp, up, err := h2Connect(e.h2Conn(), origin, e.bearer())
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	defer up.Close()
	h := sha256.New()
	// Read a part, then look at the goroutines while the origin still has
	// most of the payload to send and the client's window is open.
	if _, err := io.CopyN(h, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	running := relayGoroutines(t)
	n, err := io.Copy(h, resp.Body)
	if err != nil {
		t.Fatalf("download after %d bytes: %v", n+1<<20, err)
	}
	if n+1<<20 != int64(len(payload)) || [32]byte(h.Sum(nil)) != sha256.Sum256(payload) {
		t.Fatalf("got %d bytes, hash match %v", n+1<<20, [32]byte(h.Sum(nil)) == sha256.Sum256(payload))
	}
	if running != 0 {
		t.Errorf("%d relay goroutines ran during the download, want 0 (the writer reads the origin)", running)
	}
	up.Close()
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if !r.Success || r.ResponseSize != int64(len(payload)) || r.RequestSize != 0 {
		t.Errorf("record %+v", r)
	}
}

// A source waiting on the parker (the origin is quiet) is given back when
// the tunnel ends for any reason, and its direction finishes exactly once:
// the idle timeout, the client's reset, and an origin that closes after a
// pause each leave no parked direction and a right record.
func TestHTTP2SourceEnds(t *testing.T) {
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
