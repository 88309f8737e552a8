package h2srv

import (
	"bytes"
	"encoding/binary"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/net/http2"
)

// handlerCount counts running handlers and remembers the most at once.
type handlerCount struct{ running, max, calls atomic.Int32 }

func (h *handlerCount) enter() {
	h.calls.Add(1)
	n := h.running.Add(1)
	for m := h.max.Load(); n > m && !h.max.CompareAndSwap(m, n); m = h.max.Load() {
	}
}

func (h *handlerCount) leave() { h.running.Add(-1) }

// MaxConcurrentStreams: a stream over the limit is refused; once a handler
// returns, a new stream is served.
func TestMaxConcurrentStreams(t *testing.T) {
	var hc handlerCount
	gates := map[string]*gate{"/a": newGate(), "/b": newGate(), "/c": newGate(), "/d": newGate()}
	for _, g := range gates {
		t.Cleanup(g.open)
	}
	_, addr := newServer(t, Config{MaxConcurrentStreams: 2, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hc.enter()
		defer hc.leave()
		gates[r.URL.Path].wait(r)
	})})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/a")...)
	c.mustHeaders(3, true, get("/b")...)
	recv(t, gates["/a"].started, "handler a")
	recv(t, gates["/b"].started, "handler b")
	c.mustHeaders(5, true, get("/c")...)
	if f, _ := c.until(func(f frame) bool { return f.Stream == 5 }); f.Type != http2.FrameRSTStream || f.Code != http2.ErrCodeRefusedStream {
		t.Fatalf("third stream: %v, want RST_STREAM REFUSED_STREAM", f)
	}
	gates["/a"].open()
	if hdr, _, _ := c.response(1); statusOf(hdr) != "200" {
		t.Fatalf("stream 1: %v", hdr)
	}
	c.mustHeaders(7, true, get("/d")...)
	recv(t, gates["/d"].started, "handler d")
	gates["/b"].open()
	gates["/d"].open()
	for _, id := range []uint32{3, 7} {
		if hdr, _, _ := c.response(id); statusOf(hdr) != "200" {
			t.Errorf("stream %d: %v", id, hdr)
		}
	}
	if hc.calls.Load() != 3 || hc.max.Load() > 2 {
		t.Errorf("%d handler calls, at most %d at once; want 3, ≤ 2", hc.calls.Load(), hc.max.Load())
	}
}

// A header list over MaxHeaderBytes gets 431 on its stream without a
// handler (RFC 9113 §10.5.1); the next stream on the connection works.
func TestHeaderListTooLarge(t *testing.T) {
	var hc handlerCount
	_, addr := newServer(t, Config{MaxHeaderBytes: 4096, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hc.enter()
		hc.leave()
	})})
	c := dial(t, addr)
	v := strings.Repeat("v", 1500)
	c.mustHeaders(1, true, get("/", "x-a", v, "x-b", v, "x-c", v)...)
	f, _ := c.until(func(f frame) bool { return f.Stream == 1 })
	if f.Type != http2.FrameHeaders || statusOf(f) != "431" || !f.endStream() {
		t.Errorf("header list too large: %v, want HEADERS 431 with END_STREAM", f)
	}
	if n := hc.calls.Load(); n != 0 {
		t.Errorf("handler called %d times", n)
	}
	c.mustHeaders(3, true, get("/", "x-a", "small")...)
	if hdr, _, _ := c.response(3); statusOf(hdr) != "200" || hc.calls.Load() != 1 {
		t.Errorf("next stream: %v", hdr)
	}
}

// flood sends frames in batches, each written as one TLS record and
// followed by a marking PING, and waits for the PING's ACK before the next
// batch, until the server sends GOAWAY. Sent so, the server never closes
// with our bytes unread in its socket, which would make the kernel reset
// the connection and could destroy the GOAWAY on its way (see
// TestGoAwayReachesAFloodingClient). It returns the GOAWAY and the frames
// sent, the marking PINGs included (they are charged too).
func flood(t *testing.T, c *client, batch func(fr *http2.Framer) (int, error)) (frame, int) {
	t.Helper()
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	sent := 0
	for b := 0; sent < 100000; b++ {
		buf.Reset()
		n, err := batch(fr)
		if err != nil {
			t.Fatal(err)
		}
		sent += n
		var mark [8]byte
		binary.BigEndian.PutUint64(mark[:], uint64(b)|1<<63)
		_ = fr.WritePing(false, mark)
		sent++
		if _, err := c.Conn.Write(buf.Bytes()); err != nil {
			t.Fatalf("connection broken after %d frames, no GOAWAY: %v", sent, err)
		}
		for {
			f, err := c.read()
			if err != nil {
				t.Fatalf("connection ended after %d frames, no GOAWAY: %v", sent, err)
			}
			if f.Type == http2.FrameGoAway {
				return f, sent
			}
			if f.Type == http2.FramePing && f.Flags.Has(http2.FlagPingAck) && bytes.Equal(f.Data, mark[:]) {
				break
			}
		}
	}
	t.Fatalf("no GOAWAY after %d frames", sent)
	panic("unreachable")
}

