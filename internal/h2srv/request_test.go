package h2srv

import (
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// seenRequest is what a handler saw of its request.
type seenRequest struct {
	Method, Scheme, Protocol, Host, URL, URLHost, RequestURI, Cookie, Proto string
	ContentLength                                                           int64
	TLS, ServerKey, LocalAddr                                               bool
}

func snapshot(r *http.Request) seenRequest {
	return seenRequest{
		Method:        r.Method,
		Scheme:        httpx.Scheme(r),
		Protocol:      httpx.Protocol(r),
		Host:          r.Host,
		URL:           r.URL.String(),
		URLHost:       r.URL.Host,
		RequestURI:    r.RequestURI,
		Cookie:        r.Header.Get("Cookie"),
		Proto:         r.Proto,
		ContentLength: r.ContentLength,
		TLS:           r.TLS != nil,
		ServerKey:     r.Context().Value(http.ServerContextKey) != nil,
		LocalAddr:     r.Context().Value(http.LocalAddrContextKey) != nil,
	}
}

// What the handler sees of normal requests, CONNECT and extended CONNECT.
func TestRequestSemantics(t *testing.T) {
	seen := make(chan seenRequest, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- snapshot(r)
	})})
	c := dial(t, addr)
	common := seenRequest{Proto: "HTTP/2.0", TLS: true, ServerKey: true, LocalAddr: true}
	for i, tc := range []struct {
		name   string
		end    bool // END_STREAM on HEADERS
		body   string
		fields []string
		want   seenRequest
	}{
		{"GET with cookies", true, "", []string{":method", "GET", ":scheme", "https", ":path", "/a/b?x=1", ":authority", "example.com",
			"cookie", "a=1", "accept", "*/*", "cookie", "b=2"},
			seenRequest{Method: "GET", Scheme: "https", Host: "example.com", URL: "/a/b?x=1", RequestURI: "/a/b?x=1", Cookie: "a=1; b=2"}},
		{"POST with content-length", false, "abc", post("/up", "content-length", "3"),
			seenRequest{Method: "POST", Scheme: "https", Host: "example.com", URL: "/up", RequestURI: "/up", ContentLength: 3}},
		{"POST without content-length", false, "abc", []string{":method", "POST", ":scheme", "http", ":path", "/up", ":authority", "example.com:8080"},
			seenRequest{Method: "POST", Scheme: "http", Host: "example.com:8080", URL: "/up", RequestURI: "/up", ContentLength: -1}},
		{"host instead of :authority", true, "", []string{":method", "GET", ":scheme", "https", ":path", "/", "host", "h.example"},
			seenRequest{Method: "GET", Scheme: "https", Host: "h.example", URL: "/", RequestURI: "/"}},
		{"CONNECT", false, "", []string{":method", "CONNECT", ":authority", "example.com:443"},
			seenRequest{Method: "CONNECT", Host: "example.com:443", URL: "//example.com:443", URLHost: "example.com:443", RequestURI: "example.com:443", ContentLength: -1}},
		{"extended CONNECT", false, "", []string{":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":path", "/chat?room=1", ":authority", "example.com"},
			seenRequest{Method: "CONNECT", Scheme: "https", Protocol: "websocket", Host: "example.com", URL: "/chat?room=1", RequestURI: "/chat?room=1", ContentLength: -1}},
	} {
		id := uint32(2*i + 1)
		c.mustHeaders(id, tc.end, tc.fields...)
		if tc.body != "" {
			c.mustData(id, true, []byte(tc.body))
		}
		got := recv(t, seen, tc.name)
		want := tc.want
		want.Proto, want.TLS, want.ServerKey, want.LocalAddr = common.Proto, common.TLS, common.ServerKey, common.LocalAddr
		if got != want {
			t.Errorf("%s:\n got %+v\nwant %+v", tc.name, got, want)
		}
		if hdr, _, _ := c.response(id); statusOf(hdr) != "200" {
			t.Errorf("%s: response %v", tc.name, hdr)
		}
	}
}

