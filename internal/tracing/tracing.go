// Package tracing exports a span per proxied request or tunnel to an
// OpenTelemetry collector over OTLP/HTTP. It exists only when an OTLP
// endpoint is configured: without one no SDK object is created and the
// proxy's Tracer is nil.
//
// The spans are built from what the request's record already measured
// (internal/timing's phases, the authorization step, the record's fields),
// with their recorded start and end times, when the request ends; only the
// root span is started when the request starts, so that its context can go
// to the origin in a traceparent header.
package tracing

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// Tracer is a proxy.Tracer on the OpenTelemetry SDK.
type Tracer struct {
	provider  *sdktrace.TracerProvider
	tracer    trace.Tracer
	propagate bool
	tc        propagation.TraceContext
}

// New builds the exporter and the tracer provider from cfg, or returns nil
// when tracing is not enabled. The SDK reads the standard OTEL_* variables
// itself (endpoint, headers, timeout, compression, certificates, sampler,
// batching); those that came from the .env file are put in the process
// environment first so that it sees them too. The service name defaults to
// "pinaka".
func New(ctx context.Context, cfg config.Tracing, log *slog.Logger) (*Tracer, error) {
	if !cfg.Enabled() {
		return nil, nil
	}
	for k, v := range cfg.Env {
		if _, set := os.LookupEnv(k); !set {
			if err := os.Setenv(k, v); err != nil {
				return nil, fmt.Errorf("tracing: setting %s: %w", k, err)
			}
		}
	}
	exp, err := otlptracehttp.New(ctx)
	if err != nil {
		return nil, fmt.Errorf("tracing: creating the OTLP exporter: %w", err)
	}
	// Later detectors win: OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
	// override the default name.
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "pinaka")),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(),
	)
	if err != nil {
		_ = exp.Shutdown(ctx)
		return nil, fmt.Errorf("tracing: OTEL_RESOURCE_ATTRIBUTES or OTEL_SERVICE_NAME: %w", err)
	}
	// The sampler comes from OTEL_TRACES_SAMPLER (default
	// parentbased_always_on) and the batching from OTEL_BSP_*: the SDK
	// reads them when no option says otherwise. The batch processor's
	// queue is bounded; spans beyond it are dropped, never waited for.
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(res),
	)
	if log != nil {
		log.Info("tracing on: exporting spans over OTLP/HTTP", "propagate", cfg.Propagate)
	}
	return &Tracer{
		provider:  tp,
		tracer:    tp.Tracer("github.com/pinaka-proxy/pinaka"),
		propagate: cfg.Propagate,
	}, nil
}

// Shutdown exports the spans still queued, within ctx.
func (t *Tracer) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	return t.provider.Shutdown(ctx)
}

// Start begins a request's root span. A client's traceparent is continued
// only with TRACE_PROPAGATE: otherwise any client could choose trace ids
// and, through the parent-based sampler, force its requests to be sampled.
func (t *Tracer) Start(ctx context.Context, r *http.Request, start time.Time) (context.Context, proxy.RequestSpan) {
	parent := context.Background()
	if t.propagate {
		parent = t.tc.Extract(parent, propagation.HeaderCarrier(r.Header))
	}
	// The span is not put in the request's context: nothing below the
	// proxy makes spans of its own; Inject reads it from requestSpan.
	_, span := t.tracer.Start(parent, r.Method,
		trace.WithTimestamp(start), trace.WithSpanKind(trace.SpanKindServer))
	return ctx, &requestSpan{t: t, span: span}
}

type requestSpan struct {
	t    *Tracer
	span trace.Span
}

// Inject sets traceparent (and tracestate) on a request to the origin, with
// TRACE_PROPAGATE only.
func (s *requestSpan) Inject(h http.Header) {
	if !s.t.propagate {
		return
	}
	s.t.tc.Inject(trace.ContextWithSpan(context.Background(), s.span), propagation.HeaderCarrier(h))
}

