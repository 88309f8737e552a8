package proxy

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// newRequestID names one request or tunnel in its record and in the
// answer's Pinaka-Request-Id header, so a user can quote it. It is always
// Pinaka's own, never taken from the client: a UUIDv7 (RFC 9562) of the
// request's start, time-ordered like the records, whose 74 random bits come
// from math/rand/v2's generator (ChaCha8, seeded by the system, per thread:
// ~50ns instead of ~1µs for a crypto/rand read under a lock). An id must be
// unique, not secret: two ids of one millisecond collide with probability
// 2⁻⁷⁴.
func newRequestID(start time.Time) string {
	var b [16]byte
	ms := uint64(start.UnixMilli())
	binary.BigEndian.PutUint64(b[0:8], ms<<16)
	binary.BigEndian.PutUint64(b[8:16], rand.Uint64())
	r := rand.Uint32()
	b[6] = 0x70 | byte(r>>8)&0x0f // version 7
	b[7] = byte(r)
	b[8] = 0x80 | b[8]&0x3f // variant 10
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:36], b[10:16])
	return string(out[:])
}

// startTiming gives the request its id (in the record and, from now on,
// in every answer's header) and the trace its upstream phases report to.
func (p *Proxy) startTiming(ctx context.Context, w http.ResponseWriter, q *request) context.Context {
	q.rec.RequestID = newRequestID(q.start)
	w.Header().Set(accesslog.RequestIDHeader, q.rec.RequestID)
	q.timing = timing.New(q.start, nil)
	return timing.NewContext(ctx, q.timing)
}

// stampRequestID sets the header again where an origin's headers were
// copied over the answer's (a refused WebSocket upgrade, a forwarded
// response): the id is ours, never the origin's.
func stampRequestID(h http.Header, q *request) {
	h.Set(accesslog.RequestIDHeader, q.rec.RequestID)
}

// detached is a detached tunnel's owner (tunnelOwner): it counts the
// tunnel's bytes, notes the first byte back from the origin (its
// ttfb_ms), and writes the record and frees the tunnel's slots at the end.
type detached struct {
	p       *Proxy
	q       *request
	release func() // the tunnel-limit slot
	seen    atomic.Bool
}

func (d *detached) tunnelBytes(up, down int) {
	d.p.countTunnelBytes(up, down)
	if down > 0 && !d.seen.Load() {
		d.seen.Store(true)
		d.q.timing.FirstByte()
	}
}

func (d *detached) tunnelEnded(res relayResult) {
	p, q := d.p, d.q
	p.tunnelDone(q, res)
	p.finish(q)
	d.release()
	p.active.remove(q.slot)
}

// finishTiming ends the request's trace and writes its timings into the
// record and the histograms. It runs before the record's duration is
// taken, so that ttfb_ms ≤ duration_ms.
func (p *Proxy) finishTiming(q *request) {
	res := q.timing.Finish()
	m := p.opt.Metrics
	labels := func(outcome string) []string { return []string{q.rec.Protocol, q.metricKind(), outcome} }
	if s := res.Span(timing.DNS); s.Done() {
		d := s.Duration()
		if s.Cached {
			q.rec.DNSMS = accesslog.MillisOf(0) // no query was sent
		} else {
			q.rec.DNSMS = accesslog.MillisOf(d)
		}
		m.DNSLookup.WithLabelValues(labels(dnsOutcome(s))...).Observe(d.Seconds())
	}
	connect := res.Span(timing.Connect)
	if connect.Done() {
		q.rec.ConnectMS = accesslog.MillisOf(connect.Duration())
		m.UpstreamConnect.WithLabelValues(labels(connectOutcome(connect.Err))...).Observe(connect.Duration().Seconds())
	}
	if s := res.Span(timing.TLS); s.Done() {
		q.rec.TLSMS = accesslog.MillisOf(s.Duration())
	}
	if ttfb, ok := res.TTFB(); ok {
		q.rec.TTFBMS = accesslog.MillisOf(ttfb)
		m.UpstreamTTFB.WithLabelValues(labels(metrics.OutcomeOK)...).Observe(ttfb.Seconds())
	} else if outcome := q.ttfbFailure(res, connect); outcome != "" {
		// The origin was reached and failed before its first byte: how
		// long it kept the request waiting is worth a histogram too.
		m.UpstreamTTFB.WithLabelValues(labels(outcome)...).Observe(time.Since(q.start).Seconds())
	}
	if res.Addr.IsValid() {
		q.rec.UpstreamAddr = res.Addr.String()
	}
}

// ttfbFailure is the ttfb outcome of a forwarded request or WebSocket
// bootstrap that reached the origin (connected, or on a pooled connection)
// and got no byte back: timeout or error; "" when that is not what
// happened.
func (q *request) ttfbFailure(res timing.Result, connect timing.Span) string {
	if q.kind == kindConnect || !res.Addr.IsValid() || connect.Done() && connect.Err != nil {
		return ""
	}
	switch q.rec.Error {
	case "upstream_timeout":
		return metrics.OutcomeTimeout
	case "upstream_error", "upstream_tls", "upgrade_invalid":
		return metrics.OutcomeError
	}
	return ""
}

// metricKind is the kind label of the timing histograms.
func (q *request) metricKind() string {
	switch {
	case q.udp:
		return metrics.KindUDP
	case q.kind == kindConnect:
		return metrics.KindConnect
	case q.kind == kindExtendedConnect, q.upgrade:
		return metrics.KindWebSocket
	}
	return metrics.KindForward
}

func dnsOutcome(s timing.Span) string {
	var de *net.DNSError
	switch {
	case s.Err == nil && s.Cached:
		return metrics.OutcomeCached
	case s.Err == nil:
		return metrics.OutcomeOK
	case errors.As(s.Err, &de) && de.IsNotFound:
		return metrics.OutcomeNotFound
	case errors.Is(s.Err, context.Canceled):
		return metrics.OutcomeCanceled
	case errors.As(s.Err, &de) && de.IsTimeout:
		return metrics.OutcomeTimeout
	}
	return metrics.OutcomeError
}

func connectOutcome(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return metrics.OutcomeOK
	case isRefused(err):
		return metrics.OutcomeRefused
	case errors.Is(err, context.Canceled):
		return metrics.OutcomeCanceled
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return metrics.OutcomeTimeout
	}
	return metrics.OutcomeError
}
