package h2srv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

func okHandler(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }

// A DATA frame as large as the SETTINGS_MAX_FRAME_SIZE we advertise (one
// TLS record of a tunnelled connection, with its overhead) is taken whole;
// one byte more is a FRAME_SIZE_ERROR for the connection (RFC 9113 §4.2).
func TestMaxReadFrame(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body) // the second stream's fails with the connection
		_, _ = fmt.Fprint(w, len(b))
	})})
	c := dial(t, addr)
	c.mustHeaders(1, false, post("/")...)
	c.mustData(1, true, make([]byte, maxReadFrame))
	if hdr, body, _ := c.response(1); statusOf(hdr) != "200" || string(body) != strconv.Itoa(maxReadFrame) {
		t.Fatalf("a %d-byte DATA frame: %v %q", maxReadFrame, hdr, body)
	}
	c.mustHeaders(3, false, post("/")...)
	c.mustData(3, true, make([]byte, maxReadFrame+1))
	f, _ := c.until(isGoAway)
	if f.Code != http2.ErrCodeFrameSize {
		t.Fatalf("a DATA frame over the limit: GOAWAY %v, want FRAME_SIZE_ERROR", f.Code)
	}
}

// Our SETTINGS come first, with the limits the config sets; the client's
// SETTINGS are acknowledged and the connection window is opened.
func TestPrefaceAndSettings(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler),
		MaxConcurrentStreams: 7, MaxHeaderBytes: 9000, StreamWindow: 200000, ConnWindow: 300000})
	c := dial(t, addr, http2.Setting{ID: http2.SettingMaxFrameSize, Val: 20000})
	first, err := c.read()
	if err != nil {
		t.Fatal(err)
	}
	if first.Type != http2.FrameSettings || first.Flags.Has(http2.FlagSettingsAck) {
		t.Fatalf("first frame %v, want our SETTINGS", first)
	}
	want := map[http2.SettingID]uint32{
		http2.SettingMaxConcurrentStreams:  7,
		http2.SettingInitialWindowSize:     200000,
		http2.SettingMaxHeaderListSize:     9000,
		http2.SettingMaxFrameSize:          maxReadFrame,
		http2.SettingEnableConnectProtocol: 1,
		settingNoRFC7540Priorities:         1,
	}
	got := map[http2.SettingID]uint32{}
	for _, s := range first.Settings {
		got[s.ID] = s.Val
	}
	for id, v := range want {
		if got[id] != v {
			t.Errorf("SETTINGS %v = %d, want %d (all: %v)", id, got[id], v, first.Settings)
		}
	}
	var connWU uint32
	_, before := c.until(func(f frame) bool { return f.Type == http2.FrameSettings && f.Flags.Has(http2.FlagSettingsAck) })
	for _, f := range append(before, c.barrier()...) {
		if f.Type == http2.FrameWindowUpdate && f.Stream == 0 {
			connWU += f.Incr
		}
	}
	if connWU != 300000-65535 {
		t.Errorf("connection WINDOW_UPDATE %d, want %d", connWU, 300000-65535)
	}
	c.mustHeaders(1, true, get("/")...)
	if hdr, body, _ := c.response(1); statusOf(hdr) != "200" || string(body) != "ok" {
		t.Errorf("GET after the handshake: %v %q", hdr, body)
	}
}

// A connection that does not start with the client preface and SETTINGS
// gets GOAWAY PROTOCOL_ERROR and is closed.
func TestBadPreface(t *testing.T) {
	calls := atomic.Int32{}
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) })})
	for _, tc := range []struct {
		name  string
		write func(fr *http2.Framer, w io.Writer) error
	}{
		{"garbage", func(fr *http2.Framer, w io.Writer) error {
			_, err := io.WriteString(w, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			return err
		}},
		{"ping first", func(fr *http2.Framer, w io.Writer) error {
			_, _ = io.WriteString(w, http2.ClientPreface)
			return fr.WritePing(false, [8]byte{})
		}},
		{"settings ack first", func(fr *http2.Framer, w io.Writer) error {
			_, _ = io.WriteString(w, http2.ClientPreface)
			return fr.WriteSettingsAck()
		}},
		{"headers first", func(fr *http2.Framer, w io.Writer) error {
			_, _ = io.WriteString(w, http2.ClientPreface)
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: true, EndStream: true})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc2 := dialTLS(t, addr)
			fr := http2.NewFramer(tc2, tc2)
			c := &client{rawConn: newRawOn(t, tc2, fr)}
			if err := tc.write(fr, tc2); err != nil {
				t.Fatal(err)
			}
			ga := c.closed()
			if ga == nil || ga.Code != http2.ErrCodeProtocol {
				t.Errorf("got GOAWAY %v, want PROTOCOL_ERROR", ga)
			}
		})
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("handler called %d times", n)
	}
}

