package proxy_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
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

// However an HTTP/2 tunnel ends while its download is blocked on the
// client's window, the relay finishes once, nothing of the tunnel is left
// (no goroutine, no parked direction), and the record says who ended it.
func TestHTTP2BulkTunnelEnds(t *testing.T) {
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
	// reading: the download blocks on the window.
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
