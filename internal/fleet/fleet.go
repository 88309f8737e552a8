// Package fleet lets the nodes of a region share their limits through Redis
// (REDIS_URL): the per-token bucket (Limiter), the cap on concurrent tunnels
// per token (Tunnels) and the fan-out of revoked token ids (Revocations).
//
// Redis is an optimisation of fairness, never a dependency of serving:
// every decision has a per-call deadline (REDIS_TIMEOUT), and while Redis
// is unreachable or slower than that, a node decides on its own local state
// with every limit divided by FLEET_SIZE. One failure switches the whole
// node to local decisions, so a dead Redis costs one timeout, not one per
// request; a background probe switches back once Redis answers again.
//
// Every key starts with REDIS_KEY_PREFIX and ends with a token id that the
// verifier has already bounded (auth.CheckID: at most 50 bytes), and every
// key carries a TTL, so Redis holds nothing that outlives its use.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Defaults the configuration layer applies; exported for the docs and tests.
const (
	DefaultTimeout  = 50 * time.Millisecond
	DefaultLeaseTTL = 30 * time.Second
	DefaultPrefix   = "pinaka:"
)

// ProbeInterval is how long a node decides alone after a Redis failure
// before it tries Redis again (a PING in the background, so no request
// waits on a dead Redis).
const ProbeInterval = time.Second

// startTimeout bounds the PING at start. Longer than a decision's deadline:
// the first connection may include a TLS handshake to a remote Redis.
const startTimeout = 2 * time.Second

// Options configure a Fleet.
type Options struct {
	URL       string        // REDIS_URL
	Prefix    string        // REDIS_KEY_PREFIX
	Timeout   time.Duration // REDIS_TIMEOUT: deadline of one decision's Redis call
	FleetSize int           // FLEET_SIZE: the local fallback allows limit / FleetSize
	Node      string        // PROBE_NODE_NAME, part of this node's lease names

	RequestsPerMinute  int // RATE_LIMIT_REQUESTS_PER_MINUTE, shared by the fleet
	Burst              int // RATE_LIMIT_BURST_SIZE, shared by the fleet
	MaxTokens          int // RATE_LIMIT_MAX_TOKENS, for the local fallback buckets
	MaxTunnelsPerToken int // MAX_TUNNELS_PER_TOKEN, across the fleet
	LeaseTTL           time.Duration

	Registry prometheus.Registerer // nil: metrics are not registered
	Log      *slog.Logger

	// ProbeInterval overrides ProbeInterval (tests).
	ProbeInterval time.Duration
}

// Fleet is one node's connection to the shared state.
type Fleet struct {
	o      Options
	client *redis.Client
	log    *slog.Logger
	m      *fleetMetrics

	// down is true while decisions are local. It is read on every
	// request, hence an atomic rather than a lock.
	down      atomic.Bool
	downSince atomic.Int64 // unix nanoseconds
	kick      chan struct{}

	// batch carries the decisions; releases the tunnels' ZREMs, in a lane
	// of their own so that a closing tunnel never holds up a decision
	// (a client closing one tunnel and opening the next at once).
	batch, releases *batcher
	limiter         *Limiter
	tunnels         *Tunnels
	revs            *Revocations

	closeOnce sync.Once
}

// ParseURL checks REDIS_URL and returns the client options for it, with an
// error that never repeats the URL (it may hold a password).
func ParseURL(s string) (*redis.Options, error) {
	opt, err := redis.ParseURL(s)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("REDIS_URL: %w", err)
	}
	return opt, nil
}

// NewClient returns a client for REDIS_URL shaped for decisions on the
// request path: no retries (the fallback is the retry), deadlines taken
// from each call's context, no per-connection identity round trips, and
// RESP2 unless the URL asks for a protocol (?protocol=3): fleet mode needs
// no push notifications, and RESP2 spares every reply the check for them.
func NewClient(redisURL string) (*redis.Client, error) {
	opt, err := ParseURL(redisURL)
	if err != nil {
		return nil, err
	}
	opt.MaxRetries = -1
	opt.ContextTimeoutEnabled = true
	opt.DialerRetries = 1
	opt.DisableIdentity = true
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	if opt.Protocol == 0 {
		opt.Protocol = 2
	}
	return redis.NewClient(opt), nil
}