// A client that sends no preface is disconnected after HeaderReadTimeout.
func TestPrefaceTimeout(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler), HeaderReadTimeout: 200 * time.Millisecond})
	tc := dialTLS(t, addr)
	c := &client{rawConn: newRawOn(t, tc, http2.NewFramer(tc, tc))}
	if ga := c.closed(); ga == nil || ga.Code != http2.ErrCodeProtocol {
		t.Errorf("got GOAWAY %v, want PROTOCOL_ERROR before the close", ga)
	}
}

// IdleTimeout without a stream: GOAWAY NO_ERROR with the last stream
// served, then the connection closes.
func TestIdleTimeoutGoAway(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(okHandler), IdleTimeout: 300 * time.Millisecond})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/")...)
	if hdr, _, _ := c.response(1); statusOf(hdr) != "200" {
		t.Fatalf("GET: %v", hdr)
	}
	ga := c.closed()
	if ga == nil || ga.Code != http2.ErrCodeNo || ga.LastID != 1 {
		t.Errorf("got GOAWAY %v, want NO_ERROR with last stream 1", ga)
	}
}

// A header block left unfinished (HEADERS without END_HEADERS, no
// CONTINUATION) closes the connection after HeaderReadTimeout.
func TestHeaderReadTimeout(t *testing.T) {
	calls := atomic.Int32{}
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }),
		HeaderReadTimeout: 300 * time.Millisecond})
	c := dial(t, addr)
	c.barrier() // the preface's deadline is behind us
	if err := c.Framer.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: c.block(get("/")...), EndStream: true}); err != nil {
		t.Fatal(err)
	}
	if ga := c.closed(); ga == nil || ga.Code != http2.ErrCodeProtocol {
		t.Errorf("got GOAWAY %v, want PROTOCOL_ERROR before the close", ga)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("handler called %d times", n)
	}
}

// Shutdown: GOAWAY NO_ERROR with the last stream id, the open stream
// finishes, no new stream is served, new connections are refused, then
// the connection closes and Shutdown returns.
func TestShutdownDrains(t *testing.T) {
	g := newGate()
	t.Cleanup(g.open)
	calls := atomic.Int32{}
	s, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		g.wait(r)
		_, _ = io.WriteString(w, "done")
	})})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/slow")...)
	recv(t, g.started, "the handler")

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), failsafe)
		defer cancel()
		done <- s.Shutdown(ctx)
	}()
	ga, _ := c.until(isGoAway)
	if ga.Code != http2.ErrCodeNo || ga.LastID != 1 {
		t.Errorf("GOAWAY %v, want NO_ERROR last 1", ga)
	}
	// A stream the client opened after our GOAWAY is not served.
	c.mustHeaders(3, true, get("/late")...)
	c.barrier()

	// A new connection during the drain is refused with GOAWAY(0); the
	// server may close before our preface is written.
	tc2 := dialTLS(t, addr)
	c2 := &client{rawConn: newRawOn(t, tc2, http2.NewFramer(tc2, tc2))}
	_, _ = io.WriteString(tc2, http2.ClientPreface)
	_ = c2.Framer.WriteSettings()
	if ga2 := c2.closed(); ga2 == nil || ga2.LastID != 0 || ga2.Code != http2.ErrCodeNo {
		t.Errorf("new connection while draining: GOAWAY %v, want NO_ERROR last 0", ga2)
	}

	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) with a stream open", err)
	default:
	}
	g.open()
	hdr, body, last := c.response(1)
	if statusOf(hdr) != "200" || string(body) != "done" || !last.endStream() {
		t.Errorf("stream 1 after GOAWAY: %v %q %v", hdr, body, last)
	}
	c.closed()
	if err := recv(t, done, "Shutdown"); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("handler called %d times, want 1", n)
	}
}

// Close closes connections at once; a blocked handler's context is
// cancelled.
func TestCloseCancelsHandlers(t *testing.T) {
	causes := make(chan error, 1)
	started := make(chan struct{}, 1)
	s, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-r.Context().Done()
		causes <- context.Cause(r.Context())
	})})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/")...)
	recv(t, started, "the handler")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := recv(t, causes, "the handler's context"); !errors.Is(err, errServerClosed) {
		t.Errorf("context cause %v, want %v", err, errServerClosed)
	}
	c.closed()
}
