package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// udpMaxPayload is the largest UDP payload a flow relays, either way; a
// larger one is dropped and counted (oversize). 1500 bytes, an Ethernet
// MTU: a datagram carries no more on the paths a browser's QUIC or DNS
// uses, and none larger fits the one QUIC packet an HTTP/3 datagram must
// fit in (the client sees those as too_large instead).
const udpMaxPayload = 1500

// capsuleDatagram is the DATAGRAM capsule (RFC 9297 §3.5): an HTTP
// Datagram sent on the request stream instead of in a QUIC datagram.
const capsuleDatagram = 0x00

// maxContextIDLen is the longest encoding of a context id (a QUIC
// variable-length integer).
const maxContextIDLen = 8

// udpFlow is one CONNECT-UDP flow: an HTTP/3 request stream with its
// datagrams on the client's side, a connected UDP socket on the target's.
//
// Three goroutines run it, each blocked on one source: upstream takes the
// request's datagrams to the socket, downstream the socket's datagrams to
// the client, and capsules reads the request stream (capsules; its end is
// the end of the flow, RFC 9298 §3). The first of them to end, an idle
// timeout, or stop (drain deadline, revocation) closes everything; the last
// to end writes the record. Buffers: downstream's datagram buffer
// (udpMaxPayload+2 bytes); datagrams from the client are quic-go's, one at
// a time; a DATAGRAM capsule's value is read into a buffer of its own size,
// at most udpMaxPayload plus its context id. quic-go queues at most 32 unread
// datagrams per stream and drops the rest itself.
type udpFlow struct {
	p       *Proxy
	q       *request
	st      httpx.Stream
	dg      httpx.Datagrams
	conn    *net.UDPConn
	release func() // the token's UDP flow slot

	// ctx ends ReceiveDatagram when the flow closes.
	ctx    context.Context
	cancel context.CancelFunc
	watch  *idleWatch

	up, down, upBytes, downBytes, dropped atomic.Int64

	cause     atomic.Pointer[error] // why stop ended it; nil until then
	idled     atomic.Bool
	closing   atomic.Bool  // close has begun: later ends are its doing
	firstEnd  atomic.Int32 // endNone until a goroutine ends on its own
	running   atomic.Int32
	closeOnce sync.Once
	errOnce   sync.Once
	err       error
}

// udpCounters are the flow metrics' series, looked up once.
type udpCounters struct {
	up, down                                          prometheus.Counter
	oversize, contextID, tooLarge, unreachable, malfm prometheus.Counter
}

func newUDPCounters(m *metrics.Metrics) udpCounters {
	return udpCounters{
		up:          m.UDPDatagrams.WithLabelValues(metrics.DirectionUpstream),
		down:        m.UDPDatagrams.WithLabelValues(metrics.DirectionDownstream),
		oversize:    m.UDPDropped.WithLabelValues(metrics.UDPDropOversize),
		contextID:   m.UDPDropped.WithLabelValues(metrics.UDPDropContextID),
		tooLarge:    m.UDPDropped.WithLabelValues(metrics.UDPDropTooLarge),
		unreachable: m.UDPDropped.WithLabelValues(metrics.UDPDropUnreachable),
		malfm:       m.UDPDropped.WithLabelValues(metrics.UDPDropMalformed),
	}
}

// startFlow runs a flow whose handler returns, as detachTunnel runs a
// tunnel: in the drain set as its stop function, watched for revocation
// of its token, holding release until it ends.
func (p *Proxy) startFlow(q *request, st httpx.Stream, dg httpx.Datagrams, conn *net.UDPConn, release func()) {
	q.detached = true
	p.opt.Metrics.UDPFlows.Inc()
	f := &udpFlow{p: p, q: q, st: st, dg: dg, conn: conn, release: release}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.running.Store(3)
	f.watch = newIdleWatch(p.opt.UDPIdleTimeout, func() { f.idled.Store(true); f.close() })
	q.slot = p.active.addFunc(f.stop, true)
	if p.watchToken(q.slot, q.rec.TokenID) {
		p.revoked.tunnels.Add(1)
		f.stop(errTokenRevoked)
	}
	go f.upstream()
	go f.downstream()
	go f.capsules()
}

