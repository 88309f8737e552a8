package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/egress"
	"github.com/pinaka-proxy/pinaka/internal/fleet"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
	"github.com/pinaka-proxy/pinaka/internal/tracing"
)

// App is one wired Pinaka process: listeners, proxy, egress, limits and
// record shipping. cmd/pinaka and the end-to-end tests both build it here,
// so tests exercise the same wiring that production runs.
type App struct {
	Config *config.Config
	Server *Server
	Proxy  *proxy.Proxy
	// Verifier checks tokens; ReloadKeys and the JWKS_URL refresh swap
	// its public keys.
	Verifier *auth.Verifier
	// Remote is the JWKS_URL key set, nil without JWKS_URL.
	Remote *auth.RemoteKeys
	// Fleet shares limits through REDIS_URL; nil without it.
	Fleet     *fleet.Fleet
	stopFleet func()

	// The verifier's set is the file's keys, then the URL's (the file
	// wins a kid both hold); keysMu orders the two writers.
	keysMu   sync.Mutex
	fileKeys *auth.KeySet
	urlKeys  *auth.KeySet
	stop     context.CancelFunc
	Policy   *egress.Policy
	Metrics  *metrics.Metrics
	Shipper  *accesslog.Shipper
	log      *slog.Logger

	backendTLSFailures prometheus.Counter // ReloadBackendTLS refusals
	// Revocations polls REVOCATION_URL; nil when it is off.
	Revocations     *revocation.Poller
	stopRevocations context.CancelFunc
	// Revoked is the revocation list in force (polled and pushed through
	// Redis); nil when neither REVOCATION_URL nor REDIS_URL is set.
	Revoked *revocation.List
	// Tracing exports request spans; nil when tracing is off.
	Tracing *tracing.Tracer
}

// AppOptions are the parts of an App that are not configuration.
type AppOptions struct {
	Certs *CertStore
	// UpstreamTLS verifies origins the proxy itself speaks TLS to; nil means
	// the system roots.
	UpstreamTLS *tls.Config
}

