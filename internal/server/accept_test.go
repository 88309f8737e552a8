package server

import (
	"strings"
	"testing"
)

// The watch sees a head with both fields however the bytes are split
// across reads, in any letter case, and only at the end of the head.
func TestH1ConnWatchesFraming(t *testing.T) {
	ambiguous := "POST http://o/ HTTP/1.1\r\nHost: o\r\ncontent-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
	for _, c := range []struct {
		name, stream string
		want         bool
	}{
		{"both fields", ambiguous, true},
		{"chunked only", "POST / HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false},
		{"length only", "POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5\r\n\r\nhello", false},
		{"two heads, one field each", "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false},
		{"bare LF lines", "POST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n", true},
		{"field names only as values", "GET / HTTP/1.1\r\nX-A: content-length: 1\r\nX-B: transfer-encoding: x\r\n\r\n", false},
		{"head not finished", "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", false},
	} {
		for split := 1; split <= len(c.stream); split++ {
			h := &h1Conn{}
			for i := 0; i < len(c.stream); i += split {
				h.scan([]byte(c.stream[i:min(i+split, len(c.stream))]))
			}
			if got := h.ambiguous.Load(); got != c.want {
				t.Fatalf("%s, read %d bytes at a time: ambiguous = %v, want %v", c.name, split, got, c.want)
			}
		}
	}
	// A long line keeps only its start; the field name still counts.
	h := &h1Conn{}
	h.scan([]byte("POST / HTTP/1.1\r\nTransfer-Encoding: chunked" + strings.Repeat(" ", 1000) + "\r\nContent-Length: 5\r\n\r\n"))
	if !h.ambiguous.Load() {
		t.Fatal("a long Transfer-Encoding line was missed")
	}
}

func BenchmarkH1ConnScan(b *testing.B) {
	body := []byte(strings.Repeat("some body text of a forwarded upload\n", 1000))
	h := &h1Conn{}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		h.scan(body)
	}
}
