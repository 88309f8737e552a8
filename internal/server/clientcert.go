package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// clientCerts asks TLS clients for a certificate and verifies it
// (CLIENT_CERT_MODE optional or require) against a trust that SIGHUP
// swaps. crypto/tls does the chain, validity and ExtKeyUsage checks, so
// that ConnectionState.VerifiedChains, which the proxy reads an identity
// from, only ever holds chains it verified; the handshake config of the
// current trust is handed out per handshake by GetConfigForClient.
// VerifyConnection adds the CRL and the identity mapping, on full
// handshakes and resumptions alike.
type clientCerts struct {
	mode            string
	caPath, crlPath string
	log             *slog.Logger
	trust           atomic.Pointer[auth.ClientTrust]
	applyTrust      func(*auth.ClientTrust) // tells the token verifier
	// listeners: the TLS listener's and QUIC's handshake configs.
	mu        sync.Mutex
	listeners []*certListener

	results        *prometheus.CounterVec // result: auth.CertResults
	reloadFailures prometheus.Counter
	// warn bounds the Warn lines of refused certificates: a client
	// holding a revoked certificate can reconnect in a loop. The
	// metric counts every refusal.
	warn *rate.Limiter
}

// newClientCerts sets up client authentication with cfg's trust; apply
// is told the trust in use at start and after each reload (the verifier
// checks requests against it).
func newClientCerts(cfg *config.Config, log *slog.Logger, m *metrics.Metrics, apply func(*auth.ClientTrust)) *clientCerts {
	cc := &clientCerts{
		mode: cfg.ClientCertMode, caPath: cfg.ClientCAPath, crlPath: cfg.ClientCRLPath, log: log, applyTrust: apply,
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_client_cert_auth_total",
			Help: "TLS handshakes by client certificate result: ok, no_cert, unknown_ca, expired, bad_usage (not for client authentication), revoked, bad_identity (no usable urn:pinaka SANs), invalid.",
		}, []string{"result"}),
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_client_trust_reload_failures_total",
			Help: "SIGHUP reloads of CLIENT_CA_PATH / CLIENT_CRL_PATH refused (the files in use before were kept).",
		}),
		warn: rate.NewLimiter(rate.Every(time.Second), 20),
	}
	for _, r := range auth.CertResults {
		cc.results.WithLabelValues(r)
	}
	cc.trust.Store(cfg.ClientTrust)
	apply(cfg.ClientTrust)
	m.Registry.MustRegister(cc.results, cc.reloadFailures,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_client_ca_certificates", Help: "CA certificates in CLIENT_CA_PATH in use.",
		}, func() float64 { return float64(cc.trust.Load().CAs()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_client_crl_entries", Help: "Serials revoked by the CRLs of CLIENT_CRL_PATH in use.",
		}, func() float64 { _, n := cc.trust.Load().CRLs(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_client_crl_next_update_seconds",
			Help: "Earliest nextUpdate of the CRLs in use (unix time; 0 without CRLs). A CRL past it is still enforced: alert on it.",
		}, func() float64 {
			if nu := cc.trust.Load().NextUpdate(); !nu.IsZero() {
				return float64(nu.Unix())
			}
			return 0
		}),
	)
	cc.logTrust("client certificates enabled", cfg.ClientTrust)
	return cc
}

// certListener is one listener's handshake config (TCP's TLS, QUIC's).
type certListener struct {
	base      *tls.Config                // the listener's config, without client authentication
	handshake atomic.Pointer[tls.Config] // base with the current trust
}

// apply turns client authentication on in a listener's config cfg (the
// TLS listener's, QUIC's); reload updates each.
func (cc *clientCerts) apply(cfg *tls.Config) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	l := &certListener{base: cfg.Clone()}
	l.handshake.Store(cc.configFor(l.base, cc.trust.Load()))
	cc.listeners = append(cc.listeners, l)
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return l.handshake.Load(), nil }
}

// configFor is the handshake config of trust t. Session tickets stay
// valid across reloads: crypto/tls gives a config returned by
// GetConfigForClient the ticket keys of the listener's. A resumption is
// checked against the current CAs by crypto/tls and against the current
// CRL by verifyConnection.
func (cc *clientCerts) configFor(base *tls.Config, t *auth.ClientTrust) *tls.Config {
	c := base.Clone()
	c.ClientCAs = t.Pool()
	c.ClientAuth = tls.VerifyClientCertIfGiven
	if cc.mode == config.ClientCertRequire {
		// TLS 1.3 clients get the certificate_required alert, which
		// browsers and curl name.
		c.ClientAuth = tls.RequireAndVerifyClientCert
	}
	c.VerifyConnection = func(cs tls.ConnectionState) error { return cc.verifyConnection(t, cs) }
	return c
}

