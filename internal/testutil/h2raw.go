package testutil

import (
	"bytes"
	"io"
	"net"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// H2Raw is a bare HTTP/2 client connection for tests that must control
// every frame: windows never opened, pseudo-headers the Go clients refuse
// to send (:protocol, :scheme http through a proxy), floods, resets.
type H2Raw struct {
	Conn   net.Conn
	Framer *http2.Framer
	enc    *hpack.Encoder
	buf    bytes.Buffer
}

// NewH2Raw sends the client preface and a SETTINGS frame with settings on
// c, a connection that negotiated h2.
func NewH2Raw(t testing.TB, c net.Conn, settings ...http2.Setting) *H2Raw {
	t.Helper()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatalf("writing the HTTP/2 preface: %v", err)
	}
	h := &H2Raw{Conn: c, Framer: http2.NewFramer(c, c)}
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