// NewApp wires an App from cfg. Nothing listens until Start.
func NewApp(cfg *config.Config, log *slog.Logger, o AppOptions) (*App, error) {
	m := metrics.New()
	policy, err := egress.NewPolicy(cfg.EgressAllowCIDRs, cfg.EgressDenyCIDRs, cfg.AllowedPorts)
	if err != nil {
		return nil, fmt.Errorf("building egress policy: %w", err)
	}
	policy.SetUDPPorts(cfg.AllowedUDPPorts)
	resolver := egress.NewResolver(cfg.DNSServers, cfg.DNSTimeout, cfg.DNSCacheSize)
	dialer := egress.NewDialer(egress.DialerOptions{
		Policy: policy, Resolver: resolver, Timeout: cfg.UpstreamDialTimeout, Metrics: m,
	})
	// Mutual TLS to the backend, when configured (nil: the defaults).
	shipClient, err := BackendHTTPClient(cfg, cfg.BackendURL, 0)
	if err != nil {
		return nil, err
	}
	var jwksClient *http.Client
	if OnBackend(cfg, cfg.JWKSURL) {
		if jwksClient, err = BackendHTTPClient(cfg, cfg.JWKSURL, 10*time.Second); err != nil {
			return nil, err
		}
	}
	shipper, err := accesslog.New(accesslog.Options{
		Log:           log,
		BackendURL:    cfg.BackendURL,
		BackendAPIKey: cfg.BackendAPIKey,
		BatchSize:     cfg.LogBatchSize,
		BatchInterval: cfg.LogBatchInterval,
		Timeout:       cfg.LogShipTimeout,
		SpoolDir:      cfg.LogSpoolDir,
		SpoolMaxBytes: cfg.LogSpoolMaxBytes,
		QueueSize:     cfg.LogQueueSize,
		ProbeNode:     cfg.ProbeNodeName,
		Region:        cfg.ProbeNodeRegion,
		Metrics:       m,
		Client:        shipClient,
	})
	if err != nil {
		return nil, fmt.Errorf("starting record shipping: %w", err)
	}
	verifier := auth.NewVerifier(cfg.JWTSecret, cfg.ProbeNodeRegion, cfg.JWTLeeway)
	a := &App{Config: cfg, Verifier: verifier, fileKeys: cfg.JWTPublicKeys, log: log}
	a.backendTLSFailures = registerBackendTLSMetrics(m, cfg)
	a.applyKeys()
	if cfg.JWKSURL != "" {
		a.Remote = auth.NewRemoteKeys(auth.RemoteOptions{
			URL: cfg.JWKSURL, Interval: cfg.JWKSRefreshInterval, StateDir: cfg.StateDir, Log: log,
			Client: jwksClient,
			Apply: func(ks *auth.KeySet) {
				a.keysMu.Lock()
				a.urlKeys = ks
				a.keysMu.Unlock()
				a.applyKeys()
			},
		})
		// Fetched before anything listens: a node that cannot verify
		// any token has no business accepting connections.
		if err := a.Remote.Load(context.Background()); err != nil {
			return nil, fmt.Errorf("JWKS_URL: %w", err)
		}
		verifier.OnUnknownKid(a.Remote.UnknownKid)
		registerRemoteMetrics(m, a.Remote)
	}
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pinaka_jwt_public_keys",
		Help: "Public keys that verify tokens (JWT_PUBLIC_KEYS and JWKS_URL together).",
	}, func() float64 { return float64(verifier.Keys().Len()) }))
	revoked, poller, err := newRevocations(cfg, log, m)
	if err != nil {
		return nil, err
	}
	var revocations proxy.Revocations
	if revoked != nil {
		revocations = revoked
	}
	limiter, tunnels, fl, err := newLimits(cfg, log, m)
	if err != nil {
		return nil, err
	}
	a.Fleet = fl
	var admission proxy.TunnelAdmitter
	if fl != nil {
		// A CONNECT's rate limit and tunnel lease in one Redis round trip.
		admission = fl
	}
	tracer, ptracer, err := newTracer(cfg, log)
	if err != nil {
		return nil, err
	}
	a.Tracing = tracer
	p := proxy.New(proxy.Options{
		Auth:                  verifier,
		Policy:                policy,
		Dialer:                dialer,
		Limiter:               limiter,
		Tunnels:               tunnels,
		TunnelAdmission:       admission,
		Forwards:              ratelimit.NewTunnelLimiter(cfg.MaxForwardsPerToken),
		UDPFlows:              ratelimit.NewTunnelLimiter(cfg.MaxUDPFlowsPerToken),
		AuthThrottle:          ratelimit.NewAuthThrottle(cfg.AuthFailuresPerMinute, 100000),
		Refusals:              ratelimit.NewRefusalSampler(cfg.UnauthenticatedRecordsPerMinute, 100000),
		Records:               shipper,
		Metrics:               m,
		Log:                   log,
		HTTPProxyEnabled:      cfg.HTTPProxyEnabled,
		ProbeNode:             cfg.ProbeNodeName,
		Region:                cfg.ProbeNodeRegion,
		IncludeQuery:          cfg.LogIncludeQuery,
		AddForwardedFor:       cfg.AddForwardedFor,
		TunnelIdleTimeout:     cfg.TunnelIdleTimeout,
		UpstreamHeaderTimeout: cfg.UpstreamHeaderTimeout,
		BodyIdleTimeout:       cfg.RequestBodyIdleTimeout,
		UDPIdleTimeout:        cfg.UDPIdleTimeout,
		UpstreamTLS:           o.UpstreamTLS,
		Revocations:           revocations,
		Tracer:                ptracer,
	})
	a.Revocations, a.Revoked = poller, revoked
	registerRevokedClosed(m, p.RevokedClosed)
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pinaka_tunnel_directions_parked",
		Help: "Tunnel directions idle without a goroutine or buffer, waiting for their socket.",
	}, func() float64 { return float64(p.ParkedDirections()) }))
	a.Server, a.Proxy, a.Policy, a.Metrics, a.Shipper = New(cfg, log, o.Certs, p, m), p, policy, m, shipper
	if cfg.ClientCertMode != config.ClientCertOff && cfg.ClientTrust != nil {
		a.Server.clientCerts = newClientCerts(cfg, log, m, verifier.SetClientTrust)
	}
	return a, nil
}

