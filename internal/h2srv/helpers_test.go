package h2srv

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// failsafe bounds every wait in these tests. It is not a performance
// limit: it only keeps a broken engine from hanging the test binary.
const failsafe = 20 * time.Second

// newServer is testServer plus the leak check every test of the engine
// ends with: once the test's connections are closed, the goroutines go
// back to what they were before the server started, no connection is
// left, and the node budget is all given back.
func newServer(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	base := runtime.NumGoroutine()
	var srv *Server
	// Registered first, so it runs after the cleanups of testServer and
	// of the clients (cleanups run last registered first).
	t.Cleanup(func() { checkQuiet(t, srv, base) })
	srv, addr := testServer(t, cfg)
	return srv, addr
}

func checkQuiet(t *testing.T, s *Server, base int) {
	t.Helper()
	if s == nil {
		return
	}
	deadline := time.Now().Add(failsafe)
	for {
		n := runtime.NumGoroutine()
		conns, inUse := s.Conns(), s.BudgetInUse()
		if n <= base && conns == 0 && inUse == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after the test: %d goroutines (baseline %d), %d connections, budget in use %d\n%s",
				n, base, conns, inUse, goroutines())
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitFor polls cond until it holds, failing the test after failsafe.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(failsafe)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// recv takes one value from ch, failing the test after failsafe.
func recv[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(failsafe):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func dialH2(t testing.TB, addr string) *http2.ClientConn {
	t.Helper()
	tc, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		tc.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// newRawOn is a rawConn on tc that has sent nothing yet.
func newRawOn(t testing.TB, tc net.Conn, fr *http2.Framer) *rawConn {
	r := &rawConn{H2Raw: &testutil.H2Raw{Conn: tc, Framer: fr}, t: t}
	r.dec = hpack.NewDecoder(4096, func(f hpack.HeaderField) { r.seen = append(r.seen, f) })
	return r
}

func dialTLS(t testing.TB, addr string) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(failsafe))
	return c
}

// client is a raw HTTP/2 connection with an HPACK encoder of its own (so
// header blocks can be built for frames written elsewhere, and write
// errors reported) and a reader that copies what it reads.
type client struct {
	*rawConn
	enc  *hpack.Encoder
	ebuf bytes.Buffer
	ping uint64
	// stash holds frames response read for other streams; until takes
	// them before reading more.
	stash []frame
}

func dial(t testing.TB, addr string, settings ...http2.Setting) *client {
	t.Helper()
	c := &client{rawConn: dialRaw(t, addr, settings...)}
	c.enc = hpack.NewEncoder(&c.ebuf)
	_ = c.Conn.SetDeadline(time.Now().Add(failsafe))
	return c
}

// block HPACK-encodes name, value pairs.
func (c *client) block(fields ...string) []byte {
	c.ebuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		_ = c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return bytes.Clone(c.ebuf.Bytes())
}

func (c *client) headers(id uint32, end bool, fields ...string) error {
	return c.Framer.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block(fields...), EndHeaders: true, EndStream: end})
}

func (c *client) mustHeaders(id uint32, end bool, fields ...string) {
	c.t.Helper()
	if err := c.headers(id, end, fields...); err != nil {
		c.t.Fatalf("writing HEADERS: %v", err)
	}
}

func (c *client) mustData(id uint32, end bool, p []byte) {
	c.t.Helper()
	if err := c.Framer.WriteData(id, end, p); err != nil {
		c.t.Fatalf("writing DATA: %v", err)
	}
}

// get is the fields of a GET of path.
func get(path string, extra ...string) []string {
	return append([]string{":method", "GET", ":scheme", "https", ":path", path, ":authority", "example.com"}, extra...)
}

// post is the fields of a POST to path.
func post(path string, extra ...string) []string {
	return append([]string{":method", "POST", ":scheme", "https", ":path", path, ":authority", "example.com"}, extra...)
}

// frame is a copy of a frame read, valid after the next read.
type frame struct {
	Type     http2.FrameType
	Stream   uint32
	Flags    http2.Flags
	Data     []byte              // DATA payload, PING data, GOAWAY debug data
	Code     http2.ErrCode       // RST_STREAM, GOAWAY
	LastID   uint32              // GOAWAY
	Incr     uint32              // WINDOW_UPDATE
	Fields   []hpack.HeaderField // HEADERS
	Settings []http2.Setting
}

func (f frame) String() string {
	switch f.Type {
	case http2.FrameHeaders:
		return fmt.Sprintf("HEADERS stream=%d flags=%v %v", f.Stream, f.Flags, f.Fields)
	case http2.FrameData:
		return fmt.Sprintf("DATA stream=%d flags=%v len=%d", f.Stream, f.Flags, len(f.Data))
	case http2.FrameRSTStream:
		return fmt.Sprintf("RST_STREAM stream=%d %v", f.Stream, f.Code)
	case http2.FrameGoAway:
		return fmt.Sprintf("GOAWAY last=%d %v %q", f.LastID, f.Code, f.Data)
	case http2.FrameWindowUpdate:
		return fmt.Sprintf("WINDOW_UPDATE stream=%d incr=%d", f.Stream, f.Incr)
	}
	return fmt.Sprintf("%v stream=%d flags=%v", f.Type, f.Stream, f.Flags)
}

func (f frame) endStream() bool {
	return (f.Type == http2.FrameHeaders || f.Type == http2.FrameData) && f.Flags.Has(http2.FlagHeadersEndStream)
}

// ends: the frame is the last the server sends on stream id.
func (f frame) ends(id uint32) bool {
	return f.Stream == id && (f.endStream() || f.Type == http2.FrameRSTStream)
}

func (f frame) field(name string) string {
	for _, hf := range f.Fields {
		if hf.Name == name {
			return hf.Value
		}
	}
	return ""
}