// Malformed requests (RFC 9113 §8.1.1, §8.2, §8.3, §8.5; RFC 8441 §4) are
// reset with PROTOCOL_ERROR and never reach the handler; the connection
// goes on.
func TestMalformedRequests(t *testing.T) {
	calls := atomic.Int32{}
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) })})
	c := dial(t, addr)
	cases := []struct {
		name   string
		fields []string
	}{
		{"uppercase name", get("/", "X-Upper", "1")},
		{"empty name", get("/", "", "1")},
		{"invalid value", get("/", "x-a", "a\x00b")},
		{"connection", get("/", "connection", "close")},
		{"keep-alive", get("/", "keep-alive", "timeout=5")},
		{"proxy-connection", get("/", "proxy-connection", "keep-alive")},
		{"transfer-encoding", get("/", "transfer-encoding", "chunked")},
		{"upgrade", get("/", "upgrade", "h2c")},
		{"te gzip", get("/", "te", "gzip")},
		{"te trailers, gzip", get("/", "te", "trailers, gzip")},
		{"no :method", []string{":scheme", "https", ":path", "/", ":authority", "example.com"}},
		{"no :scheme", []string{":method", "GET", ":path", "/", ":authority", "example.com"}},
		{"no :path", []string{":method", "GET", ":scheme", "https", ":authority", "example.com"}},
		{"empty :path", []string{":method", "GET", ":scheme", "https", ":path", "", ":authority", "example.com"}},
		{"relative :path", []string{":method", "GET", ":scheme", "https", ":path", "foo", ":authority", "example.com"}},
		{"duplicate :method", []string{":method", "GET", ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "example.com"}},
		{"unknown pseudo", get("/", ":foo", "bar")},
		{":status in a request", []string{":status", "200", ":method", "GET", ":scheme", "https", ":path", "/", ":authority", "example.com"}},
		{"pseudo after regular", []string{":method", "GET", ":scheme", "https", "accept", "*/*", ":path", "/", ":authority", "example.com"}},
		{"CONNECT with :path", []string{":method", "CONNECT", ":authority", "example.com:443", ":path", "/"}},
		{"CONNECT with :scheme", []string{":method", "CONNECT", ":authority", "example.com:443", ":scheme", "https"}},
		{"CONNECT without :authority", []string{":method", "CONNECT"}},
		{":protocol without CONNECT", []string{":method", "GET", ":protocol", "websocket", ":scheme", "https", ":path", "/", ":authority", "example.com"}},
		{"extended CONNECT without :authority", []string{":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":path", "/"}},
		{"extended CONNECT without :path", []string{":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":authority", "example.com"}},
		{"content-length not a number", get("/", "content-length", "abc")},
		{"two content-lengths", get("/", "content-length", "1", "content-length", "2")},
	}
	for i, tc := range cases {
		id := uint32(2*i + 1)
		// content-length only counts with a body to come.
		end := !strings.Contains(tc.name, "content-length")
		c.mustHeaders(id, end, tc.fields...)
		f, before := c.until(func(f frame) bool { return f.Stream == id || f.Type == http2.FrameGoAway })
		if f.Type != http2.FrameRSTStream || f.Code != http2.ErrCodeProtocol {
			t.Errorf("%s: got %v (after %v), want RST_STREAM PROTOCOL_ERROR", tc.name, f, before)
		}
		if f.Type == http2.FrameGoAway {
			t.FailNow()
		}
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("handler called %d times for malformed requests", n)
	}
	id := uint32(2*len(cases) + 1)
	c.mustHeaders(id, true, get("/")...)
	if hdr, _, _ := c.response(id); statusOf(hdr) != "200" || calls.Load() != 1 {
		t.Errorf("a valid request after the malformed ones: %v, %d calls", hdr, calls.Load())
	}
}

// A request refused while it is being built (a :path that is no request
// URI, a bad content-length) frees its stream: with one stream allowed,
// the next request is served, not refused.
func TestMalformedRequestFreesItsStream(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler), MaxConcurrentStreams: 1})
	c := dial(t, addr)
	bad := [][]string{
		{":method", "GET", ":scheme", "https", ":path", "foo", ":authority", "example.com"},
		get("/", "content-length", "abc"),
		{":method", "GET", ":scheme", "https", ":path", "bar", ":authority", "example.com"},
	}
	for i, fields := range bad {
		id := uint32(2*i + 1)
		c.mustHeaders(id, i != 1, fields...)
		if f, _ := c.until(func(f frame) bool { return f.Stream == id }); f.Type != http2.FrameRSTStream || f.Code != http2.ErrCodeProtocol {
			t.Fatalf("request %d: got %v, want RST_STREAM PROTOCOL_ERROR", id, f)
		}
	}
	c.mustHeaders(7, true, get("/")...)
	if hdr, body, _ := c.response(7); hdr.field(":status") != "200" || string(body) != "ok" {
		t.Errorf("the request after the refused ones: %v %q, want 200 ok", hdr, body)
	}
}
