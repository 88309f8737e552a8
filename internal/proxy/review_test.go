package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// rawOrigin runs serve for each connection to a loopback origin.
func rawOrigin(t *testing.T, serve func(net.Conn)) string { return testutil.ServeTCP(t, serve) }

// An origin that answers before reading the whole body: the client gets
// the answer while it still holds the rest of its upload, and the record's
// request_size is whatever was read by then (no race with the transport).
func TestForwardEarlyResponseDuringUpload(t *testing.T) {
	e := startProxy(t, nil)
	origin := rawOrigin(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		io.Copy(io.Discard, br) // keeps reading, never finishes
	})
	c, err := tlsDial(e, "http/1.1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST http://%s/upload HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", origin, origin, e.bearer())
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no response while the upload is open: %v", err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 2))
	if resp.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	c.Close()
	r := e.waitRecord(func(r recordT) bool { return r.Method == "POST" })
	if r.StatusCode != 200 || r.RequestSize > 5 {
		t.Errorf("record %+v", r)
	}
}

// A status net/http cannot write back is a 502, not a panic and a dropped
// connection.
func TestForwardInvalidOriginStatus(t *testing.T) {
	e := startProxy(t, nil)
	origin := rawOrigin(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 099 Weird\r\nContent-Length: 0\r\n\r\n")
	})
	resp, err := e.h1Client(e.bearer()).Get("http://" + origin + "/")
	if err != nil {
		t.Fatalf("client error (connection dropped?): %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("status %d, want 502", resp.StatusCode)
	}
	if strings.Contains(e.logbuf.String(), "panic") {
		t.Error("the proxy panicked")
	}
}

// An origin that refuses the WebSocket upgrade and then stalls its body
// must not pin the handler after the client resets the stream.
func TestExtendedConnectRefusalWithStalledBodyEnds(t *testing.T) {
	e := startProxy(t, nil)
	origin := rawOrigin(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nabc")
		time.Sleep(time.Minute)
	})
	resp, _ := extendedConnect(t, e.h2Raw(), "http", origin, "/ws", "websocket", e.bearer(), nil)
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("status %d, want the origin's 403", resp.StatusCode)
	}
	resp.Body.Close() // RST_STREAM
	deadline := time.Now().Add(10 * time.Second)
	for e.app.Proxy.ActiveRequests() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still active after the client reset", e.app.Proxy.ActiveRequests())
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	if r.StatusCode != 403 || r.Error != "upgrade_refused" {
		t.Errorf("record %+v", r)
	}
}

func tlsDial(e *env, proto string) (net.Conn, error) {
	return tlsDialConfig(e.addr, e.tlsConfig(proto))
}
