package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// Relay memory. A tunnel spends most of its life idle, so what an idle
// tunnel holds decides how many a node can carry; a plain io.Copy pair
// holds two 32 KB buffers and two goroutine stacks grown by TLS to ~8 KB
// each. Here a busy direction reads into a pooled 64 KB buffer; a direction
// reading a socket that has been quiet for parkAfter returns the buffer,
// ends its goroutine and is handed to the parker, which runs it again on a
// waiting or new goroutine (relayWorkers) when the socket becomes readable
// (park_linux.go). A
// direction reading a detached HTTP/2 stream parks the same way, on the
// engine's ReadReady callback.
const (
	smallBufSize = 1 << 10
	// largeBufSize is four HTTP/2 DATA frames that each fit one TLS record
	// (see h2DataChunk), so a full read leaves no small tail frame.
	largeBufSize = 4 * h2DataChunk
	hugeBufSize  = 16 * h2DataChunk
	// shortRead is the read size below which a non-socket direction goes
	// back to its small buffer. TLS records carry at most 16 KB, so a busy
	// TLS source reads 16 KB at a time; much less means the burst is over.
	shortRead = 4 << 10
	// parkAfter is how long a socket direction waits for bytes, holding
	// its buffer and stack, before it parks. Parking and waking cost a
	// goroutine start and three syscalls (~10 µs), which a bulk transfer
	// pausing this long does not notice; a burst of new tunnels, each used
	// once, holds the goroutines of the last parkAfter only (a second kept
	// 2000 HTTP/2 tunnels at 11.2–11.6 KB of RSS each, 100 ms at 7.8–8.8).
	parkAfter = 100 * time.Millisecond
)

// The relay's buffer pools are the process's, like the memory they
// recycle: largeBufs for busy directions, hugeBufs for bulk downloads into
// HTTP/2 streams, capped at 64 MiB in use across the node (beyond it such
// downloads keep a large buffer).
var (
	// smallBufs: a direction runs again after every park, and a fresh
	// buffer each time was most of the garbage idle tunnels made.
	smallBufs = bufPool{size: smallBufSize}
	largeBufs = bufPool{size: largeBufSize}
	hugeBufs  = bufPool{size: hugeBufSize, limit: 64 << 20 / hugeBufSize}
)

// endpoint is one side of a tunnel: a connection (conn) or a detached
// HTTP/2 stream (stream). It holds them rather than method values and
// closures of them, which were a dozen small allocations that every idle
// tunnel kept.
type endpoint struct {
	// r is what the side's bytes are read from: conn or stream, unless
	// bytes buffered before the tunnel come first. Writes go to conn or
	// stream.
	r io.Reader
	// conn is the side's connection, nil for a stream: close, half-close
	// and read deadlines go to it.
	conn net.Conn
	// stream is set when the side is a detached HTTP/2 stream: close,
	// half-close and read deadlines go to it, and an idle direction parks
	// on it too (the engine calls back when it is readable). Its abort ends
	// it at once when the tunnel is cut (idle timeout, shutdown): a
	// stream's close does not wake a write blocked on a client's
	// flow-control window, a stream reset does.
	stream httpx.Stream
	// tls, when set, is the TLS connection r reads: a busy direction
	// drains what it has already buffered (see drainTLS).
	tls *tls.Conn
	// raw is set when r reads a socket, which lets an idle direction park
	// (see parkAfter).
	raw syscall.RawConn
	// batch, when set, gathers the TLS records of one large write into
	// one syscall (see BatchListener).
	batch *batchConn
}

// setReadDeadline sets the quiet-time lease of a direction that can park.
func (e *endpoint) setReadDeadline(t time.Time) error {
	if e.stream != nil {
		return e.stream.SetReadDeadline(t)
	}
	return e.conn.SetReadDeadline(t)
}

func (e *endpoint) close() error {
	if e.stream != nil {
		return e.stream.Close()
	}
	return e.conn.Close()
}

// closeWrite half-closes the side; false when it cannot or failed to.
func (e *endpoint) closeWrite() bool {
	switch {
	case e.stream != nil:
		return e.stream.CloseWrite() == nil
	}
	// The peer reads EOF while we keep reading.
	cw, ok := e.conn.(interface{ CloseWrite() error })
	return ok && cw.CloseWrite() == nil
}

