package proxy

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// Tracer makes a span of each request or tunnel (internal/tracing builds it
// on OpenTelemetry). Options.Tracer is nil when tracing is off: the request
// path then costs one nil check, nothing is allocated for it.
type Tracer interface {
	// Start begins the span of a request that started at start; the
	// returned context is the request's from then on.
	Start(ctx context.Context, r *http.Request, start time.Time) (context.Context, RequestSpan)
}

// RequestSpan is one request's span.
type RequestSpan interface {
	// Inject writes the span's context (W3C traceparent) into the headers
	// of the request sent to the origin, when the tracer propagates.
	Inject(h http.Header)
	// End ends the span once the record is complete. The record is only
	// read, during the call.
	End(e SpanEnd)
}

// SpanEnd is what a request's span is made of: its record, its upstream
// phases and the authorization step, each with the times measured for the
// record, so that spans and records agree and nothing is measured twice.
type SpanEnd struct {
	Record *accesslog.Record
	Kind   string // connect, forward, websocket (the histograms' kind)
	// Auth is the authorization step (credentials, region, rate limit);
	// not Done when the request never reached it, Err set when it
	// refused the request.
	Auth   timing.Span
	Timing timing.Result
	End    time.Time
}

// errAuthRefused marks a refused authorization step in its span; the
// record's error says why.
var errAuthRefused = errors.New("refused")

// startSpan begins the request's span when a tracer is set.
func (p *Proxy) startSpan(ctx context.Context, r *http.Request, q *request) context.Context {
	if p.opt.Tracer == nil {
		return ctx
	}
	ctx, q.span = p.opt.Tracer.Start(ctx, r, q.start)
	return ctx
}

// endSpan ends the request's span; the record is complete.
func (p *Proxy) endSpan(q *request) {
	if q.span == nil {
		return
	}
	q.span.End(SpanEnd{
		Record: &q.rec,
		Kind:   q.metricKind(),
		Auth:   authSpan(q.auth),
		Timing: q.timing.Finish(), // Finish again returns the same result
		End:    time.Now(),
	})
}

// authSpan is the authorization step's span, zero when it was not taken.
func authSpan(s *timing.Span) timing.Span {
	if s == nil {
		return timing.Span{}
	}
	return *s
}

// injectSpan gives a request to the origin the span's traceparent.
func injectSpan(q *request, h http.Header) {
	if q != nil && q.span != nil {
		q.span.Inject(h)
	}
}
