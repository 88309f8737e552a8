package h2srv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// stream is one request and its response. All fields are guarded by the
// connection's mu.
//
// Fields that fit in each other's alignment padding sit together (wu by id,
// the flags in pairs): an idle tunnel keeps its stream, and 448 bytes is
// a smaller size class than the 472 the plain order took.
type stream struct {
	c      *conn
	id     uint32
	wu     uint32 // stream WINDOW_UPDATE not yet written
	req    *http.Request
	cancel context.CancelCauseFunc

	// Lifecycle. The stream leaves the connection when its handler is done
	// (or it never had one), its last frame is queued (END_STREAM or
	// RST_STREAM), and the client's side is closed.
	handlerDone  bool
	remoteClosed bool // END_STREAM or reset received, or the stream reset
	localClosed  bool // END_STREAM or RST_STREAM written
	reset        bool // reset by either side: nothing more is sent but the RST
	peerReset    bool // by the client
	rstCode      http2.ErrCode
	rstQueued    bool // we owe the client an RST_STREAM
	finalSent    bool // the final response HEADERS went out (or are queued)
	discard      bool // nobody reads the body: DATA is consumed on arrival
	noCredit     bool // its answer earns no flood credit (a refusal the engine made)

	// Receive side.
	recv           chunkQueue
	recvWindow     int64 // what the client may still send on this stream
	unacked        int64 // consumed, not yet granted back
	declaredLen    int64 // content-length, or -1
	recvLen        int64
	readErr        error // why Read fails once the buffer is empty
	readTimedOut   bool
	expectContinue bool
	readTimer      *time.Timer
	trailer        http.Header // request trailers, for r.Trailer at EOF
	rcond          sync.Cond
	readReady      func()                      // see ReadReady
	sink           func([][]byte) (int, error) // see httpx.Sinker
	sinkQueued     bool                        // in c.sinkStreams

	// Send side.
	sendWindow    int64
	hdrs          []headerOut // HEADERS waiting for the writer (1xx, final)
	small         []byte      // small writes, copied (see smallWrite)
	smallBuf      *[]byte     // small's buffer, from smallBufs
	pending       []byte      // a large write, handed over without a copy
	trailers      http.Header // sent with END_STREAM, if any
	endWanted     bool        // END_STREAM after what is queued
	queued        bool        // in c.active
	headerWritten bool        // the final HEADERS are written: DATA may follow
	blocked       bool        // has data, no window
	blockedSince  time.Time
	writeErr      error
	writeTimer    *time.Timer
	wcond         sync.Cond
}

type headerOut struct {
	status int
	header http.Header
}

func (c *conn) newStreamLocked(id uint32) *stream {
	s := &stream{c: c, id: id, recvWindow: int64(c.cfg.StreamWindow), sendWindow: c.peerWindow, declaredLen: -1}
	s.rcond.L = &c.mu
	s.wcond.L = &c.mu
	s.cancel = func(error) {} // until a request's context replaces it
	c.streams[id] = s
	c.idleSince = time.Time{}
	return s
}

// runHandler runs the handler for one request on a goroutine of its own.
func (s *stream) runHandler(r *http.Request) {
	w := &responseWriter{s: s, header: make(http.Header)}
	defer func() {
		e := recover()
		c := s.c
		c.mu.Lock()
		defer c.mu.Unlock()
		if e != nil {
			if e != http.ErrAbortHandler {
				c.cfg.Log.Error("HTTP/2 handler panicked", "panic", fmt.Sprint(e))
			}
			s.resetLocked(errHandlerDone, true)
			s.rstCode = http2.ErrCodeInternal
		} else if w.detached {
			// The stream lives on in its streamHandle; the request does not.
			s.cancel(errHandlerDone)
			s.cancel = func(error) {} // and frees the context chain
			s.req = nil
			return
		} else {
			w.finishLocked()
		}
		s.handlerDoneLocked()
	}()
	s.c.cfg.Handler.ServeHTTP(w, r)
}

// handlerDoneLocked: the handler is gone; a client still sending its body
// is told to stop (RFC 9113 §8.1: RST_STREAM NO_ERROR after a complete
// response).
func (s *stream) handlerDoneLocked() {
	s.handlerDone = true
	s.cancel(errHandlerDone)
	s.discardLocked()
	if s.readTimer != nil {
		s.readTimer.Stop()
	}
	if s.writeTimer != nil {
		s.writeTimer.Stop()
	}
	s.c.activateLocked(s)
	s.c.maybeRemoveLocked(s)
}