// rawWrite: writes go to the plain TCP socket raw, which a sink can write
// without blocking (sink_linux.go); not through TLS or a wrapper that
// counts.
func (e *endpoint) rawWrite() bool {
	_, plain := e.conn.(*net.TCPConn)
	return plain && e.raw != nil
}

func (e *endpoint) write(b []byte) (int, error) {
	if e.stream != nil {
		return e.stream.Write(b)
	}
	return e.conn.Write(b)
}

// abort resets a stream side; a connection has nothing to abort.
func (e *endpoint) abort() {
	if e.stream != nil {
		e.stream.Abort()
	}
}

// streamEndpoint is a detached stream as a tunnel's client side. Its
// writes need no flush (the engine's writer sends as soon as it can) and
// are not cut to record size (the writer sizes its frames).
func streamEndpoint(st httpx.Stream) endpoint {
	return endpoint{r: st, stream: st}
}

func connEndpoint(c net.Conn) endpoint {
	if tc, ok := under[*tls.Conn](c); ok {
		// A client connection the server wraps to watch HTTP/1.1 request
		// framing is relayed from the TLS connection beneath: the
		// wrapper's job ended with the request that opened the tunnel.
		c = tc
	}
	e := endpoint{r: c, conn: c, raw: RawSocket(c)}
	if tc, ok := c.(*tls.Conn); ok {
		e.tls = tc
		e.batch, _ = under[*batchConn](tc)
	}
	return e
}

// RawSocket finds the socket under c (through crypto/tls and listener
// wrappers), or nil.
func RawSocket(c net.Conn) syscall.RawConn {
	sc, ok := under[syscall.Conn](c)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// drainTLS reads whatever c has already buffered into b without blocking
// and returns how much it read; it leaves the read deadline at restore. A
// TLS Read returns one record (at most 16 KiB) even when more have
// arrived, so an upload would cost one write(2) upstream per 16 KiB. With
// a read deadline already in the past, further Reads return records TLS
// has buffered and fail at once, without a syscall, when it would have to
// wait. crypto/tls treats the timeout as temporary: a partial record stays
// buffered for the next Read.
func drainTLS(c *tls.Conn, b []byte, restore time.Time) int {
	n := 0
	_ = c.SetReadDeadline(aLongTimeAgo)
	for len(b)-n >= minDrain {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			break // a real error is sticky: the next blocking Read returns it
		}
	}
	_ = c.SetReadDeadline(restore)
	return n
}

var aLongTimeAgo = time.Unix(1, 0)

// maxRecordPlaintext is the most plaintext one TLS record carries.
const maxRecordPlaintext = 16 << 10

// minDrain: stop draining when less than one full record fits.
const minDrain = 16 << 10

// relayResult is what a tunnel moved and how it ended.
type relayResult struct {
	up, down int64 // client → upstream, upstream → client
	// end is "" when either side closed or reset the tunnel, the ordinary
	// ways a tunnel ends (browsers reset HTTP/2 streams rather than
	// half-closing them), "idle_timeout" when TUNNEL_IDLE_TIMEOUT closed it,
	// "shutdown" when the drain deadline did and "token_revoked" when its
	// token was revoked.
	end string
	// closedBy names the side whose end came first, when end is "":
	// "client_closed" or "origin_closed" (a close, half-close, reset or
	// failed write on that side), or "error" (a failure that is neither,
	// such as a TLS error on the client's connection).
	closedBy string
	err      error // the first read or write error, for debug logs
}

