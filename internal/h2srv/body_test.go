package h2srv

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// An 8 MiB upload streamed through the handler comes back byte for byte
// (x/net's client, full duplex).
func TestUploadEcho8MiB(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(echoHandler)})
	cc := dialH2(t, addr)
	body := make([]byte, 8<<20)
	_, _ = rand.Read(body)
	req, _ := http.NewRequest("POST", "https://example.com/echo", bytes.NewReader(body))
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, body) {
		t.Errorf("echoed %d bytes, not the %d sent", len(got), len(body))
	}
}

// Request trailers: those the request declared in "Trailer" are in
// r.Trailer once the body is read to EOF (and not before); others are
// dropped.
func TestRequestTrailers(t *testing.T) {
	type result struct {
		before, after http.Header
		body          string
		err           error
	}
	results := make(chan result, 1)
	proceed := make(chan struct{})
	started := make(chan struct{}, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-proceed
		// As ReverseProxy does first thing: Clone reads r.Trailer.
		before := r.Clone(r.Context()).Trailer
		b, err := io.ReadAll(r.Body)
		results <- result{before, r.Trailer.Clone(), string(b), err}
	})})
	c := dial(t, addr)
	c.mustHeaders(1, false, post("/t", "trailer", "X-T, x-u")...)
	c.mustData(1, false, []byte("abc"))
	recv(t, started, "the handler")
	c.mustHeaders(1, true, "x-t", "1", "x-u", "2", "x-undeclared", "3")
	c.barrier() // the trailers are in before the handler looks
	close(proceed)
	res := recv(t, results, "the handler's result")
	if res.err != nil || res.body != "abc" {
		t.Fatalf("body %q, %v", res.body, res.err)
	}
	if want := (http.Header{"X-T": nil, "X-U": nil}); !equalHeader(res.before, want) {
		t.Errorf("r.Trailer before EOF: %v, want %v", res.before, want)
	}
	if want := (http.Header{"X-T": {"1"}, "X-U": {"2"}}); !equalHeader(res.after, want) {
		t.Errorf("r.Trailer after EOF: %v, want %v", res.after, want)
	}
	if hdr, _, _ := c.response(1); statusOf(hdr) != "200" {
		t.Errorf("response %v", hdr)
	}
}

func equalHeader(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || strings.Join(v, "\x00") != strings.Join(w, "\x00") || (v == nil) != (w == nil) {
			return false
		}
	}
	return true
}

// Response trailers, declared in "Trailer" or set under
// http.TrailerPrefix, go out as a trailing HEADERS with END_STREAM, with
// and without the header flushed before.
func TestResponseTrailers(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-A")
		_, _ = io.WriteString(w, "body")
		if r.URL.Path == "/flushed" {
			w.(http.Flusher).Flush()
		}
		w.Header().Set("X-A", "1")
		w.Header().Set(http.TrailerPrefix+"X-B", "2")
	})})
	c := dial(t, addr)
	for i, path := range []string{"/buffered", "/flushed"} {
		id := uint32(2*i + 1)
		c.mustHeaders(id, true, get(path)...)
		var hdrs []frame
		var body []byte
		for {
			f, _ := c.until(func(f frame) bool { return f.Stream == id })
			switch f.Type {
			case http2.FrameHeaders:
				hdrs = append(hdrs, f)
			case http2.FrameData:
				body = append(body, f.Data...)
			}
			if f.ends(id) {
				break
			}
		}
		if len(hdrs) != 2 || string(body) != "body" {
			t.Fatalf("%s: HEADERS %v, body %q; want response header, body, trailers", path, hdrs, body)
		}
		h, tr := hdrs[0], hdrs[1]
		if statusOf(h) != "200" || h.endStream() || h.has("x-a") || h.has("content-length") || h.field("trailer") != "X-A" {
			t.Errorf("%s: response header %v", path, h)
		}
		if !tr.endStream() || tr.field("x-a") != "1" || tr.field("x-b") != "2" || len(tr.Fields) != 2 {
			t.Errorf("%s: trailers %v, want x-a: 1, x-b: 2 with END_STREAM", path, tr)
		}
	}
}

