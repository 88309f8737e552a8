package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/proxy"
)

// relayGoroutines counts goroutines running a relay direction.
func relayGoroutines(t *testing.T) int {
	t.Helper()
	var b bytes.Buffer
	if err := pprof.Lookup("goroutine").WriteTo(&b, 2); err != nil {
		t.Fatal(err)
	}
	return strings.Count(b.String(), "proxy.(*direction).run(")
}

// waitParked waits until want tunnel directions are parked: held by the
// parker, with no goroutine of their own (see parkAfter).
func (e *env) waitParked(want int) {
	e.t.Helper()
	deadline := time.Now().Add(10 * proxy.ParkAfter)
	for e.app.Proxy.ParkedDirections() < want {
		if time.Now().After(deadline) {
			e.t.Fatalf("%d directions parked after %v, want %d", e.app.Proxy.ParkedDirections(), 10*proxy.ParkAfter, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// splitWriter, once armed, writes the next Write in two parts with a pause
// longer than proxy.ParkAfter between them, so a TLS record arrives half before
// the relay parks and half after.
type splitWriter struct {
	net.Conn
	armed atomic.Bool
}

func (s *splitWriter) Write(b []byte) (int, error) {
	if !s.armed.CompareAndSwap(true, false) || len(b) < 2 {
		return s.Conn.Write(b)
	}
	n, err := s.Conn.Write(b[:len(b)/2])
	if err != nil {
		return n, err
	}
	time.Sleep(proxy.ParkAfter + proxy.ParkAfter/2)
	m, err := s.Conn.Write(b[len(b)/2:])
	return n + m, err
}

// An idle HTTP/1.1 tunnel parks both directions and wakes for bytes from
// either side, including a TLS record whose halves arrive on both sides of
// the park.
func TestIdleHTTP1TunnelParksAndWakes(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	raw, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	sw := &splitWriter{Conn: raw}
	conn := tls.Client(sw, e.tlsConfig("http/1.1"))
	defer conn.Close()
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n", echo.addr(), echo.addr(), e.bearer())
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	exchange := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(conn, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
			t.Fatalf("echo of %q: %q %v", msg, got, err)
		}
	}
	exchange("hello")
	e.waitParked(2)
	if n := relayGoroutines(t); n != 0 {
		t.Errorf("%d relay goroutines while both directions are parked, want 0", n)
	}

	// Both directions wake: the upload for the client's record, the
	// download for the origin's echo of it.
	exchange("after the park")
	e.waitParked(2)

	// A record split around a park: crypto/tls keeps the first half.
	sw.armed.Store(true)
	exchange(strings.Repeat("x", 3000))

	// A 1 MB burst goes through the large buffers and parks again after.
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	go conn.Write(big)
	got := make([]byte, len(big))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("1 MB echo: %v", err)
	}
	e.waitParked(2)

	// A half-close reaches a parked direction too.
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "<bye>" {
		t.Fatalf("after half-close: %q %v", rest, err)
	}
	want := int64(len("hello") + len("after the park") + 3000 + len(big))
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.StatusCode != 200 || !r.Success || r.RequestSize != want || r.ResponseSize != want+5 {
		t.Errorf("record = %+v, want %d bytes up and %d down", r, want, want+5)
	}
	if n := e.app.Proxy.ParkedDirections(); n != 0 {
		t.Errorf("%d directions still parked after the tunnel ended", n)
	}
}

// An HTTP/2 tunnel's download direction parks; the upload reads the
// request body, which has no socket, and stays in the handler.
func TestIdleHTTP2TunnelParksAndWakes(t *testing.T) {
	e := startProxy(t, nil)
	echo := newEchoServer(t)
	cc := e.h2Conn()
	resp, up, err := h2Connect(cc, echo.addr(), e.bearer())
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	for i, msg := range []string{"hello", "after the park"} {
		if _, err := io.WriteString(up, msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != msg {
			t.Fatalf("echo %d: %q %v", i, got, err)
		}
		e.waitParked(1)
	}
	up.Close()
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "<bye>" {
		t.Fatalf("after END_STREAM: %q %v", rest, err)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.StatusCode != 200 || r.RequestSize != 19 || r.ResponseSize != 24 {
		t.Errorf("record = %+v", r)
	}
}

// TUNNEL_IDLE_TIMEOUT closes tunnels whose directions are parked: the
// parker gives them back, both finish and the record is written.
func TestParkedTunnelsCloseOnIdleTimeout(t *testing.T) {
	e := startProxy(t, map[string]string{"TUNNEL_IDLE_TIMEOUT": (3 * proxy.ParkAfter).String()})
	echo := newEchoServer(t)
	conn, br, status := e.h1Connect(echo.addr(), e.bearer(), nil)
	if status != 200 {
		t.Fatal(status)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(conn, "ping"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo: %q %v", got, err)
	}
	e.waitParked(2)
	if _, err := io.ReadAll(br); err != nil {
		t.Fatalf("idle tunnel: %v (want clean EOF)", err)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.Error != "tunnel_idle_timeout" || r.RequestSize != 4 || r.ResponseSize != 4 {
		t.Errorf("record %+v", r)
	}
	if n := e.app.Proxy.ParkedDirections(); n != 0 {
		t.Errorf("%d directions still parked after the idle timeout", n)
	}
}
