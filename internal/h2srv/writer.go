package h2srv

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// responseWriter is the http.ResponseWriter of one stream. It is used by
// the handler's goroutines only (the relay writes from one goroutine at a
// time); what the writer needs is handed over under the connection's lock.
type responseWriter struct {
	s           *stream
	header      http.Header
	status      int   // the final status, once written
	handlerHdr  bool  // the final HEADERS are queued
	written     int64 // body bytes
	contentLen  int64 // declared Content-Length, or -1
	bodyAllowed bool
	detached    bool
}

// smallWrite is the write size up to which bytes are copied into the
// stream and Write returns at once; larger writes are handed to the writer
// as they are and Write waits until it has taken them (one copy either way).
const smallWrite = 4 << 10

// smallBufs hold small writes (one per stream while it has some): most
// forwarded responses are small, and each would otherwise allocate one.
var smallBufs = sync.Pool{New: func() any { b := make([]byte, 0, smallWrite); return &b }}

// freeSmallLocked returns the small-write buffer once it is drained or
// dropped.
func (s *stream) freeSmallLocked() {
	s.small = nil
	if s.smallBuf != nil {
		smallBufs.Put(s.smallBuf)
		s.smallBuf = nil
	}
}

func (w *responseWriter) Header() http.Header { return w.header }

func (w *responseWriter) WriteHeader(code int) {
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if w.status != 0 {
		return // like net/http: the first final status wins
	}
	s := w.s
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if code < 200 {
		// Informational: sent as it is, now. 101 has no meaning in HTTP/2.
		if code != http.StatusSwitchingProtocols && !s.reset {
			s.hdrs = append(s.hdrs, headerOut{status: code, header: w.header.Clone()})
			c.activateLocked(s)
		}
		return
	}
	w.status = code
	w.bodyAllowed = bodyAllowed(code) && s.req.Method != http.MethodHead
	w.contentLen = -1
	if v := w.header.Get("Content-Length"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 {
			w.contentLen = n
		} else {
			w.header.Del("Content-Length")
		}
	}
	s.finalSent = true
	s.expectContinue = false
}

func bodyAllowed(status int) bool {
	return status != http.StatusNoContent && status != http.StatusNotModified
}

// queueFinalHeaderLocked hands the final HEADERS to the writer.
func (w *responseWriter) queueFinalHeaderLocked() {
	if w.handlerHdr {
		return
	}
	w.handlerHdr = true
	h := w.header.Clone()
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{w.s.c.srv.date()}
	}
	w.s.hdrs = append(w.s.hdrs, headerOut{status: w.status, header: h})
	w.s.c.activateLocked(w.s)
}

func (w *responseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.detached {
		return 0, errHandlerDone
	}
	if !w.bodyAllowed {
		if w.status == http.StatusNoContent || w.status == http.StatusNotModified {
			return 0, http.ErrBodyNotAllowed
		}
		return len(p), nil // HEAD: the body is discarded, as net/http does
	}
	if w.contentLen >= 0 && w.written+int64(len(p)) > w.contentLen {
		return 0, http.ErrContentLength
	}
	if len(p) == 0 {
		return 0, nil
	}
	s := w.s
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.writeErr != nil {
		return 0, s.writeErr
	}
	w.written += int64(len(p))
	if !s.fitsSmall(p) || len(s.small)+len(p) == smallWrite {
		w.queueFinalHeaderLocked()
	}
	return s.writeLocked(p, w.handlerHdr)
}

func (s *stream) fitsSmall(p []byte) bool {
	return len(p) <= smallWrite && len(s.small)+len(p) <= smallWrite && s.pending == nil
}

// writeLocked hands p to the writer: a small p is copied and Write returns
// at once (sent now if send, else with the header later); a large one is
// taken by the writer from p itself while Write waits.
func (s *stream) writeLocked(p []byte, send bool) (int, error) {
	c := s.c
	if s.fitsSmall(p) {
		if s.small == nil {
			s.smallBuf = smallBufs.Get().(*[]byte)
			s.small = (*s.smallBuf)[:0]
		}
		s.small = append(s.small, p...)
		if send {
			c.activateLocked(s) // the writer gathers what comes meanwhile
		}
		return len(p), nil
	}
	s.pending = p
	c.activateLocked(s)
	for s.pending != nil && s.writeErr == nil {
		s.wcond.Wait()
	}
	if s.pending != nil {
		n := len(p) - len(s.pending)
		s.pending = nil
		return n, s.writeErr
	}
	return len(p), nil
}

// Detach implements httpx.Detacher: the header goes out, and the stream
// stays open after the handler returns, for the caller to relay.
func (w *responseWriter) Detach() (httpx.Stream, error) {
	if err := w.sendHeader(func() { w.detached = true }); err != nil {
		return nil, err
	}
	return (*streamHandle)(w.s), nil
}

// sendHeader hands the response header (200 if none was set) to the
// writer, and runs then, under the connection's lock, unless the stream
// has failed.
func (w *responseWriter) sendHeader(then func()) error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	c := w.s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if w.s.writeErr != nil {
		return w.s.writeErr
	}
	w.queueFinalHeaderLocked()
	then()
	return nil
}

// Flush sends the header and what is buffered without waiting for it.
func (w *responseWriter) Flush() { _ = w.FlushError() }

func (w *responseWriter) FlushError() error {
	return w.sendHeader(func() { w.s.c.activateLocked(w.s) })
}

func (w *responseWriter) SetReadDeadline(t time.Time) error {
	w.s.setReadDeadline(t)
	return nil
}

func (w *responseWriter) SetWriteDeadline(t time.Time) error {
	w.s.setWriteDeadline(t)
	return nil
}

// EnableFullDuplex: HTTP/2 streams are always full duplex.
func (w *responseWriter) EnableFullDuplex() error { return nil }

// finishLocked ends the response when the handler returns: the header if
// none went out, what is buffered, trailers, END_STREAM.
func (w *responseWriter) finishLocked() {
	s := w.s
	if s.reset {
		return
	}
	if w.status == 0 {
		w.status = http.StatusOK
		w.bodyAllowed = s.req.Method != http.MethodHead
		w.contentLen = -1
		s.finalSent = true
	}
	// Trailers: the fields the handler announced in "Trailer", and those
	// set under http.TrailerPrefix. Set before the header went out, they
	// are still trailers, not header fields.
	var tr http.Header
	addTrailer := func(k string, vv []string) {
		if tr == nil {
			tr = make(http.Header)
		}
		tr[k] = vv
	}
	trailerNames(w.header["Trailer"], func(k string) {
		if vv, ok := w.header[k]; ok {
			addTrailer(k, vv)
			if !w.handlerHdr {
				delete(w.header, k)
			}
		}
	})
	for k, vv := range w.header {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			if name = http.CanonicalHeaderKey(name); httpguts.ValidTrailerHeader(name) {
				addTrailer(name, vv)
			}
			if !w.handlerHdr {
				delete(w.header, k)
			}
		}
	}
	if !w.handlerHdr && w.contentLen < 0 && w.bodyAllowed && tr == nil && len(w.header["Trailer"]) == 0 {
		// The whole body is here: say how long it is, as net/http does.
		w.header.Set("Content-Length", strconv.Itoa(len(s.small)))
	}
	w.queueFinalHeaderLocked()
	s.trailers = tr
	s.endWanted = true
	s.c.activateLocked(s)
}
