package h2srv

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// testServer serves h on a TLS loopback listener with cfg and returns its
// address.
func testServer(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	cert, _, _, err := selfsigned.Cert(time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(cfg)
	tcfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				tc := tls.Server(c, tcfg)
				if tc.Handshake() != nil {
					c.Close()
					return
				}
				s.ServeConn(tc)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); s.Close() })
	return s, ln.Addr().String()
}

// rawConn is a bare HTTP/2 client connection to addr.
type rawConn struct {
	*testutil.H2Raw
	t    testing.TB
	dec  *hpack.Decoder
	seen []hpack.HeaderField
}

func dialRaw(t testing.TB, addr string, settings ...http2.Setting) *rawConn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &rawConn{H2Raw: testutil.NewH2Raw(t, c, settings...), t: t}
	r.dec = hpack.NewDecoder(4096, func(f hpack.HeaderField) { r.seen = append(r.seen, f) })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return r
}

// next reads frames until one satisfies keep (SETTINGS and WINDOW_UPDATE
// frames of the connection set-up are skipped unless keep wants them).
func (r *rawConn) next(keep func(http2.Frame) bool) http2.Frame {
	r.t.Helper()
	for {
		f, err := r.Framer.ReadFrame()
		if err != nil {
			r.t.Fatalf("reading a frame: %v", err)
		}
		if hf, ok := f.(*http2.HeadersFrame); ok {
			r.seen = r.seen[:0]
			if _, err := r.dec.Write(hf.HeaderBlockFragment()); err != nil {
				r.t.Fatal(err)
			}
		}
		if keep(f) {
			return f
		}
	}
}

func isType(t http2.FrameType) func(http2.Frame) bool {
	return func(f http2.Frame) bool { return f.Header().Type == t }
}

// closedOrError reads until the connection ends or an RST_STREAM/GOAWAY
// comes, and returns that frame (nil: connection closed).
func (r *rawConn) closedOrError() http2.Frame {
	for {
		f, err := r.Framer.ReadFrame()
		if err != nil {
			return nil
		}
		switch f.(type) {
		case *http2.RSTStreamFrame, *http2.GoAwayFrame:
			return f
		}
	}
}

func echoHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(200)
	_, _ = io.Copy(w, r.Body)
}

func TestHeadersAfterResetIsStreamClosed(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	_, addr := testServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block })})
	for _, wait := range []bool{false, true} {
		r := dialRaw(t, addr)
		r.Headers(t, 1, false, ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "x")
		_ = r.Framer.WriteRSTStream(1, http2.ErrCodeCancel)
		if wait {
			time.Sleep(50 * time.Millisecond)
		}
		r.Headers(t, 1, true, ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "x")
		f := r.closedOrError()
		var code http2.ErrCode
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			code = f.ErrCode
		case *http2.GoAwayFrame:
			code = f.ErrCode
		}
		if code != http2.ErrCodeStreamClosed {
			t.Errorf("wait %v: got %v, want STREAM_CLOSED", wait, f)
		}
	}
}

var _ = bytes.NewReader