// New connects to Redis and builds the shared limiters. A malformed URL is
// an error; an unreachable Redis is not: the node starts deciding locally
// and switches to Redis when it answers (Run must be running for that).
func New(o Options) (*Fleet, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = DefaultLeaseTTL
	}
	if o.FleetSize < 1 {
		o.FleetSize = 1
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = ProbeInterval
	}
	client, err := NewClient(o.URL)
	if err != nil {
		return nil, err
	}
	// go-redis has one logger per process and writes plain lines to
	// stderr by default, between our JSON lines, once per failed dial.
	// Its messages go to our log at debug level: an outage is reported
	// once, by failed.
	redis.SetLogger(debugLogger{o.Log})
	f := &Fleet{o: o, client: client, log: o.Log, m: newMetrics(o.Registry), kick: make(chan struct{}, 1)}
	f.m.up.Set(1)
	f.batch = newBatcher(client, o.Timeout, f.down.Load)
	f.releases = newBatcher(client, o.Timeout, f.down.Load)
	f.limiter = newLimiter(f)
	f.tunnels = newTunnels(f)
	f.revs = NewRevocations(client, o.Prefix, o.Log, f.m)

	ctx, cancel := context.WithTimeout(context.Background(), max(startTimeout, o.Timeout))
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		f.down.Store(true)
		f.downSince.Store(time.Now().UnixNano())
		f.m.up.Set(0)
		f.kickProbe()
		o.Log.Warn("REDIS_URL unreachable at start; deciding limits on this node alone until it answers",
			"redis", redactedAddr(client), "err", err, "fleet_size", o.FleetSize)
	} else {
		o.Log.Info("fleet mode: limits shared through Redis", "redis", redactedAddr(client),
			"prefix", o.Prefix, "fleet_size", o.FleetSize, "timeout", o.Timeout.String())
	}
	return f, nil
}

// Limiter is the shared per-token bucket (proxy.RateLimiter).
func (f *Fleet) Limiter() *Limiter { return f.limiter }

// Tunnels is the fleet-wide tunnel cap (proxy.SlotLimiter).
func (f *Fleet) Tunnels() *Tunnels { return f.tunnels }

// AdmitTunnel takes a CONNECT's rate-limit decision and its tunnel slot in
// one Redis round trip (proxy.TunnelAdmitter): Limiter().Allow then
// Tunnels().Acquire, as one script.
func (f *Fleet) AdmitTunnel(tokenID string) (ok bool, retryAfter time.Duration, release func(), slotOK bool) {
	return f.tunnels.Admit(f.limiter, tokenID)
}

// Revocations publishes and receives revoked token ids.
func (f *Fleet) Revocations() *Revocations { return f.revs }

// Up reports whether decisions currently go to Redis.
func (f *Fleet) Up() bool { return !f.down.Load() }

// Run keeps the fleet state alive until ctx ends: it probes Redis after a
// failure, renews this node's tunnel leases, and, when onRevoked is not nil,
// delivers the revocations published by any node.
func (f *Fleet) Run(ctx context.Context, onRevoked func(msgs []RevocationMessage)) {
	var wg sync.WaitGroup
	wg.Go(func() { f.probe(ctx) })
	wg.Go(func() { f.tunnels.renewLoop(ctx) })
	if onRevoked != nil {
		wg.Go(func() { f.revs.Run(ctx, onRevoked) })
	}
	wg.Wait()
}

// Close closes the Redis connections. Leases still held expire on their
// own within the lease TTL.
func (f *Fleet) Close() error {
	var err error
	f.closeOnce.Do(func() { err = f.client.Close() })
	return err
}

// failed records a failed or late Redis call and switches the node to
// local decisions. Only the first failure of an outage is logged: a dead
// Redis must not write one line per request.
func (f *Fleet) failed(op string, err error) {
	if errors.Is(err, errLocal) || errors.Is(err, errQueueFull) {
		// Not sent: an earlier call's failure switched the node to local
		// decisions while this one waited for its turn, or the queue was
		// full. A full queue is a burst, not an outage: this call decides
		// locally (counted as a fallback), the next ones use Redis again.
		return
	}
	f.m.errors.WithLabelValues(op).Inc()
	if f.down.CompareAndSwap(false, true) {
		f.downSince.Store(time.Now().UnixNano())
		f.m.up.Set(0)
		f.log.Warn("Redis failed or exceeded REDIS_TIMEOUT; deciding limits on this node alone (limits divided by FLEET_SIZE) until it answers again",
			"op", op, "err", err, "fleet_size", f.o.FleetSize, "timeout", f.o.Timeout.String())
		f.kickProbe()
	}
}

func (f *Fleet) kickProbe() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// probe waits for an outage, then PINGs every ProbeInterval until Redis
// answers within REDIS_TIMEOUT, and switches decisions back to it.
func (f *Fleet) probe(ctx context.Context) {
	t := time.NewTimer(0)
	<-t.C
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.kick:
		}
		for f.down.Load() {
			t.Reset(f.o.ProbeInterval)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			pctx, cancel := context.WithTimeout(ctx, f.o.Timeout)
			err := f.client.Ping(pctx).Err()
			cancel()
			if err != nil {
				f.m.errors.WithLabelValues("ping").Inc()
				continue
			}
			since := time.Unix(0, f.downSince.Load())
			f.down.Store(false)
			f.m.up.Set(1)
			f.log.Info("Redis answers again; limits are shared through it again",
				"local_for", time.Since(since).Round(time.Millisecond).String())
			// Tunnels opened meanwhile join the shared count now rather
			// than at the next scheduled renewal.
			f.tunnels.renewSoon()
		}
	}
}

