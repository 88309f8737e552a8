package testutil

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// H2Raw is a bare HTTP/2 client connection for tests that must control
// every frame: windows never opened, pseudo-headers the Go clients refuse
// to send (:protocol, :scheme http through a proxy), floods, resets. Tests
// may drive Framer themselves, or use Open and H2Stream, which read frames
// for them. It is not safe for concurrent use.
type H2Raw struct {
	Conn   net.Conn
	Framer *http2.Framer
	enc    *hpack.Encoder
	buf    bytes.Buffer

	// State kept by the helpers that read (readFrame).
	dec      *hpack.Decoder // HPACK state is per connection: every block is decoded
	block    []byte         // header block being assembled from CONTINUATIONs
	settings map[http2.SettingID]uint32
	streams  map[uint32]*H2Stream
	nextID   uint32
	connErr  error // GOAWAY or a read error: every stream fails with it
}

// NewH2Raw sends the client preface and a SETTINGS frame with settings on
// c, a connection that negotiated h2.
func NewH2Raw(t testing.TB, c net.Conn, settings ...http2.Setting) *H2Raw {
	t.Helper()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatalf("writing the HTTP/2 preface: %v", err)
	}
	h := &H2Raw{
		Conn:    c,
		Framer:  http2.NewFramer(c, c),
		dec:     hpack.NewDecoder(4096, nil),
		streams: map[uint32]*H2Stream{},
		nextID:  1,
	}
	h.enc = hpack.NewEncoder(&h.buf)
	if err := h.Framer.WriteSettings(settings...); err != nil {
		t.Fatalf("writing SETTINGS: %v", err)
	}
	return h
}

// Headers sends one HEADERS frame on stream id carrying fields, given as
// name, value pairs in order (pseudo-headers first, as RFC 9113 wants).
func (h *H2Raw) Headers(t testing.TB, id uint32, endStream bool, fields ...string) {
	t.Helper()
	h.buf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		_ = h.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := h.Framer.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.buf.Bytes(), EndHeaders: true, EndStream: endStream}); err != nil {
		t.Fatalf("writing HEADERS: %v", err)
	}
}

// ServerSettings reads frames until the server's first SETTINGS frame has
// arrived (at once if it already has) and returns its values.
func (h *H2Raw) ServerSettings(t testing.TB) map[http2.SettingID]uint32 {
	t.Helper()
	for h.settings == nil {
		if err := h.readFrame(); err != nil {
			t.Fatalf("waiting for the server's SETTINGS: %v", err)
		}
	}
	return h.settings
}

// Open starts a request on the next client stream with one HEADERS frame
// (see Headers).
func (h *H2Raw) Open(t testing.TB, endStream bool, fields ...string) *H2Stream {
	t.Helper()
	s := &H2Stream{h: h, ID: h.nextID, wroteEnd: endStream}
	h.nextID += 2
	h.streams[s.ID] = s
	h.Headers(t, s.ID, endStream, fields...)
	return s
}

// readFrame reads one frame and does what a client must for it: ACK the
// server's SETTINGS, answer PING, decode header blocks, give back at once
// the flow-control credit of DATA (buffering without bound, which is fine
// for tests), and file responses, DATA, END_STREAM and RST_STREAM under
// their stream. Frames of streams not opened with Open are dropped.
func (h *H2Raw) readFrame() error {
	if h.connErr != nil {
		return h.connErr
	}
	f, err := h.Framer.ReadFrame()
	if err != nil {
		h.connErr = err
		return err
	}
	s := h.streams[f.Header().StreamID]
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if h.settings == nil {
			h.settings = map[http2.SettingID]uint32{}
		}
		_ = f.ForeachSetting(func(st http2.Setting) error { h.settings[st.ID] = st.Val; return nil })
		return h.Framer.WriteSettingsAck()
	case *http2.PingFrame:
		if !f.IsAck() {
			return h.Framer.WritePing(true, f.Data)
		}
	case *http2.GoAwayFrame:
		h.connErr = fmt.Errorf("GOAWAY %v after stream %d", f.ErrCode, f.LastStreamID)
		return h.connErr
	case *http2.HeadersFrame:
		h.block = append(h.block[:0], f.HeaderBlockFragment()...)
		if f.HeadersEnded() {
			return h.headers(s, f.StreamEnded())
		}
	case *http2.ContinuationFrame:
		h.block = append(h.block, f.HeaderBlockFragment()...)
		if f.HeadersEnded() {
			return h.headers(s, false) // END_STREAM rode on the HEADERS frame
		}
	case *http2.DataFrame:
		if n := f.Header().Length; n > 0 { // padding included, as flow control counts it
			if err := h.Framer.WriteWindowUpdate(0, n); err != nil {
				return err
			}
			if s != nil && !f.StreamEnded() {
				if err := h.Framer.WriteWindowUpdate(s.ID, n); err != nil {
					return err
				}
			}
		}
		if s != nil {
			s.data = append(s.data, f.Data()...)
			if f.StreamEnded() {
				s.err = io.EOF
			}
		}
	case *http2.RSTStreamFrame:
		if s != nil {
			s.err = fmt.Errorf("stream %d reset by the server: %v", s.ID, f.ErrCode)
			s.reset = true
		}
	}
	return nil
}

