package server

import (
	"context"
	"log/slog"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/tracing"
)

// newTracer builds the OpenTelemetry tracer when an OTLP endpoint is set.
// The proxy's Tracer stays a nil interface otherwise (not a nil
// *tracing.Tracer in one), which is what keeps tracing free when off.
func newTracer(cfg *config.Config, log *slog.Logger) (*tracing.Tracer, proxy.Tracer, error) {
	if !cfg.Tracing.Enabled() {
		if cfg.Tracing.Propagate {
			log.Warn("TRACE_PROPAGATE is set but tracing is off (no OTEL_EXPORTER_OTLP_ENDPOINT): no traceparent is sent")
		}
		return nil, nil, nil
	}
	t, err := tracing.New(context.Background(), cfg.Tracing, log)
	if err != nil || t == nil {
		return nil, nil, err
	}
	return t, t, nil
}