// tunnel relays both ways until both directions are done, passing each
// half-close on to the other side (a TCP FIN, an HTTP/2 END_STREAM); when
// a side cannot half-close, the tunnel ends as soon as the other is done
// sending. It also ends after idle without traffic, or when stop is
// called (shutdown deadline, revocation).
type tunnel struct {
	client, upstream endpoint
	up, down         direction
	parker           *parker
	watch            idleWatch
	// owner is told what each write moved and how the tunnel ended.
	owner tunnelOwner
	// cause is why stop ended the tunnel, nil until then. A tunnel holds
	// no context: an idle one costs what it holds, and a context with an
	// AfterFunc cost a fifth of that.
	cause atomic.Pointer[error]

	running   atomic.Int32 // directions not yet finished
	closeOnce sync.Once
	errOnce   sync.Once
	// released: closing, the parker refuses its directions; guarded by
	// the parker's mutex. ended: guarded by endMu. (Here, they fill
	// errOnce's padding.)
	released bool
	ended    bool
	err      error
	idled    atomic.Bool
	firstEnd atomic.Int32 // endNone until a direction ends; then who ended first
	endMu    sync.Mutex   // orders abortIdle before the end of the tunnel
}

// direction is one way through a tunnel.
type direction struct {
	t     *tunnel
	moved atomic.Int64
	// isUp: client → upstream. It decides which sides src and dst are and
	// what finish and counted call (not fields and closures: an idle
	// tunnel keeps what it holds).
	isUp bool
	// canPark: src is a socket and the parker works. Only the goroutine
	// running the direction touches it.
	canPark bool
	// parkedFD is the socket the parker holds d for, or -1; guarded by
	// the parker's mutex.
	parkedFD int32
	// sinking: src hands its data to d.sink while d is parked, and d parks
	// as soon as src has nothing to read (see httpx.Sinker).
	sinking bool
}

// tunnelOwner is what a tunnel reports to: one object with two methods
// rather than two closures, which an idle tunnel would keep.
type tunnelOwner interface {
	// tunnelBytes is told what each write moved (one of up and down is
	// 0).
	tunnelBytes(up, down int)
	// tunnelEnded is called once, from one of the tunnel's goroutines,
	// when it is over.
	tunnelEnded(relayResult)
}

// start runs the tunnel in goroutines of its own; tunnelEnded is called, from
// one of them, when it is over.
func (t *tunnel) start() {
	go t.down.run()
	go t.up.run()
}

func newTunnel(pk *parker, client, upstream endpoint, idle time.Duration, owner tunnelOwner) *tunnel {
	t := &tunnel{client: client, upstream: upstream, parker: pk, owner: owner}
	t.running.Store(2)
	t.up = direction{t: t, isUp: true, parkedFD: -1}
	t.down = direction{t: t, parkedFD: -1}
	parking := pk.start() == nil
	t.up.canPark = client.raw != nil && parking || client.stream != nil
	t.down.canPark = upstream.raw != nil && parking
	if sinker, ok := client.stream.(httpx.Sinker); ok && upstream.rawWrite() && sinkSupported {
		t.up.sinking, t.up.canPark = true, false
		sinker.SetSink(t.up.sink)
	}
	t.watch.init(idle, t.idleTimeout)
	return t
}

// idleTimeout ends a tunnel that carried nothing for TUNNEL_IDLE_TIMEOUT.
func (t *tunnel) idleTimeout() {
	t.idled.Store(true)
	t.abortIdle()
}

// src is the side d reads, dst the side it writes (fields would make
// every idle tunnel larger).
func (d *direction) src() *endpoint {
	if d.isUp {
		return &d.t.client
	}
	return &d.t.upstream
}

func (d *direction) dst() *endpoint {
	if d.isUp {
		return &d.t.upstream
	}
	return &d.t.client
}

// finish is called once, when d's source is done or failed.
func (d *direction) finish(err error) {
	if d.isUp {
		d.t.upFinished(err)
	} else {
		d.t.downFinished(err)
	}
}

// counted reports n bytes moved in d's direction.
func (d *direction) counted(n int) {
	if d.isUp {
		d.t.owner.tunnelBytes(n, 0)
	} else {
		d.t.owner.tunnelBytes(0, n)
	}
}

// stop ends the tunnel from outside, with cause (errShutdownDeadline,
// errTokenRevoked), for its record; the first cause is kept.
func (t *tunnel) stop(cause error) {
	t.cause.CompareAndSwap(nil, &cause)
	if errors.Is(cause, errTokenRevoked) {
		// Like an idle cut: a write blocked on the client's window must
		// not keep a revoked tunnel open.
		t.abortIdle()
		return
	}
	t.closeBoth()
}

