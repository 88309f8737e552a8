package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Relay buffers. An idle tunnel blocks in Read holding a small buffer; a
// read that fills it switches that direction to a pooled large buffer until
// reads turn short again. Idle tunnels stay cheap (the ~100 KB of a plain
// io.Copy pair is the difference between thousands and tens of thousands of
// tunnels per node) and busy ones still move 64 KB per syscall.
const (
	smallBufSize = 1 << 10
	// largeBufSize is four HTTP/2 DATA frames that each fit one TLS record
	// (see h2DataChunk), so a full read leaves no small tail frame.
	largeBufSize = 4 * h2DataChunk
	// shortRead is the read size below which a direction goes back to its
	// small buffer. TLS records carry at most 16 KB, so a busy TLS source
	// reads 16 KB at a time; anything much smaller means the burst is over.
	shortRead = 4 << 10
)

var largeBufs = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}

// endpoint is one side of a tunnel.
type endpoint struct {
	r io.Reader
	w io.Writer
	// flush pushes written bytes out (HTTP/2 response streams buffer).
	flush func() error
	// closeWrite half-closes: the peer reads EOF while we keep reading.
	// nil when the transport cannot half-close.
	closeWrite func() error
	close      func() error
	// drain, when set, reads whatever the source has already buffered
	// into b without blocking and returns how much it read.
	drain func(b []byte) int
}

func connEndpoint(c net.Conn) endpoint {
	e := endpoint{r: c, w: c, close: c.Close}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		e.closeWrite = cw.CloseWrite
	}
	if tc, ok := c.(*tls.Conn); ok {
		e.drain = drainTLS(tc)
	}
	return e
}

// drainTLS returns a drain for a TLS connection. A TLS Read returns one
// record (at most 16 KiB) even when more have arrived, so an upload would
// cost one write(2) upstream per 16 KiB. With a read deadline already in
// the past, further Reads return records TLS has buffered and fail at once,
// without a syscall, when it would have to wait. crypto/tls treats the
// timeout as temporary: a partial record stays buffered for the next Read.
func drainTLS(c *tls.Conn) func([]byte) int {
	return func(b []byte) int {
		n := 0
		_ = c.SetReadDeadline(aLongTimeAgo)
		for len(b)-n >= minDrain {
			m, err := c.Read(b[n:])
			n += m
			if err != nil {
				break // a real error is sticky: the next blocking Read returns it
			}
		}
		_ = c.SetReadDeadline(time.Time{})
		return n
	}
}

var aLongTimeAgo = time.Unix(1, 0)

// minDrain: stop draining when less than one full record fits.
const minDrain = 16 << 10

// relayResult is what a tunnel moved and how it ended.
type relayResult struct {
	up, down int64 // client → upstream, upstream → client
	// end is "" when either side closed or reset the tunnel, the ordinary
	// ways a tunnel ends (browsers reset HTTP/2 streams rather than
	// half-closing them), "idle_timeout" when TUNNEL_IDLE_TIMEOUT closed it
	// and "shutdown" when the drain deadline did.
	end string
	err error // the first read or write error, for debug logs
}

// relay copies both ways until both directions are done, passing each
// half-close on to the other side. When the downstream side cannot
// half-close (HTTP/2 streams end with the handler), the tunnel ends as soon
// as upstream is done sending. It also ends after idle without traffic, or
// when ctx is cancelled (shutdown deadline).
func relay(ctx context.Context, client, upstream endpoint, idle time.Duration, onBytes func(up, down int)) relayResult {
	var (
		res       relayResult
		up, down  atomic.Int64
		closeOnce sync.Once
		errOnce   sync.Once
		idled     atomic.Bool
	)
	closeBoth := func() {
		closeOnce.Do(func() {
			_ = upstream.close()
			_ = client.close()
		})
	}
	setErr := func(err error) {
		if err != nil {
			errOnce.Do(func() { res.err = err })
		}
	}
	act := newIdleWatch(idle, func() { idled.Store(true); closeBoth() })
	defer act.stop()
	stopCtx := context.AfterFunc(ctx, closeBoth)
	defer stopCtx()

	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		err := copyAdaptive(upstream, client.r, client.drain, act, func(n int) { up.Add(int64(n)); onBytes(n, 0) })
		if err != nil {
			setErr(err)
			closeBoth()
			return
		}
		if upstream.closeWrite == nil || upstream.closeWrite() != nil {
			closeBoth()
		}
	}()
	err := copyAdaptive(client, upstream.r, upstream.drain, act, func(n int) { down.Add(int64(n)); onBytes(0, n) })
	switch {
	case err != nil:
		setErr(err)
		closeBoth()
	case client.closeWrite == nil:
		// HTTP/2: END_STREAM is sent when the handler returns; the upload
		// side is over once the stream ends.
		closeBoth()
	case client.closeWrite() != nil:
		closeBoth()
	}
	<-upDone
	closeBoth()
	res.up, res.down = up.Load(), down.Load()
	switch {
	case idled.Load():
		res.end = "idle_timeout"
	case errors.Is(context.Cause(ctx), errShutdownDeadline):
		res.end = "shutdown"
	}
	return res
}

func copyAdaptive(dst endpoint, src io.Reader, drain func([]byte) int, act *idleWatch, onBytes func(int)) error {
	small := make([]byte, smallBufSize)
	buf := small
	var large *[]byte
	defer func() {
		if large != nil {
			largeBufs.Put(large)
		}
	}()
	for {
		nr, rerr := src.Read(buf)
		if large != nil && rerr == nil && drain != nil {
			nr += drain(buf[nr:]) // busy: send what has arrived in one write
		}
		if nr > 0 {
			act.touch()
			nw, werr := dst.w.Write(buf[:nr])
			if nw > 0 {
				onBytes(nw)
			}
			if werr == nil && nw < nr {
				werr = io.ErrShortWrite
			}
			if werr == nil && dst.flush != nil {
				werr = dst.flush()
			}
			if werr != nil {
				return werr
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				return nil
			}
			return rerr
		}
		switch {
		case large == nil && nr == len(buf):
			large = largeBufs.Get().(*[]byte)
			buf = *large
		case large != nil && nr < shortRead:
			largeBufs.Put(large)
			large, buf = nil, small
		}
	}
}

// idleWatch closes a tunnel after idle without traffic. touch is an atomic
// store, cheap on the data path; the timer re-arms itself lazily.
type idleWatch struct {
	idle    time.Duration
	base    time.Time    // monotonic origin: wall-clock steps (NTP) must not close tunnels
	last    atomic.Int64 // nanoseconds after base of the last traffic
	timer   *time.Timer
	onIdle  func()
	stopped atomic.Bool
}

func newIdleWatch(idle time.Duration, onIdle func()) *idleWatch {
	w := &idleWatch{idle: idle, onIdle: onIdle, base: time.Now()}
	w.touch()
	if idle > 0 {
		w.timer = time.AfterFunc(idle, w.check)
	}
	return w
}

func (w *idleWatch) touch() { w.last.Store(int64(time.Since(w.base))) }

func (w *idleWatch) check() {
	if w.stopped.Load() {
		return
	}
	since := time.Since(w.base) - time.Duration(w.last.Load())
	if since >= w.idle {
		w.onIdle()
		return
	}
	w.timer.Reset(w.idle - since)
}

func (w *idleWatch) stop() {
	w.stopped.Store(true)
	if w.timer != nil {
		w.timer.Stop()
	}
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }
