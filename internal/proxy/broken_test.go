package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// Records of forwarded responses that did not finish must say so: before,
// ReverseProxy's abort (a panic) skipped the error path and the record read
// 200, success.

func TestForwardOriginCutsBodyIsRecorded(t *testing.T) {
	e := startProxy(t, nil)
	addr := testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		_, _ = http.ReadRequest(bufio.NewReader(c))
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n%s", bytes.Repeat([]byte("a"), 1000))
	})
	// The client sees the break either way: as a cut body, or (when the
	// abort came before the first flush) as a cut response.
	resp, err := e.h1Client(e.bearer()).Get("http://" + addr + "/cut")
	if err == nil {
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Fatalf("client read %d bytes and a clean end of a cut body", n)
		}
	}
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/cut") })
	if rec.StatusCode != http.StatusOK || rec.Success || rec.Error != "upstream_body" {
		t.Errorf("record = %+v, want status 200, success false, error upstream_body", rec)
	}
}

func TestForwardClientLeavesMidBodyIsRecorded(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t) // /download streams 25 MiB
	c, err := tlsDialConfig(e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "GET %s/download HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n", o.URL, e.bearer())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, resp.Body, 64<<10); err != nil {
		t.Fatal(err)
	}
	c.Close() // the client leaves mid-body
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/download") })
	if rec.Success || rec.Error != "client_closed" {
		t.Errorf("record = %+v, want success false, error client_closed", rec)
	}
}

// A forwarded request cut by the drain deadline is the shutdown's doing,
// not the origin's: it must not read 502 upstream_error.
func TestForwardCutAtDrainDeadlineIsShutdown(t *testing.T) {
	e := startProxy(t, nil)
	arrived := make(chan struct{}, 1)
	addr := testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		_, _ = http.ReadRequest(bufio.NewReader(c))
		arrived <- struct{}{}
		_, _ = io.Copy(io.Discard, c) // never answers
	})
	done := make(chan error, 1)
	go func() {
		resp, err := e.h1Client(e.bearer()).Get("http://" + addr + "/slow-origin")
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	<-arrived
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_ = e.app.Shutdown(ctx)
	<-done
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/slow-origin") })
	if rec.Error != "shutdown" || rec.Success {
		t.Errorf("record = %+v, want error shutdown", rec)
	}
}

// An origin that answers before the client has sent its body (an early
// 401 or 413) ends the exchange: the connection closes right after the
// answer instead of waiting, with no time limit, for the rest of a body
// nobody will read, and without a forwarding slot.
func TestForwardEarlyAnswerClosesConnection(t *testing.T) {
	e := startProxy(t, map[string]string{"MAX_FORWARDS_PER_TOKEN": "1"})
	// A raw origin: net/http's own server would wait for the body before
	// it answered.
	addr := testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nno\n")
		_, _ = io.Copy(io.Discard, br)
	})
	o := struct{ URL string }{"http://" + addr}
	for _, framing := range []string{"Content-Length: 1000", "Transfer-Encoding: chunked"} {
		c, err := tlsDialConfig(e.addr, e.tlsConfig("http/1.1"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "POST %s/early HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n%s\r\n\r\n", o.URL, e.bearer(), framing)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", framing, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
			t.Errorf("%s: %d, Close=%v; want the origin's 401 and Connection: close", framing, resp.StatusCode, resp.Close)
		}
		if _, err := io.Copy(io.Discard, br); err != nil {
			t.Errorf("%s: the connection was not closed after the answer: %v", framing, err)
		}
	}
	if n := e.app.Proxy.ActiveRequests(); n != 0 {
		t.Errorf("%d requests still active", n)
	}
}

// A client that leaves while the origin is quiet (a server-sent event
// stream between events) is recorded as client_closed: the origin's read
// fails only because the request was cancelled.
func TestForwardClientLeavesWhileOriginIdle(t *testing.T) {
	e := startProxy(t, nil)
	o := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select { // then nothing, until the proxy hangs up
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	}))
	t.Cleanup(o.Close)
	c, err := tlsDialConfig(e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "GET %s/events HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n", o.URL, e.bearer())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "data: one\n" {
		t.Fatalf("first event: %q %v", line, err)
	}
	c.Close()
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/events") })
	if rec.Error != "client_closed" || rec.Success {
		t.Errorf("record = %+v, want error client_closed", rec)
	}
}

// An HTTP/2 client that never opens a forwarded response's stream window
// (while its connection lives) has the stream reset by the engine's stall
// limit, and the record says so.
func TestForwardHTTP2ZeroWindowIsWriteStalled(t *testing.T) {
	e := startProxy(t, map[string]string{"TUNNEL_IDLE_TIMEOUT": "1s"})
	o := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("z"), 32<<10)
		for i := 0; i < 64; i++ {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(o.Close)
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("h2"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h := testutil.NewH2Raw(t, c, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	host := strings.TrimPrefix(o.URL, "http://")
	s := h.Open(t, true, ":method", "GET", ":scheme", "http", ":authority", host, ":path", "/stalled",
		"proxy-authorization", e.bearer())
	if resp := s.Response(t); resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second)) // failsafe
	if _, err := io.ReadAll(s); err == nil {
		t.Fatal("the stream ended normally; want a reset")
	}
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/stalled") })
	if rec.Error != "write_stalled" || rec.Success {
		t.Errorf("record = %+v, want error write_stalled", rec)
	}
}