// Rapid reset (CVE-2023-44487): HEADERS + RST_STREAM pairs end with GOAWAY
// ENHANCE_YOUR_CALM, and the handlers running never exceed
// MaxConcurrentStreams.
func TestRapidReset(t *testing.T) {
	var hc handlerCount
	const maxStreams = 8
	_, addr := newServer(t, Config{MaxConcurrentStreams: maxStreams, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hc.enter()
		defer hc.leave()
		<-r.Context().Done()
	})})
	c := dial(t, addr)
	fields := get("/")
	pairs := 0
	ga, n := flood(t, c, func(fr *http2.Framer) (int, error) {
		for range 8 {
			id := uint32(2*pairs + 1)
			pairs++
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block(fields...), EndHeaders: true, EndStream: true}); err != nil {
				return 0, err
			}
			if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
				return 0, err
			}
		}
		return 16, nil
	})
	t.Logf("rapid reset: %v after %d HEADERS+RST_STREAM pairs (%d frames with the PINGs); %d handlers ran, at most %d at once",
		ga, pairs, n, hc.calls.Load(), hc.max.Load())
	if ga.Code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("got GOAWAY %v, want ENHANCE_YOUR_CALM", ga)
	}
	if m := hc.max.Load(); m > maxStreams {
		t.Errorf("%d handlers at once, over MaxConcurrentStreams %d", m, maxStreams)
	}
}

// PING and SETTINGS floods end with GOAWAY ENHANCE_YOUR_CALM after about
// budgetCap frames (the budget refills with time, so a few more pass).
func TestControlFrameFloods(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler)})
	for _, tc := range []struct {
		name  string
		write func(fr *http2.Framer, i int) error
	}{
		{"PING", func(fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i >> 8), byte(i)}) }},
		{"SETTINGS", func(fr *http2.Framer, i int) error { return fr.WriteSettings() }},
		{"WINDOW_UPDATE of 1 byte", func(fr *http2.Framer, i int) error { return fr.WriteWindowUpdate(0, 1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, addr)
			ga, n := flood(t, c, func(fr *http2.Framer) (int, error) {
				for i := range 16 {
					if err := tc.write(fr, i); err != nil {
						return 0, err
					}
				}
				return 16, nil
			})
			t.Logf("%s flood: %v after %d frames", tc.name, ga, n)
			if ga.Code != http2.ErrCodeEnhanceYourCalm {
				t.Errorf("got %v, want GOAWAY ENHANCE_YOUR_CALM", ga)
			}
			if n < budgetCap {
				t.Errorf("GOAWAY after %d frames, fewer than the budget (%d)", n, budgetCap)
			}
		})
	}
}

// A client reading a download 4 KiB at a time sends a stream and a
// connection WINDOW_UPDATE for each read (x/net's client does, in bursts
// of hundreds when it drains its buffer): several budgets' worth of them
// cost nothing, and the connection goes on.
func TestReadingClientsWindowUpdatesAreFree(t *testing.T) {
	g := newGate()
	t.Cleanup(g.open)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { g.wait(r) })})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/")...)
	recv(t, g.started, "the handler")
	sent := 0
	for b := 0; sent < 3*budgetCap; b++ {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		for range 50 {
			_ = fr.WriteWindowUpdate(1, 4096)
			_ = fr.WriteWindowUpdate(0, 4096)
			sent += 2
		}
		var mark [8]byte
		binary.BigEndian.PutUint64(mark[:], uint64(b)|1<<63)
		_ = fr.WritePing(false, mark)
		if _, err := c.Conn.Write(buf.Bytes()); err != nil {
			t.Fatal(err)
		}
		for {
			f, err := c.read()
			if err != nil || f.Type == http2.FrameGoAway {
				t.Fatalf("after %d WINDOW_UPDATEs of 4 KiB: %v %v", sent, f, err)
			}
			if f.Type == http2.FramePing && f.Flags.Has(http2.FlagPingAck) && bytes.Equal(f.Data, mark[:]) {
				break
			}
		}
	}
	g.open()
	if hdr, _, _ := c.response(1); statusOf(hdr) != "200" {
		t.Errorf("the stream after %d WINDOW_UPDATEs: %v", sent, hdr)
	}
}

// A client that keeps sending after the server's GOAWAY still gets it: the
// server must not close with the client's bytes unread in its socket, or
// the kernel answers with a reset that can destroy the GOAWAY (and the
// acknowledgements before it) still in the server's send queue.
func TestGoAwayReachesAFloodingClient(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler)})
	for range 20 {
		c := dial(t, addr)
		// PINGs without reading until the server stops taking them.
		for n := 0; n < 1<<20; n++ {
			if c.Framer.WritePing(false, [8]byte{}) != nil {
				break
			}
		}
		var ga *frame
		for {
			f, err := c.read()
			if err != nil {
				break
			}
			if f.Type == http2.FrameGoAway {
				ga = &f
			}
		}
		if ga == nil || ga.Code != http2.ErrCodeEnhanceYourCalm {
			t.Fatalf("got GOAWAY %v, want ENHANCE_YOUR_CALM", ga)
		}
		c.Conn.Close()
	}
}