// headers decodes the block just completed and files it under s: the
// first final (non-1xx) one is the response, any later one the trailers.
func (h *H2Raw) headers(s *H2Stream, endStream bool) error {
	fields, err := h.dec.DecodeFull(h.block)
	if err != nil {
		h.connErr = fmt.Errorf("decoding a header block: %w", err)
		return h.connErr
	}
	if s == nil {
		return nil
	}
	if s.header == nil {
		hdr := http.Header{}
		status := 0
		for _, f := range fields {
			if f.Name == ":status" {
				status, _ = strconv.Atoi(f.Value)
			} else if f.Name[0] != ':' {
				hdr.Add(http.CanonicalHeaderKey(f.Name), f.Value)
			}
		}
		if status >= 100 && status < 200 {
			return nil // informational: the response is still to come
		}
		s.status, s.header = status, hdr
	}
	if endStream {
		s.err = io.EOF
	}
	return nil
}

// H2Stream is a stream started with Open, seen the way Go's client shows
// one: Read returns its DATA (io.EOF after END_STREAM), Write sends DATA,
// CloseWrite ends the upload, Close resets a stream not yet over.
type H2Stream struct {
	ID uint32
	h  *H2Raw

	status   int
	header   http.Header // nil until the response arrived
	data     []byte      // DATA received and not yet read
	err      error       // io.EOF after END_STREAM, or the reset
	reset    bool        // a RST_STREAM went either way
	wroteEnd bool        // END_STREAM sent
}

// Response reads frames until the stream's response has arrived and
// returns it, with the stream as its Body.
func (s *H2Stream) Response(t testing.TB) *http.Response {
	t.Helper()
	for s.header == nil {
		if s.err != nil {
			t.Fatalf("stream %d ended before its response: %v", s.ID, s.err)
		}
		if err := s.h.readFrame(); err != nil {
			t.Fatalf("reading the response on stream %d: %v", s.ID, err)
		}
	}
	return &http.Response{
		Status:     strconv.Itoa(s.status) + " " + http.StatusText(s.status),
		StatusCode: s.status,
		Proto:      "HTTP/2.0",
		ProtoMajor: 2,
		Header:     s.header,
		Body:       s,
	}
}

// Read returns the stream's DATA as it arrives.
func (s *H2Stream) Read(p []byte) (int, error) {
	for len(s.data) == 0 && s.err == nil {
		if err := s.h.readFrame(); err != nil {
			return 0, err
		}
	}
	if len(s.data) == 0 {
		return 0, s.err
	}
	n := copy(p, s.data)
	s.data = s.data[n:]
	return n, nil
}

// Write sends p as DATA frames of at most the minimum SETTINGS_MAX_FRAME_SIZE.
// It does not wait for window: tests send less than the server's initial
// windows.
func (s *H2Stream) Write(p []byte) (int, error) {
	if s.wroteEnd || s.reset {
		return 0, errors.New("write on a stream whose upload is over")
	}
	const maxFrame = 16384
	for n := 0; n < len(p); {
		end := min(n+maxFrame, len(p))
		if err := s.h.Framer.WriteData(s.ID, false, p[n:end]); err != nil {
			return n, err
		}
		n = end
	}
	return len(p), nil
}

// CloseWrite sends END_STREAM (an empty DATA frame) unless it was sent.
func (s *H2Stream) CloseWrite() error {
	if s.wroteEnd || s.reset {
		return nil
	}
	s.wroteEnd = true
	return s.h.Framer.WriteData(s.ID, true, nil)
}

// Close resets the stream (RST_STREAM CANCEL) unless it is over both
// ways, as closing a response body early does in Go's client.
func (s *H2Stream) Close() error {
	if s.reset || (s.wroteEnd && s.err == io.EOF) {
		return nil
	}
	s.reset = true
	if s.err == nil {
		s.err = errors.New("stream closed")
	}
	return s.h.Framer.WriteRSTStream(s.ID, http2.ErrCodeCancel)
}
