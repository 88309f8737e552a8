package h2srv

import (
	"errors"
	"time"
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
