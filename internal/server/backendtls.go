package server

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// BackendHTTPClient is the HTTP client for a URL on the backend: the node's
// client certificate and BACKEND_CA_PATH (config.BackendTLS) with Go's
// default transport, redirects not followed, timeout per request (0: none).
// Without BACKEND_* TLS it is nil and callers keep their own default. The
// record shipper uses it for BACKEND_URL, the JWKS_URL refresher when that
// URL is on the backend's host, and a poller of REVOCATION_URL should too.
func BackendHTTPClient(cfg *config.Config, rawURL string, timeout time.Duration) (*http.Client, error) {
	if cfg.BackendTLS == nil || rawURL == "" {
		return nil, nil
	}
	c, err := cfg.BackendTLS.HTTPClient(rawURL, timeout)
	if err != nil {
		return nil, fmt.Errorf("backend TLS: %w", err)
	}
	return c, nil
}

// OnBackend reports whether rawURL is served by BACKEND_URL's host (same
// scheme, host and port): such a URL gets the backend's TLS.
func OnBackend(cfg *config.Config, rawURL string) bool {
	a, err1 := url.Parse(rawURL)
	b, err2 := url.Parse(cfg.BackendURL)
	if err1 != nil || err2 != nil || cfg.BackendURL == "" {
		return false
	}
	return strings.EqualFold(a.Scheme, b.Scheme) && strings.EqualFold(a.Host, b.Host)
}

// registerBackendTLSMetrics publishes the client certificate's expiry (for
// the rotation alert) and counts refused reloads.
func registerBackendTLSMetrics(m *metrics.Metrics, cfg *config.Config) prometheus.Counter {
	failures := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pinaka_backend_tls_reload_failures_total",
		Help: "SIGHUP reloads that refused BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH or BACKEND_CA_PATH (the one in use was kept).",
	})
	m.Registry.MustRegister(failures)
	if cfg.BackendTLS != nil && cfg.BackendTLS.Leaf() != nil {
		bt := cfg.BackendTLS
		m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_backend_client_certificate_not_after_seconds",
			Help: "Expiry of the node's client certificate towards the backend (unix time); moves on SIGHUP reload.",
		}, func() float64 { return float64(bt.Leaf().NotAfter.Unix()) }))
	}
	return failures
}

// ReloadBackendTLS re-reads the node's client certificate and
// BACKEND_CA_PATH (on SIGHUP). A bad file is refused, logged and counted,
// and the one in use kept; new connections to the backend get what was
// loaded, open ones keep theirs.
func (a *App) ReloadBackendTLS() error {
	bt := a.Config.BackendTLS
	if bt == nil {
		return nil
	}
	if err := bt.Reload(); err != nil {
		a.backendTLSFailures.Inc()
		a.log.Error("backend TLS reload refused in part; keeping what was in use for it", "err", err)
		return err
	}
	attrs := []any{"client_cas", bt.CAs()}
	if leaf := bt.Leaf(); leaf != nil {
		attrs = append(attrs, "client_certificate", leaf.Subject.String(), "not_after", leaf.NotAfter)
	}
	a.log.Info("backend TLS reloaded", attrs...)
	return nil
}