// stop ends the flow from outside, with cause (errShutdownDeadline,
// errTokenRevoked) for its record; the first cause is kept.
func (f *udpFlow) stop(cause error) {
	f.cause.CompareAndSwap(nil, &cause)
	f.close()
}

// close ends the flow: the request stream gets our FIN (closing the stream
// is how a flow ends, RFC 9298 §3) and its receive side is cancelled, the
// socket is closed, and each goroutine wakes to an error.
func (f *udpFlow) close() {
	f.closeOnce.Do(func() {
		f.closing.Store(true)
		f.cancel()
		_ = f.conn.Close()
		_ = f.st.SetReadDeadline(aLongTimeAgo)
		_ = f.st.CloseWrite()
		_ = f.st.Close()
	})
}

// exit is how each goroutine ends: side is who ended the flow if nothing
// else did first.
func (f *udpFlow) exit(side int32, err error) {
	if !f.closing.Load() {
		f.firstEnd.CompareAndSwap(endNone, side)
		if err != nil {
			f.errOnce.Do(func() { f.err = err })
		}
	}
	f.close()
	if f.running.Add(-1) == 0 {
		f.finish()
	}
}

// finish writes the flow's record and gives back what it held.
func (f *udpFlow) finish() {
	f.watch.stop()
	p, q := f.p, f.q
	res := relayResult{up: f.upBytes.Load(), down: f.downBytes.Load(), closedBy: endNames[f.firstEnd.Load()], err: f.err}
	switch cause := f.cause.Load(); {
	case f.idled.Load():
		res.end = "idle_timeout"
	case cause != nil && errors.Is(*cause, errShutdownDeadline):
		res.end = "shutdown"
	case cause != nil && errors.Is(*cause, errTokenRevoked):
		res.end = "token_revoked"
	}
	p.opt.Metrics.UDPFlows.Dec()
	up, down, dropped := f.up.Load(), f.down.Load(), f.dropped.Load()
	q.rec.DatagramsUp, q.rec.DatagramsDown, q.rec.DatagramsDropped = &up, &down, &dropped
	p.recordRelayEnd(q, res)
	p.finish(q)
	f.release()
	p.active.remove(q.slot)
}

func (f *udpFlow) drop(c prometheus.Counter) {
	f.dropped.Add(1)
	c.Inc()
}

// upstream relays the request's HTTP Datagrams to the target. It ends
// when the stream's receive side does (the client closed or reset it).
func (f *udpFlow) upstream() {
	for {
		b, err := f.dg.ReceiveDatagram(f.ctx)
		if err != nil {
			f.exit(endClient, err)
			return
		}
		if err := f.toTarget(b); err != nil {
			f.exit(endError, err)
			return
		}
	}
}

// toTarget sends the UDP payload of one HTTP Datagram (a context id, then
// the payload) to the target. Datagrams that are not a UDP payload of
// context id 0, or are too large, are dropped and counted (RFC 9298 §4:
// unknown context ids are dropped). An ICMP unreachable from the target's
// host drops the datagram, not the flow. The error is the socket's.
func (f *udpFlow) toTarget(b []byte) error {
	id, n, ok := parseVarint(b)
	switch {
	case !ok:
		f.drop(f.p.udpm.malfm)
		return nil
	case id != 0:
		f.drop(f.p.udpm.contextID)
		return nil
	case len(b)-n > udpMaxPayload:
		f.drop(f.p.udpm.oversize)
		return nil
	}
	f.watch.touch()
	payload := b[n:]
	if _, err := f.conn.Write(payload); err != nil {
		if isRefused(err) {
			f.drop(f.p.udpm.unreachable)
			return nil
		}
		return err
	}
	f.up.Add(1)
	f.upBytes.Add(int64(len(payload)))
	f.p.udpm.up.Inc()
	f.p.opt.Metrics.BytesUpstream.Add(float64(len(payload)))
	return nil
}