// A body longer or shorter than its content-length resets the stream
// with PROTOCOL_ERROR (§8.1.1), and the handler reading it gets an
// error, not a short body.
func TestContentLengthMismatch(t *testing.T) {
	type result struct {
		body string
		err  error
	}
	results := make(chan result, 2)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		results <- result{string(b), err}
	})})
	c := dial(t, addr)
	for i, cl := range []string{"10", "2"} {
		id := uint32(2*i + 1)
		c.mustHeaders(id, false, post("/", "content-length", cl)...)
		c.mustData(id, true, []byte("abc"))
		if f, _ := c.until(func(f frame) bool { return f.Stream == id }); f.Type != http2.FrameRSTStream || f.Code != http2.ErrCodeProtocol {
			t.Errorf("content-length %s, 3 bytes sent: %v, want RST_STREAM PROTOCOL_ERROR", cl, f)
		}
		if res := recv(t, results, "the handler"); res.err == nil {
			t.Errorf("content-length %s: the handler read %q and no error", cl, res.body)
		}
	}
}

// "expect: 100-continue": 100 goes out when the handler first reads the
// body, and not at all if it answers without reading.
func TestExpectContinue(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/noread" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	})})
	c := dial(t, addr)
	c.mustHeaders(1, false, post("/read", "expect", "100-continue", "content-length", "3")...)
	f, _ := c.until(func(f frame) bool { return f.Stream == 1 })
	if f.Type != http2.FrameHeaders || statusOf(f) != "100" || f.endStream() {
		t.Fatalf("first frame on the stream %v, want HEADERS 100", f)
	}
	c.mustData(1, true, []byte("abc"))
	if hdr, body, _ := c.response(1); statusOf(hdr) != "200" || string(body) != "abc" {
		t.Errorf("after 100: %v %q", hdr, body)
	}

	c.mustHeaders(3, false, post("/noread", "expect", "100-continue", "content-length", "3")...)
	for {
		f, _ := c.until(func(f frame) bool { return f.Stream == 3 })
		if f.Type == http2.FrameHeaders && statusOf(f) != "403" {
			t.Errorf("handler that does not read: HEADERS %v, want only 403", f)
		}
		if f.ends(3) {
			break
		}
	}
}

// Flush sends the header (and what is written) while the handler runs.
func TestFlushSendsHeader(t *testing.T) {
	g := newGate()
	t.Cleanup(g.open)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-F", "1")
		_, _ = io.WriteString(w, "hi")
		w.(http.Flusher).Flush()
		g.wait(r)
	})})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/")...)
	recv(t, g.started, "the handler")
	f, before := c.until(func(f frame) bool { return f.Type == http2.FrameData && f.Stream == 1 })
	hs := onStream(before, 1, http2.FrameHeaders)
	if len(hs) != 1 || statusOf(hs[0]) != "200" || hs[0].field("x-f") != "1" || hs[0].has("content-length") || hs[0].endStream() {
		t.Fatalf("HEADERS before the handler returned: %v", hs)
	}
	if string(f.Data) != "hi" || f.endStream() {
		t.Fatalf("DATA before the handler returned: %v %q", f, f.Data)
	}
	g.open()
	if _, body, last := c.response(1); len(body) != 0 || !last.endStream() {
		t.Errorf("end of the stream: %q %v", body, last)
	}
}

// A small response gets Content-Length; a large one is streamed without.
func TestSmallResponseContentLength(t *testing.T) {
	big := strings.Repeat("x", 10<<10)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/big" {
			_, _ = io.WriteString(w, big)
			return
		}
		_, _ = io.WriteString(w, "hel")
		_, _ = io.WriteString(w, "lo")
	})})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/small")...)
	if hdr, body, _ := c.response(1); hdr.field("content-length") != "5" || string(body) != "hello" {
		t.Errorf("small: %v %q", hdr, body)
	}
	c.mustHeaders(3, true, get("/big")...)
	if hdr, body, _ := c.response(3); hdr.has("content-length") || string(body) != big {
		t.Errorf("big: %v, %d bytes", hdr, len(body))
	}
}

