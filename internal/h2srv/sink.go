package h2srv

import (
	"errors"
	"os"
	"time"
)

// Sinks (httpx.Sinker). A detached stream whose relay is parked can have
// its DATA written out by the reader itself, which saves a goroutine
// wake-up per frame. The reader gathers what arrives for such streams and
// flushes it when the socket has nothing more buffered (the next read
// would block) or when much has gathered, so one write(2) upstream carries
// all the frames of one read(2), as an HTTP/1.1 tunnel's copy loop does.

// sinkFlushBytes bounds what gathers before a flush even while the reader
// never waits: a busy connection must not hold a tunnel's bytes back.
const sinkFlushBytes = 256 << 10

// SetSink implements httpx.Sinker.
func (h *streamHandle) SetSink(write func(bufs [][]byte) (int, error)) {
	s := h.s()
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.sink = write
}

// sinkDataLocked is processData's choice for DATA a stream buffered: with
// a sink and its relay parked, the data waits for the reader's next flush
// instead of waking the relay.
func (c *conn) sinkDataLocked(s *stream, n int) bool {
	if s.sink == nil || s.readReady == nil {
		return false
	}
	if !s.sinkQueued {
		s.sinkQueued = true
		c.sinkStreams = append(c.sinkStreams, s)
	}
	c.sinkBytes += n
	if c.sinkBytes >= sinkFlushBytes {
		c.flushSinksLocked()
	}
	return true
}

// flushSinksLocked writes out what gathered for sinks. A stream whose
// relay woke meanwhile (reset, deadline, END_STREAM) is skipped: the relay
// reads its buffer.
func (c *conn) flushSinksLocked() {
	for i, s := range c.sinkStreams {
		c.sinkStreams[i] = nil
		s.sinkQueued = false
		if s.sink == nil || s.readReady == nil || s.recv.len() == 0 {
			continue
		}
		c.sinkBufs = s.recv.buffers(c.sinkBufs[:0])
		n, err := s.sink(c.sinkBufs)
		clear(c.sinkBufs)
		if n > 0 {
			s.recv.discard(n)
			c.addBuffered(-int64(n))
			s.consumedLocked(n)
		}
		if err != nil {
			s.sink = nil
		}
		if s.recv.len() > 0 {
			s.rcond.Signal()
			s.fireReadReady()
		}
	}
	c.sinkStreams = c.sinkStreams[:0]
	c.sinkBytes = 0
	c.grantLocked()
}

// frameSource is what the Framer reads: the TLS connection, with a flush of
// the sinks whenever the next read would wait for the network. It finds out
// without a syscall: with a read deadline in the past, crypto/tls returns
// what it has buffered and fails at once, keeping a partial record, when it
// would have to read the socket. Only the reader goroutine uses it.
type frameSource struct {
	c        *conn
	deadline time.Time // the read deadline the connection wants
	probing  bool      // the socket's deadline is in the past
}

func (f *frameSource) Read(p []byte) (int, error) {
	nc := f.c.nc
	for {
		if !f.probing && len(f.c.sinkStreams) > 0 {
			_ = nc.SetReadDeadline(aLongTimeAgo)
			f.probing = true
		}
		n, err := nc.Read(p)
		if !f.probing || n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		// Nothing buffered: flush, then wait as the connection wants.
		f.probing = false
		_ = nc.SetReadDeadline(f.deadline)
		f.c.mu.Lock()
		f.c.flushSinksLocked()
		f.c.mu.Unlock()
	}
}

// setDeadline sets the connection's read deadline (preface, header
// blocks, linger).
func (f *frameSource) setDeadline(t time.Time) {
	f.deadline = t
	if !f.probing {
		_ = f.c.nc.SetReadDeadline(t)
	}
}

var aLongTimeAgo = time.Unix(1, 0)