// downstream relays the target's datagrams to the client, each as an HTTP
// Datagram with context id 0. It ends when the socket fails or is closed.
func (f *udpFlow) downstream() {
	// buf[0] is context id 0 (a one-byte variable-length integer); one
	// byte beyond udpMaxPayload tells an oversize datagram, which the
	// kernel truncates to the buffer, from a full one.
	buf := make([]byte, 1+udpMaxPayload+1)
	sawFirst := false // only this goroutine sends to the client
	for {
		n, err := f.conn.Read(buf[1:])
		if err != nil {
			if isRefused(err) {
				// An ICMP unreachable for a datagram we sent: that one
				// was lost, the flow goes on.
				f.drop(f.p.udpm.unreachable)
				continue
			}
			f.exit(endError, err)
			return
		}
		if n > udpMaxPayload {
			f.drop(f.p.udpm.oversize)
			continue
		}
		f.watch.touch()
		if err := f.dg.SendDatagram(buf[:1+n]); err != nil {
			if errors.Is(err, httpx.ErrDatagramTooLarge) {
				f.drop(f.p.udpm.tooLarge)
				continue
			}
			f.exit(endClient, err)
			return
		}
		if !sawFirst {
			sawFirst = true
			f.q.timing.FirstByte()
		}
		f.down.Add(1)
		f.downBytes.Add(int64(n))
		f.p.udpm.down.Inc()
		f.p.opt.Metrics.BytesDownstream.Add(float64(n))
	}
}

// capsules reads the request stream until it ends, which ends the flow.
// The stream carries capsules (RFC 9297 §3.2): DATAGRAM capsules are
// relayed like datagrams, the others skipped; no capsule is held in
// memory beyond one datagram's size.
func (f *udpFlow) capsules() {
	side, err := f.readCapsules()
	f.exit(side, err)
}

func (f *udpFlow) readCapsules() (int32, error) {
	// One buffer for every DATAGRAM capsule: toTarget keeps nothing of it.
	var buf []byte
	for {
		typ, err := readVarint(f.st)
		if err != nil {
			return endClient, err // io.EOF: the client closed the stream
		}
		length, err := readVarint(f.st)
		if err != nil {
			return endClient, unexpected(err)
		}
		if typ == capsuleDatagram && length <= maxContextIDLen+udpMaxPayload {
			if buf == nil {
				buf = make([]byte, maxContextIDLen+udpMaxPayload)
			}
			b := buf[:length]
			if _, err := io.ReadFull(f.st, b); err != nil {
				return endClient, unexpected(err)
			}
			if err := f.toTarget(b); err != nil {
				return endError, err
			}
			continue
		}
		if typ == capsuleDatagram {
			f.drop(f.p.udpm.oversize)
		}
		// length < 2^62: a variable-length integer holds no more.
		if _, err := io.CopyN(io.Discard, f.st, int64(length)); err != nil {
			return endClient, unexpected(err)
		}
	}
}

// unexpected: a stream that ends inside a capsule was cut, not closed.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parseVarint decodes the QUIC variable-length integer (RFC 9000 §16) at
// the start of b: its value and length, or false if b is too short.
func parseVarint(b []byte) (v uint64, n int, ok bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	n = 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0, false
	}
	v = uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, n, true
}

// readVarint reads one QUIC variable-length integer from r.
func readVarint(r io.Reader) (uint64, error) {
	var b [8]byte
	if _, err := io.ReadFull(r, b[:1]); err != nil {
		return 0, err
	}
	n := 1 << (b[0] >> 6)
	if n > 1 {
		if _, err := io.ReadFull(r, b[1:n]); err != nil {
			return 0, unexpected(err)
		}
	}
	v, _, _ := parseVarint(b[:n])
	return v, nil
}
