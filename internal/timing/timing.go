// Package timing measures where one proxied request's time went upstream:
// resolving the origin's name, connecting to it, the TLS handshake Pinaka
// does with it, and its first byte. The egress dialer, the HTTP transport
// (through httptrace) and the tunnel relay report to the Trace carried in
// the request's context; the proxy reads the result into the record and the
// metrics when the request ends. A tracer can watch the same phases as they
// end through the Trace's OnPhase callback.
package timing

import (
	"context"
	"crypto/tls"
	"net"
	"net/http/httptrace"
	"net/netip"
	"sync"
	"time"
)

// Phase is one step of reaching an origin.
type Phase int

// The phases, in the order a fresh connection goes through them.
const (
	DNS     Phase = iota // resolving the origin's name
	Connect              // TCP connection, every address tried
	TLS                  // TLS handshake with the origin (https forwarding, wss)
	numPhases
)

func (p Phase) String() string {
	switch p {
	case DNS:
		return "dns"
	case Connect:
		return "connect"
	case TLS:
		return "tls"
	}
	return "unknown"
}

// Span is one phase of one request.
type Span struct {
	Start, End time.Time
	Err        error // nil when the phase succeeded
	// Cached (DNS only): the resolver answered from its cache; no query
	// was sent.
	Cached bool
}

// Done reports whether the phase ran to its end (successfully or not).
func (s Span) Done() bool { return !s.End.IsZero() }

// Duration is how long the phase took; 0 when it did not end.
func (s Span) Duration() time.Duration {
	if !s.Done() {
		return 0
	}
	return s.End.Sub(s.Start)
}

// Trace collects one request's phases. It is safe for concurrent use and
// its methods do nothing on a nil *Trace, so callers need not check.
//
// Net/http's transport may go on dialing after the request that started
// the dial gave up, and may hand a request a connection another request
// dialed: phases arriving after Finish are dropped, and GotConn forgets the
// phases of a dial whose connection the request did not get.
//
// A tunnel keeps its request's Trace as long as it is open (its first
// byte may come late), so the Trace keeps its times as offsets from start
// (phase), not as time.Time values: 224 bytes instead of 336 (352 with
// the allocator's rounding).
type Trace struct {
	start time.Time
	// OnPhase, when set, is called as each phase ends, on the goroutine
	// that ran it, outside the Trace's lock (a tracer's span hook).
	onPhase func(Phase, Span)

	mu        sync.Mutex
	finished  bool
	foreign   bool // the request's connection was not dialed for it: dial phases are not on its path
	gotFirst  bool // firstByte is set
	spans     [numPhases]phase
	firstByte time.Duration // after start
	addr      netip.AddrPort
	conn      net.Conn // the connection the dialer made for this request
}

// phase is a Span as a Trace keeps it.
type phase struct {
	start, end   time.Duration // after the trace's start
	err          error
	begun, ended bool
	cached       bool
}

// at is the time d after the trace's start. The start carries the
// monotonic clock reading (time.Now), so durations between the times a
// trace returns are those measured.
func (t *Trace) at(d time.Duration) time.Time { return t.start.Add(d) }

// span is phase p as a Span.
func (t *Trace) span(p Phase) Span {
	ph := &t.spans[p]
	s := Span{Err: ph.err, Cached: ph.cached}
	if ph.begun {
		s.Start = t.at(ph.start)
	}
	if ph.ended {
		s.End = t.at(ph.end)
	}
	return s
}

// New starts a trace for a request that started at start, a clock reading
// (time.Now). onPhase may be nil.
func New(start time.Time, onPhase func(Phase, Span)) *Trace {
	return &Trace{start: start, onPhase: onPhase}
}

type traceKey struct{}

// NewContext returns ctx carrying t.
func NewContext(ctx context.Context, t *Trace) context.Context {
	return context.WithValue(ctx, traceKey{}, t)
}

// FromContext returns the Trace in ctx, or nil.
func FromContext(ctx context.Context) *Trace {
	t, _ := ctx.Value(traceKey{}).(*Trace)
	return t
}

// Begin marks the start of phase p. A phase begun again (a retried dial)
// starts over.
func (t *Trace) Begin(p Phase) {
	if t == nil {
		return
	}
	now := time.Now()
	t.mu.Lock()
	if !t.finished && !t.foreign {
		t.spans[p] = phase{start: now.Sub(t.start), begun: true}
	}
	t.mu.Unlock()
}