// End adds the request's attributes and its children, then ends it. No
// credential is ever an attribute: the token's id and the target, not the
// token.
func (s *requestSpan) End(e proxy.SpanEnd) {
	span := s.span
	if !span.IsRecording() {
		span.End(trace.WithTimestamp(e.End))
		return
	}
	rec := e.Record
	attrs := []attribute.KeyValue{
		attribute.String("pinaka.request_id", rec.RequestID),
		attribute.String("pinaka.kind", e.Kind),
		attribute.String("network.protocol", rec.Protocol),
		attribute.String("http.request.method", rec.Method),
		attribute.Int("http.response.status_code", rec.StatusCode),
		attribute.String("pinaka.target", rec.TargetURL),
		attribute.String("pinaka.probe_node", rec.ProbeNode),
		attribute.Int64("pinaka.request_size", rec.RequestSize),
		attribute.Int64("pinaka.response_size", rec.ResponseSize),
	}
	if rec.TokenID != "" {
		attrs = append(attrs, attribute.String("pinaka.token_id", rec.TokenID))
	}
	if rec.Region != "" {
		attrs = append(attrs, attribute.String("pinaka.region", rec.Region))
	}
	if rec.UpstreamAddr != "" {
		attrs = append(attrs, attribute.String("network.peer.address", rec.UpstreamAddr))
	}
	if rec.RateLimited {
		attrs = append(attrs, attribute.Bool("pinaka.rate_limited", true))
	}
	if rec.CloseReason != "" {
		attrs = append(attrs, attribute.String("pinaka.close_reason", rec.CloseReason))
	}
	if rec.Error != "" {
		attrs = append(attrs, attribute.String("error.type", rec.Error))
	}
	span.SetAttributes(attrs...)
	if !rec.Success {
		span.SetStatus(codes.Error, rec.Error)
	}

	ctx := trace.ContextWithSpan(context.Background(), span)
	// Children, from the times the record was made of.
	if e.Auth.Done() {
		c := s.child(ctx, "auth", e.Auth)
		if e.Auth.Err != nil {
			c.SetStatus(codes.Error, rec.Error)
		}
		c.End(trace.WithTimestamp(e.Auth.End))
	}
	last := e.Auth.End // when the request went on towards the origin
	for _, p := range []timing.Phase{timing.DNS, timing.Connect, timing.TLS} {
		ps := e.Timing.Span(p)
		if !ps.Done() {
			continue
		}
		c := s.child(ctx, p.String(), ps)
		if p == timing.DNS {
			c.SetAttributes(attribute.Bool("pinaka.dns.cached", ps.Cached))
		}
		if p == timing.Connect && e.Timing.Addr.IsValid() {
			c.SetAttributes(attribute.String("network.peer.address", e.Timing.Addr.String()))
		}
		if ps.Err != nil {
			c.SetStatus(codes.Error, ps.Err.Error())
		}
		c.End(trace.WithTimestamp(ps.End))
		if ps.End.After(last) {
			last = ps.End
		}
	}
	// The wait for the origin's first byte: from the request's way to it
	// being open (the last phase's end) to that byte, or to the end when
	// none came.
	if e.Timing.Addr.IsValid() && !last.IsZero() {
		up := timing.Span{Start: last, End: e.Timing.FirstByte}
		if up.End.IsZero() {
			up.End = e.End
		}
		if up.End.Before(up.Start) {
			up.Start = up.End // a pooled connection can answer before the dial phases of another end
		}
		c := s.child(ctx, "upstream response", up)
		if e.Timing.FirstByte.IsZero() {
			c.SetStatus(codes.Error, "no response from the origin")
		} else if e.Kind != "connect" {
			c.SetAttributes(attribute.Int("http.response.status_code", rec.StatusCode))
		}
		c.End(trace.WithTimestamp(up.End))
	}
	span.End(trace.WithTimestamp(e.End))
}

func (s *requestSpan) child(ctx context.Context, name string, ts timing.Span) trace.Span {
	_, c := s.t.tracer.Start(ctx, name, trace.WithTimestamp(ts.Start), trace.WithSpanKind(trace.SpanKindInternal))
	return c
}