// applyKeys hands the verifier the file's and the URL's keys together.
func (a *App) applyKeys() {
	a.keysMu.Lock()
	defer a.keysMu.Unlock()
	a.Verifier.SetKeys(auth.MergeKeySets(a.fileKeys, a.urlKeys))
}

func registerRemoteMetrics(m *metrics.Metrics, r *auth.RemoteKeys) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_jwks_age_seconds", Help: "Age of the JWKS_URL key set in use (since it was fetched).",
		}, func() float64 { return r.Age().Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_jwks_keys", Help: "Keys in the JWKS_URL key set in use.",
		}, func() float64 { return float64(r.Keys().Len()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "pinaka_jwks_refresh_failures_total", Help: "JWKS_URL fetches that failed or served a set that did not parse.",
		}, func() float64 { return float64(r.Failures()) }),
	)
}

// ReloadKeys re-reads JWT_PUBLIC_KEYS (on SIGHUP). A file that does not
// parse is refused and the current set kept: a typo during a rotation must
// not lock every client out. Without JWT_PUBLIC_KEYS it does nothing.
func (a *App) ReloadKeys() error {
	path := a.Config.JWTPublicKeysPath
	if path == "" {
		return nil
	}
	ks, err := auth.LoadKeySet(path)
	if err != nil {
		a.log.Error("JWT_PUBLIC_KEYS reload refused; keeping the current keys", "err", err,
			"kids", a.Verifier.Keys().IDs())
		return fmt.Errorf("reloading JWT_PUBLIC_KEYS: %w", err)
	}
	a.keysMu.Lock()
	a.fileKeys = ks
	a.keysMu.Unlock()
	a.applyKeys()
	a.log.Info("JWT_PUBLIC_KEYS reloaded", "kids", ks.IDs())
	return nil
}

// Start opens the listeners, adds their addresses to the egress policy's
// own-address denials (so the proxy can never be made to call itself) and
// starts serving.
func (a *App) Start() error {
	if err := a.Server.Listen(); err != nil {
		return err
	}
	// The QUIC listener's too: a CONNECT-UDP flow to it would loop.
	for _, addr := range []net.Addr{a.Server.ProxyAddr(), a.Server.AdminAddr(), a.Server.H3Addr()} {
		if addr == nil {
			continue
		}
		if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
			a.Policy.AddSelf(ap)
		}
	}
	a.Server.Serve()
	a.startRevocations()
	if a.Remote != nil {
		ctx, cancel := context.WithCancel(context.Background())
		a.stop = cancel
		go a.Remote.Run(ctx)
	}
	if a.Fleet != nil {
		a.stopFleet = a.startFleet()
	}
	a.log.Info("pinaka listening", "addr", a.Server.ProxyAddr().String(),
		"admin", fmt.Sprint(a.Server.AdminAddr()), "region", a.Config.ProbeNodeRegion,
		"probe_node", a.Config.ProbeNodeName, "http_proxy_enabled", a.Config.HTTPProxyEnabled)
	return nil
}

// Shutdown drains the listeners within ctx, then flushes records to the
// backend or the spool (with its own short deadline if ctx is spent).
func (a *App) Shutdown(ctx context.Context) error {
	if a.stop != nil {
		a.stop()
	}
	if a.stopRevocations != nil {
		a.stopRevocations()
	}
	err := a.Server.Shutdown(ctx)
	// After the drain: tunnels ending during it give their leases back.
	if a.stopFleet != nil {
		a.stopFleet()
	}
	fctx := ctx
	if ctx.Err() != nil {
		var cancel context.CancelFunc
		fctx, cancel = context.WithTimeout(context.Background(), flushTimeout)
		defer cancel()
	}
	if ferr := a.Shipper.Close(fctx); ferr != nil {
		err = errors.Join(err, fmt.Errorf("flushing records: %w", ferr))
	}
	if terr := a.Tracing.Shutdown(fctx); terr != nil {
		err = errors.Join(err, fmt.Errorf("flushing traces: %w", terr))
	}
	return err
}

// flushTimeout bounds the record flush at exit when the drain used up
// SHUTDOWN_TIMEOUT: long enough to write the spool, short enough that a
// supervisor's stop timeout is not hit.
const flushTimeout = 10 * time.Second