// End marks the end of phase p; err is nil on success.
func (t *Trace) End(p Phase, err error) { t.end(p, err, false, netip.AddrPort{}, nil) }

// EndDNS ends the DNS phase; cached says the answer came from the
// resolver's cache.
func (t *Trace) EndDNS(cached bool, err error) { t.end(DNS, err, cached, netip.AddrPort{}, nil) }

// EndConnect ends the connect phase: addr is the address connected to, or
// the last one tried when err is set; conn the connection made, if any.
func (t *Trace) EndConnect(addr netip.AddrPort, conn net.Conn, err error) {
	t.end(Connect, err, false, addr, conn)
}

func (t *Trace) end(p Phase, err error, cached bool, addr netip.AddrPort, conn net.Conn) {
	if t == nil {
		return
	}
	now := time.Now()
	t.mu.Lock()
	ph := &t.spans[p]
	if t.finished || t.foreign || !ph.begun {
		t.mu.Unlock()
		return
	}
	ph.end, ph.ended, ph.err, ph.cached = now.Sub(t.start), true, err, cached
	if addr.IsValid() {
		t.addr = addr
	}
	if conn != nil {
		t.conn = conn
	}
	s := t.span(p)
	t.mu.Unlock()
	if t.onPhase != nil {
		t.onPhase(p, s)
	}
}

// FirstByte marks the arrival of the origin's first byte; only the first
// call counts.
func (t *Trace) FirstByte() {
	if t == nil {
		return
	}
	now := time.Now()
	t.mu.Lock()
	if !t.finished && !t.gotFirst {
		t.firstByte, t.gotFirst = now.Sub(t.start), true
	}
	t.mu.Unlock()
}

// GotConn tells the trace which connection the request is sent on (HTTP
// forwarding). Unless it is the one dialed for this request, the dial
// phases recorded were not on the request's path (a pooled connection, or
// one another request dialed) and are forgotten; the address is the
// connection's in every case.
func (t *Trace) GotConn(c net.Conn) {
	if t == nil || c == nil {
		return
	}
	under := c
	if tc, ok := c.(*tls.Conn); ok {
		under = tc.NetConn()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.finished {
		return
	}
	if t.conn == nil || under != t.conn {
		t.spans = [numPhases]phase{}
		t.foreign = true
	}
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		t.addr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
}

// ClientTrace is the httptrace hooks that report the transport's part of a
// forwarded request: its TLS handshake, the connection it got and the
// response's first byte. (DNS and connect are reported by the dialer.)
func (t *Trace) ClientTrace() *httptrace.ClientTrace {
	return &httptrace.ClientTrace{
		TLSHandshakeStart:    func() { t.Begin(TLS) },
		TLSHandshakeDone:     func(_ tls.ConnectionState, err error) { t.End(TLS, err) },
		GotConn:              func(i httptrace.GotConnInfo) { t.GotConn(i.Conn) },
		GotFirstResponseByte: t.FirstByte,
	}
}

// Result is what a finished trace measured.
type Result struct {
	Start time.Time
	// Spans holds each phase that ended on the request's path, indexed
	// by Phase; a phase that did not happen for this request (no name to
	// resolve, a pooled connection, plain http) is the zero Span.
	Spans     [numPhases]Span
	FirstByte time.Time      // zero when no byte came from the origin
	Addr      netip.AddrPort // the origin address used or last tried; invalid when none
}

// Span returns phase p's span.
func (r Result) Span(p Phase) Span { return r.Spans[p] }

// TTFB is the time from the request's start to the origin's first byte.
func (r Result) TTFB() (time.Duration, bool) {
	if r.FirstByte.IsZero() {
		return 0, false
	}
	return r.FirstByte.Sub(r.Start), true
}

// Finish ends the trace: later reports are ignored, so a caller that takes
// the time after Finish gets a duration no shorter than any phase's end.
// Phases begun and not ended are left out.
func (t *Trace) Finish() Result {
	if t == nil {
		return Result{}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.finished = true
	r := Result{Start: t.start, Addr: t.addr}
	if t.gotFirst {
		r.FirstByte = t.at(t.firstByte)
	}
	for p := range t.spans {
		if t.spans[p].ended {
			r.Spans[p] = t.span(Phase(p))
		}
	}
	return r
}