// stopCause is what stop was called with, or nil.
func (t *tunnel) stopCause() error {
	if c := t.cause.Load(); c != nil {
		return *c
	}
	return nil
}

// abortIdle ends a tunnel idle for too long. A blocked write may be what
// keeps it from ending by itself, so the client side is aborted first,
// unless the tunnel is already over (the HTTP/2 handler may have returned,
// and its ResponseWriter must not be used after that).
func (t *tunnel) abortIdle() {
	t.endMu.Lock()
	if !t.ended {
		t.client.abort()
	}
	t.endMu.Unlock()
	t.closeBoth()
}

// closeBoth closes both sides. The parker releases the tunnel first: a
// parked direction is taken back, so that its socket is never closed while
// registered, and finished here (nothing else would run it again); a
// direction about to park is refused and reads the closed socket.
func (t *tunnel) closeBoth() {
	t.closeOnce.Do(func() {
		up, down := t.parker.release(t)
		_ = t.upstream.close()
		_ = t.client.close()
		// In goroutines: finish calls closeBoth, and this is inside its Once.
		if up {
			t.parker.workers.run(relayJob{d: &t.up, finish: true})
		}
		if down {
			t.parker.workers.run(relayJob{d: &t.down, finish: true})
		}
	})
}

func (t *tunnel) setErr(err error) {
	if err != nil {
		t.errOnce.Do(func() { t.err = err })
	}
}

// upFinished: the client is done sending. Its half-close goes on upstream.
func (t *tunnel) upFinished(err error) {
	t.noteEnd(endClient, endOrigin, err)
	switch {
	case err != nil:
		t.setErr(err)
		t.closeBoth()
	case !t.upstream.closeWrite():
		t.closeBoth()
	}
	t.directionDone()
}

// downFinished: upstream is done sending.
func (t *tunnel) downFinished(err error) {
	t.noteEnd(endOrigin, endClient, err)
	switch {
	case err != nil:
		t.setErr(err)
		t.closeBoth()
	case !t.client.closeWrite():
		t.closeBoth()
	}
	t.directionDone()
}

func (t *tunnel) directionDone() {
	if t.running.Add(-1) > 0 {
		return
	}
	t.closeBoth()
	t.watch.stop()
	t.endMu.Lock()
	t.ended = true
	t.endMu.Unlock()
	res := relayResult{up: t.up.moved.Load(), down: t.down.moved.Load(), err: t.err, closedBy: endNames[t.firstEnd.Load()]}
	switch {
	case t.idled.Load():
		res.end = "idle_timeout"
	case errors.Is(t.stopCause(), errShutdownDeadline):
		res.end = "shutdown"
	case errors.Is(t.stopCause(), errTokenRevoked):
		res.end = "token_revoked"
	}
	t.owner.tunnelEnded(res)
}

// errParked reports that a direction went quiet and parked.
var errParked = errors.New("parked")

// errSinkParked reports that a sinking direction found nothing to read and
// is registered with its stream: the stream's sink takes what comes, and
// the direction runs again when the sink cannot.
var errSinkParked = errors.New("parked on a sink")

// parkOnStream registers d to run again when its stream is readable, or
// reports false, registering nothing, when it is readable now.
func (d *direction) parkOnStream() bool {
	d.t.parker.streams.Add(1)
	if d.src().stream.ReadReady(func() { d.t.parker.streams.Add(-1); d.t.parker.workers.run(relayJob{d: d}) }) {
		return true
	}
	d.t.parker.streams.Add(-1)
	return false
}

// run copies until the source ends, then finishes the direction. A socket
// direction that goes quiet parks instead: this run returns (its goroutine
// goes back to relayWorkers), and the parker runs the direction again when
// the socket is readable.
func (d *direction) run() {
	for {
		err := d.copy()
		if err == errSinkParked {
			return
		}
		if err != errParked {
			d.finish(err)
			return
		}
		if d.src().stream != nil {
			if d.parkOnStream() {
				return
			}
			continue // readable already
		}
		if d.t.parker.park(d) == nil {
			return
		}
		d.canPark = false // the parker is closing or broken: block in Read
	}
}

