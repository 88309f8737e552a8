package proxy

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// requestBody is a forwarded request's body on its way to the origin. It
// counts bytes, knows whether the client finished it, filters its
// trailers, and ends a client that stops sending: the transport reads it
// from its own goroutine and would otherwise wait forever for bytes that
// never come, holding the connection, an upstream connection and a
// forwarding slot.
type requestBody struct {
	io.ReadCloser
	p *Proxy
	n atomic.Int64
	// eof: the client sent the whole body.
	eof atomic.Bool

	// The idle watch: how long a Read has been waiting for the client. Time
	// the transport spends not reading (an origin that does not take the
	// body) is not the client's fault and does not count.
	idle         time.Duration
	expire       func() // makes the blocked Read fail (a read deadline in the past)
	base         time.Time
	readingSince atomic.Int64 // nanoseconds after base when the pending Read began; 0: none
	timedOut     atomic.Bool
	// mu orders the timer against stop: once stop has returned, the
	// timer never calls expire (the ResponseWriter is not to be used after
	// its handler returns; for HTTP/2 that would touch recycled state).
	mu      sync.Mutex
	timer   *time.Timer
	stopped atomic.Bool // set under mu
	// rmu is held across each Read, so finish can wait for a pending one.
	rmu      sync.Mutex
	finished bool // guarded by rmu: Reads fail from now on
	// closed: Close was called; later Reads fail without reading.
	closed atomic.Bool

	// Trailers: in is the server's map, filled when the body ends; out is
	// what the transport sends, the declared names that may pass this hop.
	trailerIn, trailerOut http.Header
}

func newRequestBody(p *Proxy, w http.ResponseWriter, r *http.Request, idle time.Duration) *requestBody {
	b := &requestBody{ReadCloser: r.Body, p: p, idle: idle, base: time.Now()}
	rc := http.NewResponseController(w)
	b.expire = func() { _ = rc.SetReadDeadline(aLongTimeAgo) }
	if idle > 0 {
		b.mu.Lock()
		b.timer = time.AfterFunc(idle, b.check)
		b.mu.Unlock()
	}
	return b
}

func (b *requestBody) Read(buf []byte) (int, error) {
	b.rmu.Lock()
	defer b.rmu.Unlock()
	if b.finished {
		return 0, errBodyFinished
	}
	if b.closed.Load() {
		return 0, errBodyClosed
	}
	if b.idle > 0 {
		b.readingSince.Store(int64(time.Since(b.base)) | 1) // never 0
	}
	n, err := b.ReadCloser.Read(buf)
	b.readingSince.Store(0)
	b.n.Add(int64(n))
	b.p.opt.Metrics.BytesUpstream.Add(float64(n))
	if err == io.EOF {
		b.eof.Store(true)
		b.passTrailers()
		b.stop()
	}
	return n, err
}

// check runs from the timer: it expires a Read that has waited idle, or
// re-arms for when the pending one would.
func (b *requestBody) check() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped.Load() {
		return
	}
	wait := b.idle
	if since := b.readingSince.Load(); since != 0 {
		waited := time.Since(b.base) - time.Duration(since)
		if waited >= b.idle {
			b.timedOut.Store(true)
			b.expire()
			return
		}
		wait = b.idle - waited
	}
	b.timer.Reset(wait)
}

// stop ends the idle watch: the body is done or the handler is. After it
// returns the timer does nothing.
func (b *requestBody) stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.stopped.Load() {
		b.stopped.Store(true)
		if b.timer != nil {
			b.timer.Stop()
		}
	}
}

// finish ends an HTTP/1.1 body the client has not completed, before the
// handler returns. net/http's HTTP/1.1 server would otherwise read up to
// 256 KB of it after the answer, with no time limit, hoping to reuse the
// connection (the forwarder answers with Connection: close, which stops
// only the drain before the answer). An expired read deadline fails that
// read at once, but only if no Read is pending: net/http waits for a
// pending one and then clears the deadline. So finish expires, waits for a
// pending Read to fail, and makes later ones fail without reading.
func (b *requestBody) finish() {
	b.expire()
	b.rmu.Lock()
	b.finished = true
	b.rmu.Unlock()
}

var errBodyFinished = errors.New("request body abandoned: the answer was sent")

// Close is called by ReverseProxy as its ServeHTTP returns and by the
// transport when it is done with the body. It never closes the server's
// body, which net/http closes itself when the handler returns: that Close
// drains what the client still sends and, on HTTP/1.1, first waits for
// the transport's pending Read, which waits for the client. Go 1.26's
// ReverseProxy hid the body's Close behind a wrapper (noopCloseReader);
// Go 1.27 dropped it, so with an early answer and a body still open the
// handler hung in that Close and the answer, still in the server's
// buffer, never reached the client. Closing here only makes later Reads
// fail, as the wrapper did; finish stops a pending one.
func (b *requestBody) Close() error {
	b.closed.Store(true)
	return nil
}

var errBodyClosed = errors.New("request body read after Close")

// declareTrailers sets what the transport announces and later sends:
// the client's declared trailer names, filtered like headers.
func (b *requestBody) declareTrailers(in http.Header) http.Header {
	if len(in) == 0 {
		return nil
	}
	out := make(http.Header, len(in))
	for k := range in {
		out[k] = nil
	}
	filterTrailer(out)
	b.trailerIn, b.trailerOut = in, out
	return out
}

// passTrailers copies the values of the trailers that may pass, once the
// server has read them (it fills its map before it reports EOF, and the
// transport sends trailers after it sees EOF).
func (b *requestBody) passTrailers() {
	for k := range b.trailerOut {
		b.trailerOut[k] = b.trailerIn[k]
	}
}

// unread reports whether r has a body the client has not finished sending.
// body is the forwarding wrapper, nil when nothing read the body.
func unread(r *http.Request, body *requestBody) bool {
	if r == nil || r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return false
	}
	return body == nil || !body.eof.Load()
}