// discardLocked drops what is buffered and consumes what still arrives.
func (s *stream) discardLocked() {
	s.discard = true
	if n := s.recv.len(); n > 0 {
		s.recv.reset()
		// The bytes leave the connection's buffer: its window opens again.
		s.c.addBuffered(-int64(n))
		s.consumedLocked(n)
		s.c.grantLocked()
	}
}

// respondLocked answers with a bare status, for streams without a handler.
func (s *stream) respondLocked(status int) {
	h := http.Header{"Content-Length": {"0"}}
	s.hdrs = append(s.hdrs, headerOut{status: status, header: h})
	s.finalSent = true
	s.endWanted = true
	s.handlerDone = true
	s.c.activateLocked(s)
}

// resetLocked ends the stream at once. sendRST: we tell the client
// (rstCode, CANCEL unless set); otherwise the client reset it.
func (s *stream) resetLocked(cause error, sendRST bool) {
	if s.reset {
		return
	}
	s.reset = true
	if sendRST && !s.localClosed {
		s.rstQueued = true
		s.rstCode = http2.ErrCodeCancel
	} else {
		s.localClosed = true
	}
	if !s.remoteClosed {
		s.remoteClosed = true
		s.readErr = cause
	}
	if s.writeErr == nil {
		s.writeErr = cause
	}
	// pending stays: the Write waiting on it takes it back and reports
	// how much of it was sent.
	s.hdrs, s.trailers = nil, nil
	s.freeSmallLocked()
	s.cancel(cause)
	s.discardLocked()
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	s.fireReadReady()
	s.c.activateLocked(s)
	s.c.maybeRemoveLocked(s)
}

// connGoneLocked fails the stream because the connection ended.
func (s *stream) connGoneLocked(err error) {
	s.reset, s.localClosed = true, true
	if !s.remoteClosed {
		s.remoteClosed = true
		s.readErr = err
	}
	if s.writeErr == nil {
		s.writeErr = err
	}
	s.cancel(err)
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	s.fireReadReady()
}

// maybeRemoveLocked drops a finished stream from the connection.
func (c *conn) maybeRemoveLocked(s *stream) {
	if !s.handlerDone || !s.localClosed || !s.remoteClosed || c.streams[s.id] != s {
		return
	}
	delete(c.streams, s.id)
	if n := s.recv.len(); n > 0 {
		s.recv.reset()
		c.addBuffered(-int64(n))
		c.grantLocked()
	}
	if len(c.streams) == 0 {
		c.idleSince = time.Now()
		c.maybeCloseLocked()
	}
}

// consumedLocked: n bytes of the stream's window were used up (read by the
// handler, discarded, or padding); grant them back in batches.
func (s *stream) consumedLocked(n int) {
	c := s.c
	if n <= 0 {
		return
	}
	s.unacked += int64(n)
	if !s.remoteClosed && s.unacked >= int64(c.cfg.StreamWindow)/4 {
		s.recvWindow += s.unacked
		if s.wu == 0 {
			c.wuStreams = append(c.wuStreams, s)
		}
		s.wu += uint32(s.unacked)
		s.unacked = 0
		c.wcond.Signal()
	}
}

// fireReadReady runs a ReadReady callback once Read would not block.
func (s *stream) fireReadReady() {
	if f := s.readReady; f != nil {
		s.readReady = nil
		f()
	}
}

// requestBody is the request's Body: what the client sent, as DATA frames
// arrive.
type requestBody struct {
	s      *stream
	closed bool
}

var errBodyClosed = errors.New("http2: read on closed request body")

func (b *requestBody) Read(p []byte) (int, error) {
	s := b.s
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if b.closed {
		return 0, errBodyClosed
	}
	return s.readLocked(p)
}

// readLocked reads request DATA, waiting for it.
func (s *stream) readLocked(p []byte) (int, error) {
	c := s.c
	if s.expectContinue {
		// RFC 9110 §10.1.1: the handler wants the body; let it come.
		s.expectContinue = false
		if !s.finalSent && !s.reset {
			s.hdrs = append(s.hdrs, headerOut{status: http.StatusContinue})
			c.activateLocked(s)
		}
	}
	for {
		if n := s.recv.len(); n > 0 {
			m := s.recv.read(p)
			c.addBuffered(-int64(m))
			s.consumedLocked(m)
			c.grantLocked()
			return m, nil
		}
		switch {
		case s.readErr != nil:
			return 0, s.readErr
		case s.remoteClosed:
			// Only trailers the request declared are kept, as net/http does
			// (a detached stream has no request left: they are dropped).
			if s.req != nil {
				for k, vv := range s.trailer {
					if _, ok := s.req.Trailer[k]; ok {
						s.req.Trailer[k] = vv
					}
				}
			}
			s.trailer = nil
			return 0, io.EOF
		case s.readTimedOut:
			return 0, os.ErrDeadlineExceeded
		case c.err != nil:
			return 0, c.err
		case len(p) == 0:
			return 0, nil
		}
		s.rcond.Wait()
	}
}

// readableLocked: a Read would not block.
func (s *stream) readableLocked() bool {
	return s.recv.len() > 0 || s.readErr != nil || s.remoteClosed || s.readTimedOut || s.c.err != nil
}

func (b *requestBody) Close() error {
	s := b.s
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	b.closed = true
	s.discardLocked()
	return nil
}

// setReadDeadline sets when a waiting Read fails with
// os.ErrDeadlineExceeded.
func (s *stream) setReadDeadline(t time.Time) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.readTimedOut = false
	s.readTimer = s.deadlineLocked(s.readTimer, t, func() {
		s.readTimedOut = true
		s.rcond.Broadcast()
		s.fireReadReady()
	})
}

// setWriteDeadline sets when the stream is reset if it is still open:
// a write deadline in the past resets it now and wakes a blocked Write.
func (s *stream) setWriteDeadline(t time.Time) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	s.writeTimer = s.deadlineLocked(s.writeTimer, t, func() { s.resetLocked(os.ErrDeadlineExceeded, true) })
}

// deadlineLocked replaces old with a timer that runs expire, under the
// connection's lock, at t: now if t has passed, never if t is zero.
func (s *stream) deadlineLocked(old *time.Timer, t time.Time, expire func()) *time.Timer {
	if old != nil {
		old.Stop()
	}
	switch {
	case t.IsZero():
		return nil
	case !t.After(time.Now()):
		expire()
		return nil
	}
	return time.AfterFunc(time.Until(t), func() {
		s.c.mu.Lock()
		defer s.c.mu.Unlock()
		expire()
	})
}

// chunkQueue holds received DATA in pooled 16 KiB chunks: memory follows
// what is buffered, and an idle stream holds none.
type chunkQueue struct {
	chunks [][]byte // each from chunkPool; the first read from off
	off    int
	n      int
}

const chunkSize = 16 << 10

var chunkPool = sync.Pool{New: func() any { b := make([]byte, 0, chunkSize); return &b }}

func (q *chunkQueue) len() int { return q.n }

func (q *chunkQueue) write(p []byte) {
	q.n += len(p)
	for len(p) > 0 {
		if k := len(q.chunks); k == 0 || len(q.chunks[k-1]) == cap(q.chunks[k-1]) {
			q.chunks = append(q.chunks, (*chunkPool.Get().(*[]byte))[:0])
		}
		last := &q.chunks[len(q.chunks)-1]
		m := min(len(p), cap(*last)-len(*last))
		*last = append(*last, p[:m]...)
		p = p[m:]
	}
}

func (q *chunkQueue) read(p []byte) int {
	n := 0
	for n < len(p) && len(q.chunks) > 0 {
		first := q.chunks[0]
		m := copy(p[n:], first[q.off:])
		n += m
		q.off += m
		if q.off == len(first) {
			q.free(first)
			q.chunks[0] = nil
			q.chunks = q.chunks[1:]
			q.off = 0
		}
	}
	q.n -= n
	if len(q.chunks) == 0 {
		q.chunks = nil
	}
	return n
}

// buffers appends what is queued, in order, to dst without copying it.
func (q *chunkQueue) buffers(dst [][]byte) [][]byte {
	for i, ch := range q.chunks {
		if i == 0 {
			ch = ch[q.off:]
		}
		dst = append(dst, ch)
	}
	return dst
}

// discard drops the first n queued bytes (n <= q.len()).
func (q *chunkQueue) discard(n int) {
	q.n -= n
	for n > 0 {
		first := q.chunks[0]
		m := min(n, len(first)-q.off)
		n -= m
		q.off += m
		if q.off == len(first) {
			q.free(first)
			q.chunks[0] = nil
			q.chunks = q.chunks[1:]
			q.off = 0
		}
	}
	if len(q.chunks) == 0 {
		q.chunks = nil
	}
}

func (q *chunkQueue) reset() {
	for _, ch := range q.chunks {
		q.free(ch)
	}
	*q = chunkQueue{}
}

func (q *chunkQueue) free(b []byte) {
	b = b[:0]
	chunkPool.Put(&b)
}
