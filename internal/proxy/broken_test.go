package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

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