// localShare is a fleet-wide limit divided by FLEET_SIZE, at least 1: what
// one node may allow on its own without the fleet exceeding the limit.
func localShare(limit, fleetSize int) int { return max(1, limit/fleetSize) }

// redactedAddr names the Redis server for logs without its password.
func redactedAddr(c *redis.Client) string {
	o := c.Options()
	return fmt.Sprintf("%s/%d", o.Addr, o.DB)
}

// fleetMetrics are fleet mode's collectors. Their labels come from fixed
// sets of operation names.
type fleetMetrics struct {
	up       prometheus.Gauge
	fallback *prometheus.CounterVec // op: rate_limit, tunnel
	errors   *prometheus.CounterVec // op
	seconds  *prometheus.HistogramVec
	leases   prometheus.Gauge
	revoked  *prometheus.CounterVec // result: accepted, invalid
	reserved *prometheus.CounterVec // op: rate_limit, tunnel

	fallbackRate, fallbackTunnel              prometheus.Counter
	reservedRate, reservedTunnel              prometheus.Counter
	rateSeconds, acquireSeconds, admitSeconds prometheus.Observer
	releaseSeconds, renewSeconds              prometheus.Observer
}

func newMetrics(reg prometheus.Registerer) *fleetMetrics {
	m := &fleetMetrics{
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_redis_up", Help: "1 while limits are decided through Redis (REDIS_URL), 0 while this node decides alone.",
		}),
		fallback: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_redis_fallback_total", Help: "Decisions taken on this node's local state because Redis was unreachable or slow, by op: rate_limit, tunnel.",
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_redis_errors_total", Help: "Redis calls that failed or exceeded REDIS_TIMEOUT, by op: rate_limit, tunnel_admit, tunnel_acquire, tunnel_release, lease_renew, ping.",
		}, []string{"op"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "pinaka_redis_call_seconds", Help: "Latency of Redis calls, by op: rate_limit, tunnel_admit (a CONNECT's rate limit and tunnel lease in one call), tunnel_acquire, tunnel_release, lease_renew.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 14),
		}, []string{"op"}),
		leases: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_redis_tunnel_leases", Help: "Tunnels this node holds a fleet-wide lease for (renewed every TUNNEL_LEASE_TTL/3).",
		}),
		revoked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_redis_revocations_received_total", Help: "Token ids received on the revocation channel, by result: accepted, invalid (not a token id; dropped).",
		}, []string{"result"}),
		reserved: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_redis_reserved_total", Help: "Decisions taken without a Redis round trip from what this node reserved in Redis earlier, by op: rate_limit (units of the shared bucket taken ahead), tunnel (the lease of a closed tunnel kept for the token's next one).",
		}, []string{"op"}),
	}
	for _, op := range []string{"rate_limit", "tunnel"} {
		m.fallback.WithLabelValues(op)
		m.reserved.WithLabelValues(op)
	}
	for _, op := range []string{"rate_limit", "tunnel_admit", "tunnel_acquire", "tunnel_release", "lease_renew", "ping"} {
		m.errors.WithLabelValues(op)
	}
	m.fallbackRate = m.fallback.WithLabelValues("rate_limit")
	m.fallbackTunnel = m.fallback.WithLabelValues("tunnel")
	m.reservedRate = m.reserved.WithLabelValues("rate_limit")
	m.reservedTunnel = m.reserved.WithLabelValues("tunnel")
	m.rateSeconds = m.seconds.WithLabelValues("rate_limit")
	m.acquireSeconds = m.seconds.WithLabelValues("tunnel_acquire")
	m.admitSeconds = m.seconds.WithLabelValues("tunnel_admit")
	m.releaseSeconds = m.seconds.WithLabelValues("tunnel_release")
	m.renewSeconds = m.seconds.WithLabelValues("lease_renew")
	m.revoked.WithLabelValues("accepted")
	m.revoked.WithLabelValues("invalid")
	if reg != nil {
		reg.MustRegister(m.up, m.fallback, m.errors, m.seconds, m.leases, m.revoked, m.reserved)
	}
	return m
}

// debugLogger passes go-redis's messages to slog at debug level.
type debugLogger struct{ log *slog.Logger }

func (d debugLogger) Printf(ctx context.Context, format string, v ...any) {
	if d.log.Enabled(ctx, slog.LevelDebug) {
		d.log.DebugContext(ctx, "redis client: "+fmt.Sprintf(format, v...))
	}
}
