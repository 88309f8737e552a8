package h2srv

import (
	"errors"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// streamHandle is a stream detached from its handler (httpx.Stream): a
// CONNECT tunnel's client side. It holds no goroutine and no buffer while
// the tunnel is idle; the relay parks on ReadReady.
type streamHandle stream

var errWriteClosed = errors.New("http2: write after END_STREAM")

func (h *streamHandle) s() *stream { return (*stream)(h) }

func (h *streamHandle) Read(p []byte) (int, error) {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.readLocked(p)
}

func (h *streamHandle) Write(p []byte) (int, error) {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	switch {
	case s.writeErr != nil:
		return 0, s.writeErr
	case s.endWanted:
		return 0, errWriteClosed
	case len(p) == 0:
		return 0, nil
	}
	return s.writeLocked(p, true)
}

func (h *streamHandle) CloseWrite() error {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.writeErr != nil {
		return s.writeErr
	}
	s.endWanted = true
	s.c.activateLocked(s)
	return nil
}

// Close frees the stream. With our END_STREAM queued, what is queued still
// goes out (and a client still sending is then told to stop, as after a
// handler); otherwise the stream is reset.
func (h *streamHandle) Close() error {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.handlerDone {
		return nil
	}
	if !s.endWanted {
		s.resetLocked(errStreamClosed, true)
	}
	s.handlerDoneLocked()
	return nil
}

func (h *streamHandle) Abort() {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.resetLocked(errStreamClosed, true)
}

func (h *streamHandle) SetReadDeadline(t time.Time) error {
	h.s().setReadDeadline(t)
	return nil
}

func (h *streamHandle) ReadReady(f func()) bool {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.readableLocked() {
		return false
	}
	s.readReady = f
	return true
}

// Source implements httpx.Sourcer: from now on the writer reads src
// whenever the stream has window, after what Write queued before.
func (h *streamHandle) Source(src httpx.Source) bool {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if s.writeErr != nil || s.endWanted || s.reset || s.source != nil {
		return false
	}
	s.source, s.sourceWaiting = src, false
	s.c.activateLocked(s)
	return true
}

// returnSourceLocked gives the stream's source back to its owner, which
// then reads it itself: the stream can no longer send, or the source is
// done.
func (s *stream) returnSourceLocked() {
	if s.sourceReading {
		s.sourceReturn = true // the writer returns it when its read is over
		return
	}
	if src := s.source; src != nil {
		s.source, s.sourceWaiting = nil, false
		go src.Returned()
	}
}

// sourceActive: the writer may read the stream's source now.
func (s *stream) sourceActive() bool { return s.source != nil && !s.sourceWaiting }

// sourceReady is a source's WaitReadable callback: it has something again.
func (c *conn) sourceReady(s *stream, src httpx.Source) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.source == src && s.sourceWaiting {
		s.sourceWaiting = false
		c.activateLocked(s)
	}
}
