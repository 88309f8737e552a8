package server

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// revocationStartTimeout bounds the fetch before the listener opens: the
// node starts with the freshest list it can get quickly, else the saved
// one, else none (revocation denies, so starting without a list is how a
// node ran before it had any).
const revocationStartTimeout = 5 * time.Second

// newRevocations builds the revocation list and its poller from cfg,
// loads the list saved under STATE_DIR and fetches once. With REDIS_URL
// and no REVOCATION_URL there is a list without a poller, fed by Redis
// alone; with neither, no list.
func newRevocations(cfg *config.Config, log *slog.Logger, m *metrics.Metrics) (*revocation.List, *revocation.Poller, error) {
	if cfg.RevocationURL == "" {
		if cfg.RedisURL == "" {
			return nil, nil, nil
		}
		log.Warn("REDIS_URL without REVOCATION_URL: revocations arrive only through Redis pub/sub; " +
			"a node that is started or disconnected when one is published never learns of it")
		list := revocation.NewList()
		registerListMetrics(m, list)
		return list, nil, nil
	}
	// The list comes from the backend: the node's certificate and
	// BACKEND_CA_PATH apply (nil without them: the poller's own client).
	client, err := BackendHTTPClient(cfg, cfg.RevocationURL, revocation.FetchTimeout)
	if err != nil {
		return nil, nil, fmt.Errorf("REVOCATION_URL: %w", err)
	}
	list := revocation.NewList()
	poller := revocation.NewPoller(revocation.PollerOptions{
		URL: cfg.RevocationURL, APIKey: cfg.BackendAPIKey, Interval: cfg.RevocationInterval,
		StateDir: cfg.StateDir, Log: log, Client: client,
	}, list)
	if err := poller.LoadSaved(); err != nil {
		// Our own file, not configuration: a damaged one must not keep
		// the node down; the fetch below replaces it.
		log.Error("ignoring the saved revocation list", "err", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), revocationStartTimeout)
	defer cancel()
	_ = poller.Poll(ctx) // a failure is logged and counted by Poll
	registerListMetrics(m, list)
	registerRevocationMetrics(m, poller)
	return list, poller, nil
}

func registerListMetrics(m *metrics.Metrics, l *revocation.List) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_revoked_tokens", Help: "Revoked token ids in force on this node (polled and pushed).",
		}, func() float64 { return float64(l.Len()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_revocation_pushed",
			Help: "Token ids revoked through Redis and not yet settled by a poll of REVOCATION_URL (without one: all of them).",
		}, func() float64 { return float64(l.Pushed()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "pinaka_revocation_push_refused_total",
			Help: "Token ids revoked through Redis and refused because the node already held the most pushed ids (revocation.MaxPushed).",
		}, func() float64 { return float64(l.PushRefused()) }),
	)
}

func registerRevocationMetrics(m *metrics.Metrics, p *revocation.Poller) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_revocation_list_age_seconds",
			Help: "Seconds since REVOCATION_URL last confirmed the list in force (200 or 304); for a list loaded from STATE_DIR, since it was saved; with none yet, since start.",
		}, func() float64 { return p.Age().Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_revocation_list_version", Help: "Version of the revocation list in force (the collector's counter; 0 before any).",
		}, func() float64 { return float64(p.Version()) }),
	)
	for _, r := range revocation.FailureReasons() {
		m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "pinaka_revocation_fetch_failures_total",
			Help:        "REVOCATION_URL fetches that changed nothing, by reason: unreachable, status (not 200/304), malformed (a list that does not validate).",
			ConstLabels: prometheus.Labels{"reason": r},
		}, func() float64 { return float64(p.Failures(r)) }))
	}
}

// registerRevokedClosed exports what revocations closed on this node.
func registerRevokedClosed(m *metrics.Metrics, closed func() (tunnels, requests uint64)) {
	for _, kind := range []string{"tunnel", "request"} {
		m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "pinaka_revocation_closed_total",
			Help:        "Open tunnels and in-flight requests closed because their token was revoked, by kind.",
			ConstLabels: prometheus.Labels{"kind": kind},
		}, func() float64 {
			t, r := closed()
			if kind == "tunnel" {
				return float64(t)
			}
			return float64(r)
		}))
	}
}

// startRevocations polls REVOCATION_URL until Shutdown.
func (a *App) startRevocations() {
	if a.Revocations == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.stopRevocations = cancel
	go a.Revocations.Run(ctx)
}
