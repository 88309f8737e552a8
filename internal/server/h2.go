package server

import (
	"context"
	"log/slog"
	"net"
	"net/http"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/h2srv"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// newH2Server sets up Pinaka's own HTTP/2 engine (internal/h2srv) for the
// proxy listener.
func newH2Server(cfg *config.Config, log *slog.Logger, h http.Handler, m *metrics.Metrics) *h2srv.Server {
	return h2srv.New(h2srv.Config{
		Handler: h,
		// Requests find their connection's listener slot through the
		// context, to mark it authenticated (per-address caps).
		BaseContext:          func(c net.Conn) context.Context { return ratelimit.WithConn(context.Background(), c) },
		MaxConcurrentStreams: cfg.MaxConcurrentStreams,
		MaxHeaderBytes:       cfg.MaxHeaderBytes,
		HeaderReadTimeout:    cfg.HeaderReadTimeout,
		IdleTimeout:          cfg.IdleTimeout,
		// Half as long again as the stall guard's limit: a tunnel's own
		// idle watch (TUNNEL_IDLE_TIMEOUT) ends a stalled tunnel first, and
		// names it; this catches forwarded responses, which have none.
		WriteStallTimeout: stallLimit(cfg) * 3 / 2,
		BodyBudget:        cfg.HTTP2BodyBufferBytes,
		Batch:             proxy.BatchWrites,
		Log:               log,
		Hooks: h2srv.Hooks{
			GoAway:       func(reason string) { m.HTTP2GoAways.WithLabelValues(reason).Inc() },
			StreamError:  func(reason string) { m.HTTP2StreamErrors.WithLabelValues(reason).Inc() },
			Unproductive: func(kind string) { m.HTTP2Unproductive.WithLabelValues(kind).Inc() },
			BodyBuffered: func(delta int64) { m.HTTP2BodyBuffered.Add(float64(delta)) },
			Reserved:     func(delta int64) { m.HTTP2BodyReserved.Add(float64(delta)) },
		},
	})
}