// copy copies with a small buffer while reads are small and a pooled large
// one while they come back full. From a socket it returns errParked after
// parkAfter without bytes, dropping both buffers. The read deadline that
// measures the quiet time is renewed at most twice per parkAfter, so the
// data path does not reset a timer on every read.
func (d *direction) copy() error {
	smallp := smallBufs.get()
	small := *smallp
	buf := small
	var large *[]byte
	var pool *bufPool // where large goes back
	defer func() {
		smallBufs.put(smallp)
		if large != nil {
			pool.put(large)
		}
	}()
	var lease time.Time // the read deadline; zero when d cannot park
	for {
		if d.sinking && d.parkOnStream() {
			return errSinkParked
		}
		if d.canPark {
			if now := time.Now(); lease.Sub(now) < parkAfter/2 {
				lease = now.Add(parkAfter)
				if err := d.src().setReadDeadline(lease); err != nil {
					return err
				}
			}
		}
		nr, rerr := d.src().r.Read(buf)
		if large != nil && rerr == nil && d.src().tls != nil {
			nr += drainTLS(d.src().tls, buf[nr:], lease) // busy: send what has arrived in one write
		}
		if err := d.write(buf[:nr]); err != nil {
			return &writeError{err}
		}
		switch {
		case rerr == nil:
		case rerr == io.EOF:
			return nil
		case d.canPark && errors.Is(rerr, os.ErrDeadlineExceeded):
			// Quiet for parkAfter. crypto/tls keeps a partial record for
			// the next Read and has no complete one buffered, or this Read
			// would have returned it: the socket alone says when there is
			// more.
			if err := d.src().setReadDeadline(time.Time{}); err != nil {
				return err
			}
			return errParked
		default:
			return rerr
		}
		switch {
		case large == nil && nr == len(buf):
			large, pool = largeBufs.get(), &largeBufs
			buf = *large
		case large != nil && pool == &largeBufs && nr == len(buf) && d.dst().stream != nil:
			// A bulk download into an HTTP/2 stream: each Write is a
			// hand-off to the engine's writer and back, so fewer, larger
			// ones cost less CPU per byte (~15% on a GB).
			if h := hugeBufs.get(); h != nil {
				largeBufs.put(large)
				large, pool = h, &hugeBufs
				buf = *large
			}
		case large != nil && nr < shortRead:
			pool.put(large)
			large, buf = nil, small
		}
	}
}

// bufPool is a pool of relay buffers of one size; with limit set, at most
// limit of them are out at once, and get returns nil beyond it.
type bufPool struct {
	pool  sync.Pool
	size  int
	limit int64
	out   atomic.Int64
}

func (p *bufPool) get() *[]byte {
	if p.limit > 0 && p.out.Add(1) > p.limit {
		p.out.Add(-1)
		return nil
	}
	if b, ok := p.pool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, p.size)
	return &b
}

func (p *bufPool) put(b *[]byte) {
	if p.limit > 0 {
		p.out.Add(-1)
	}
	p.pool.Put(b)
}

// write passes b on and accounts for it.
func (d *direction) write(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	d.t.watch.touch()
	// More than one TLS record's worth: gather the records.
	batch := d.dst().batch != nil && len(b) > maxRecordPlaintext
	if batch {
		d.dst().batch.startBatch()
	}
	nw, err := d.dst().write(b)
	if batch {
		if ferr := d.dst().batch.flushBatch(); err == nil {
			err = ferr
		}
	}
	if nw > 0 {
		d.moved.Add(int64(nw))
		d.counted(nw)
	}
	if err == nil && nw < len(b) {
		err = io.ErrShortWrite
	}
	return err
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
	w := &idleWatch{}
	w.init(idle, onIdle)
	return w
}

// init starts a zero idleWatch in place (a tunnel holds its own).
func (w *idleWatch) init(idle time.Duration, onIdle func()) {
	w.idle, w.onIdle, w.base = idle, onIdle, time.Now()
	w.touch()
	if idle > 0 {
		w.timer = time.AfterFunc(idle, w.check)
	}
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