// certRefusal is a handshake refused by verifyConnection, with its result.
type certRefusal struct {
	result string
	err    error
}

func (e *certRefusal) Error() string { return e.err.Error() }

func (cc *clientCerts) verifyConnection(t *auth.ClientTrust, cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		if cc.mode == config.ClientCertRequire { // crypto/tls refused it already
			return &certRefusal{auth.CertNone, errors.New("client certificate required")}
		}
		cc.results.WithLabelValues(auth.CertNone).Inc()
		return nil
	}
	if result, err := t.CheckVerified(cs.VerifiedChains); result != auth.CertOK {
		return &certRefusal{result, err}
	}
	cc.results.WithLabelValues(auth.CertOK).Inc()
	return nil
}

// handshakeFailed counts and logs a handshake that failed over a client
// certificate; other failures (scanners, timeouts) are not its business.
func (cc *clientCerts) handshakeFailed(client net.Addr, err error) {
	result, why := "", err
	if r, ok := errors.AsType[*certRefusal](err); ok {
		result, why = r.result, r.err
	} else if result = cc.trust.Load().ClassifyFailure(err); result == "" {
		// crypto/tls's error for RequireAndVerifyClientCert without a
		// certificate has no type of its own.
		if cc.mode != config.ClientCertRequire || !strings.Contains(err.Error(), "didn't provide a certificate") {
			return
		}
		result = auth.CertNone
	}
	level := slog.LevelDebug
	// Only a certificate one of our CAs issued says something about a
	// client of ours; anyone can present another.
	switch result {
	case auth.CertExpired, auth.CertRevoked, auth.CertBadIdentity, auth.CertBadUsage:
		if cc.warn.Allow() {
			level = slog.LevelWarn
		}
	}
	cc.log.Log(context.Background(), level, "client certificate refused", "client", client.String(),
		"result", result, "err", why.Error())
	cc.results.WithLabelValues(result).Inc()
}

// reload re-reads CLIENT_CA_PATH and CLIENT_CRL_PATH. Files that do not
// load are refused and the trust in use kept: a typo during a rotation
// must not lock every client out.
func (cc *clientCerts) reload() error {
	t, err := config.LoadClientTrust(cc.caPath, cc.crlPath)
	if err != nil {
		cc.reloadFailures.Inc()
		cc.log.Error("client certificate trust reload refused; keeping the current CAs and CRLs", "err", err)
		return err
	}
	cc.trust.Store(t)
	cc.applyTrust(t)
	cc.mu.Lock()
	for _, l := range cc.listeners {
		l.handshake.Store(cc.configFor(l.base, t))
	}
	cc.mu.Unlock()
	cc.logTrust("client certificate trust reloaded", t)
	return nil
}

func (cc *clientCerts) logTrust(msg string, t *auth.ClientTrust) {
	lists, entries := t.CRLs()
	attrs := []any{"mode", cc.mode, "cas", t.CAs(), "crls", lists, "revoked", entries}
	nu := t.NextUpdate()
	if !nu.IsZero() {
		attrs = append(attrs, "crl_next_update", nu.UTC().Format(time.RFC3339))
	}
	cc.log.Info(msg, attrs...)
	if !nu.IsZero() && time.Now().After(nu) {
		cc.log.Warn("a client CRL is past its nextUpdate; it is still enforced, publish a fresh one",
			"crl_next_update", nu.UTC().Format(time.RFC3339))
	}
}

// ReloadClientCerts re-reads CLIENT_CA_PATH and CLIENT_CRL_PATH (on
// SIGHUP); without client certificates it does nothing. New handshakes
// use the new files; open connections keep what they were accepted with,
// as with the serving certificate.
func (a *App) ReloadClientCerts() error {
	if a.Server.clientCerts == nil {
		return nil
	}
	if err := a.Server.clientCerts.reload(); err != nil {
		return fmt.Errorf("reloading client certificate trust: %w", err)
	}
	return nil
}