// HEAD: writes succeed and are discarded; 204 and 304: Write fails with
// http.ErrBodyNotAllowed. None has DATA.
func TestBodyNotAllowed(t *testing.T) {
	type result struct {
		n   int
		err error
	}
	results := make(chan result, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/204":
			w.WriteHeader(http.StatusNoContent)
		case "/304":
			w.WriteHeader(http.StatusNotModified)
		}
		n, err := io.WriteString(w, "hello")
		results <- result{n, err}
	})})
	c := dial(t, addr)
	for i, tc := range []struct {
		method, path, status string
		want                 result
	}{
		{"HEAD", "/", "200", result{5, nil}},
		{"GET", "/204", "204", result{0, http.ErrBodyNotAllowed}},
		{"GET", "/304", "304", result{0, http.ErrBodyNotAllowed}},
	} {
		id := uint32(2*i + 1)
		c.mustHeaders(id, true, ":method", tc.method, ":scheme", "https", ":path", tc.path, ":authority", "example.com")
		if got := recv(t, results, "the handler"); got != tc.want {
			t.Errorf("%s %s: Write = %v, want %v", tc.method, tc.path, got, tc.want)
		}
		f, _ := c.until(func(f frame) bool { return f.Stream == id })
		if f.Type != http2.FrameHeaders || statusOf(f) != tc.status || !f.endStream() {
			t.Errorf("%s %s: %v, want HEADERS %s with END_STREAM", tc.method, tc.path, f, tc.status)
		}
	}
}

// A handler that panics (http.ErrAbortHandler, as ReverseProxy does, or
// anything else) has its stream reset with INTERNAL_ERROR; the connection
// goes on.
func TestHandlerPanicResetsStream(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "partial")
		w.(http.Flusher).Flush()
		if r.URL.Path == "/abort" {
			panic(http.ErrAbortHandler)
		}
		panic("boom")
	})})
	c := dial(t, addr)
	for i, path := range []string{"/abort", "/boom"} {
		id := uint32(2*i + 1)
		c.mustHeaders(id, true, get(path)...)
		if _, _, last := c.response(id); last.Type != http2.FrameRSTStream || last.Code != http2.ErrCodeInternal {
			t.Errorf("%s: stream ended with %v, want RST_STREAM INTERNAL_ERROR", path, last)
		}
	}
}

// SetReadDeadline: a deadline in the past fails a blocked Read with
// os.ErrDeadlineExceeded, so does one that passes while Read waits, and
// clearing it lets the body be read (the relay's parking lease).
func TestReadDeadline(t *testing.T) {
	errs := make(chan error, 4)
	ready := make(chan struct{}, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		buf := make([]byte, 10)
		readErr := make(chan error, 1)
		go func() { _, err := r.Body.Read(buf); readErr <- err }()
		time.Sleep(20 * time.Millisecond) // most likely blocked in Read by now; either way it must fail
		_ = rc.SetReadDeadline(time.Now().Add(-time.Second))
		errs <- <-readErr

		_ = rc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		_, err := r.Body.Read(buf)
		errs <- err

		_ = rc.SetReadDeadline(time.Time{})
		ready <- struct{}{}
		b, err := io.ReadAll(r.Body)
		if err == nil && string(b) != "xyz" {
			err = errors.New("read " + string(b))
		}
		errs <- err
	})})
	c := dial(t, addr)
	c.mustHeaders(1, false, post("/")...)
	for _, what := range []string{"past deadline", "deadline passing"} {
		if err := recv(t, errs, what); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s: Read error %v, want os.ErrDeadlineExceeded", what, err)
		}
	}
	recv(t, ready, "the deadline cleared")
	c.mustData(1, true, []byte("xyz"))
	if err := recv(t, errs, "the body"); err != nil {
		t.Errorf("after clearing the deadline: %v", err)
	}
	if hdr, _, _ := c.response(1); statusOf(hdr) != "200" {
		t.Errorf("response %v", hdr)
	}
}

// SetWriteDeadline in the past resets the stream (the client sees
// RST_STREAM) and wakes a Write blocked on a zero window with an error.
func TestWriteDeadlineResetsStream(t *testing.T) {
	type result struct {
		n         int
		err, err2 error
	}
	results := make(chan result, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		go func() {
			time.Sleep(20 * time.Millisecond) // most likely blocked in Write by now; either way it must fail
			_ = rc.SetWriteDeadline(time.Now().Add(-time.Second))
		}()
		n, err := w.Write(make([]byte, 64<<10))
		_, err2 := io.WriteString(w, "more")
		results <- result{n, err, err2}
	})})
	c := dial(t, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	c.mustHeaders(1, true, get("/")...)
	res := recv(t, results, "the handler's Write")
	if !errors.Is(res.err, os.ErrDeadlineExceeded) || res.n != 0 {
		t.Errorf("blocked Write returned %d, %v; want 0, os.ErrDeadlineExceeded", res.n, res.err)
	}
	if res.err2 == nil {
		t.Errorf("Write after the reset succeeded")
	}
	if _, _, last := c.response(1); last.Type != http2.FrameRSTStream {
		t.Errorf("stream ended with %v, want RST_STREAM", last)
	}
}