func (f frame) has(name string) bool {
	for _, hf := range f.Fields {
		if hf.Name == name {
			return true
		}
	}
	return false
}

// read reads one frame; HEADERS and CONTINUATION feed the HPACK decoder
// (every header block must, to keep its table in step).
func (c *client) read() (frame, error) {
	f, err := c.Framer.ReadFrame()
	if err != nil {
		return frame{}, err
	}
	out := frame{Type: f.Header().Type, Stream: f.Header().StreamID, Flags: f.Header().Flags}
	switch f := f.(type) {
	case *http2.HeadersFrame:
		c.seen = c.seen[:0]
		if _, err := c.dec.Write(f.HeaderBlockFragment()); err != nil {
			return out, err
		}
		out.Fields = append([]hpack.HeaderField(nil), c.seen...)
	case *http2.ContinuationFrame:
		if _, err := c.dec.Write(f.HeaderBlockFragment()); err != nil {
			return out, err
		}
		out.Fields = append([]hpack.HeaderField(nil), c.seen...)
	case *http2.DataFrame:
		out.Data = bytes.Clone(f.Data())
	case *http2.RSTStreamFrame:
		out.Code = f.ErrCode
	case *http2.GoAwayFrame:
		out.Code, out.LastID, out.Data = f.ErrCode, f.LastStreamID, bytes.Clone(f.DebugData())
	case *http2.WindowUpdateFrame:
		out.Incr = f.Increment
	case *http2.PingFrame:
		out.Data = bytes.Clone(f.Data[:])
	case *http2.SettingsFrame:
		_ = f.ForeachSetting(func(s http2.Setting) error { out.Settings = append(out.Settings, s); return nil })
	}
	return out, nil
}

// until reads frames until one satisfies keep and returns it and all
// frames read before it.
func (c *client) until(keep func(frame) bool) (frame, []frame) {
	c.t.Helper()
	var before []frame
	for {
		var f frame
		var err error
		if len(c.stash) > 0 {
			f, c.stash = c.stash[0], c.stash[1:]
		} else {
			f, err = c.read()
		}
		if err != nil {
			c.t.Fatalf("reading a frame (after %v): %v", before, err)
		}
		if keep(f) {
			return f, before
		}
		before = append(before, f)
	}
}

// response reads stream id to its end and returns its final HEADERS, the
// body, and the last frame (END_STREAM or RST_STREAM); frames of other
// streams are kept for later.
func (c *client) response(id uint32) (hdr frame, body []byte, last frame) {
	c.t.Helper()
	var others []frame
	defer func() { c.stash = append(others, c.stash...) }()
	return collectResponse(id, func() frame {
		f, before := c.until(func(f frame) bool { return f.Stream == id })
		others = append(others, before...)
		return f
	})
}

// collectResponse takes stream id's frames from next until the stream
// ends: its final HEADERS, its body, and the last frame.
func collectResponse(id uint32, next func() frame) (hdr frame, body []byte, last frame) {
	for {
		f := next()
		switch f.Type {
		case http2.FrameHeaders:
			if st := f.field(":status"); st != "" && st[0] != '1' {
				hdr = f
			}
		case http2.FrameData:
			body = append(body, f.Data...)
		}
		if f.ends(id) {
			return hdr, body, f
		}
	}
}

// closed reads until the connection ends and returns the GOAWAY seen on
// the way, if any; the connection must end by the server's doing, not by
// the test's failsafe deadline.
func (c *client) closed() *frame {
	c.t.Helper()
	var ga *frame
	for {
		f, err := c.read()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.t.Fatalf("the connection did not close (GOAWAY seen: %v)", ga)
			}
			return ga
		}
		if f.Type == http2.FrameGoAway {
			ga = &f
		}
	}
}

// barrier makes sure the server has acted on every frame sent before it:
// it returns the frames read until two PINGs sent one after the other are
// acknowledged. (One is not enough: the writer puts control frames before
// stream frames in a flush, so the first ACK may precede DATA that became
// sendable before it; the second ACK comes after that flush.)
func (c *client) barrier() []frame {
	c.t.Helper()
	var seen []frame
	for range 2 {
		c.ping++
		var data [8]byte
		copy(data[:], fmt.Sprintf("b%07d", c.ping))
		if err := c.Framer.WritePing(false, data); err != nil {
			c.t.Fatalf("writing PING: %v", err)
		}
		_, before := c.until(func(f frame) bool {
			return f.Type == http2.FramePing && f.Flags.Has(http2.FlagPingAck) && bytes.Equal(f.Data, data[:])
		})
		seen = append(seen, before...)
	}
	return seen
}

func onStream(fs []frame, id uint32, t http2.FrameType) []frame {
	var out []frame
	for _, f := range fs {
		if f.Stream == id && f.Type == t {
			out = append(out, f)
		}
	}
	return out
}

func isGoAway(f frame) bool { return f.Type == http2.FrameGoAway }

func isRST(id uint32) func(frame) bool {
	return func(f frame) bool { return f.Type == http2.FrameRSTStream && f.Stream == id }
}

// gate lets a test hold handlers and release them.
type gate struct {
	mu      sync.Mutex
	ch      chan struct{}
	started chan string
}

func newGate() *gate { return &gate{ch: make(chan struct{}), started: make(chan string, 1000)} }

// wait is called by a handler: it reports path and blocks until open (or
// the request's context ends).
func (g *gate) wait(r *http.Request) {
	g.started <- r.URL.Path
	select {
	case <-g.ch:
	case <-r.Context().Done():
	}
}

func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.ch:
	default:
		close(g.ch)
	}
}

func statusOf(f frame) string { return f.field(":status") }
