package server

import (
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
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

// FuzzH1ConnScan checks the line watcher against a plain reading of the
// same rules on the whole stream, however the stream is cut into reads.
func FuzzH1ConnScan(f *testing.F) {
	f.Add([]byte("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"), uint8(3))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nContent-length:1\r\n\r\nx"), uint8(1))
	f.Add([]byte("transfer-encoding: a\ncontent-length: b\n\n"), uint8(7))
	f.Add([]byte("\r\n\r\nContent-Length\r\nTransfer-Encoding:\r\n\r"), uint8(2))
	f.Fuzz(func(t *testing.T, stream []byte, cut uint8) {
		step := int(cut)%64 + 1
		h := &h1Conn{}
		for i := 0; i < len(stream); i += step {
			h.scan(stream[i:min(i+step, len(stream))])
		}
		if got, want := h.ambiguous.Load(), referenceAmbiguous(stream); got != want {
			t.Fatalf("ambiguous = %v, reference %v, reads of %d bytes: %q", got, want, step, stream)
		}
	})
}

// referenceAmbiguous is the watcher's rule read plainly: lines end at \n
// (a \r anywhere is ignored for emptiness), a block ends at an empty line,
// and a block is ambiguous when it has a line starting (case-insensitively)
// with "content-length:" and one with "transfer-encoding:".
func referenceAmbiguous(stream []byte) bool {
	lines := strings.Split(string(stream), "\n")
	lines = lines[:len(lines)-1] // the last piece has no \n yet
	cl, te := false, false
	for _, l := range lines {
		if strings.Trim(l, "\r") == "" {
			if cl && te {
				return true
			}
			cl, te = false, false
			continue
		}
		low := strings.ToLower(l)
		cl = cl || strings.HasPrefix(low, "content-length:")
		te = te || strings.HasPrefix(low, "transfer-encoding:")
	}
	return false
}

// failingListener fails its first Accepts the way a process out of file
// descriptors does, then accepts.
type failingListener struct {
	net.Listener
	failures atomic.Int32
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

// An accept error that is not the listener closing (EMFILE) must not stop
// the node from accepting.
func TestTLSAcceptorSurvivesAcceptErrors(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &failingListener{Listener: raw}
	fl.failures.Store(3)
	cert, _, _, err := selfsigned.Cert(time.Hour, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	a := newTLSAcceptor(fl, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}},
		5*time.Second, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer a.Close()
	for _, proto := range []string{"h2", "http/1.1"} {
		go func() {
			c, err := tls.Dial("tcp", raw.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{proto}})
			if err == nil {
				defer c.Close()
				_, _ = c.Read(make([]byte, 1))
			}
		}()
		c, err := a.Accept()
		if err != nil {
			t.Fatalf("Accept after accept errors: %v", err)
		}
		_, isH1 := c.(*h1Conn)
		if isH1 != (proto == "http/1.1") {
			t.Errorf("ALPN %s handed over as %T", proto, c)
		}
		c.Close()
	}
	a.Close()
	if _, err := a.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
	}
}
