package server

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/fleet"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// newLimits builds the per-token request bucket and tunnel cap: this
// node's own without REDIS_URL (no Redis client is created then), shared
// through Redis with it. The fleet is nil without REDIS_URL.
func newLimits(cfg *config.Config, log *slog.Logger, m *metrics.Metrics) (proxy.RateLimiter, proxy.SlotLimiter, *fleet.Fleet, error) {
	if cfg.RedisURL == "" {
		return ratelimit.New(cfg.RateLimitRequestsPerMinute, cfg.RateLimitBurstSize, cfg.RateLimitMaxTokens),
			ratelimit.NewTunnelLimiter(cfg.MaxTunnelsPerToken), nil, nil
	}
	f, err := fleet.New(fleet.Options{
		URL:                cfg.RedisURL,
		Prefix:             cfg.RedisKeyPrefix,
		Timeout:            cfg.RedisTimeout,
		FleetSize:          cfg.FleetSize,
		Node:               cfg.ProbeNodeName,
		RequestsPerMinute:  cfg.RateLimitRequestsPerMinute,
		Burst:              cfg.RateLimitBurstSize,
		MaxTokens:          cfg.RateLimitMaxTokens,
		MaxTunnelsPerToken: cfg.MaxTunnelsPerToken,
		LeaseTTL:           cfg.TunnelLeaseTTL,
		Registry:           m.Registry,
		Log:                log,
	})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("fleet mode: %w", err)
	}
	return f.Limiter(), f.Tunnels(), f, nil
}

// startFleet runs the fleet's background work (Redis probe, lease
// renewal, revocation subscriber) until the returned function is called.
func (a *App) startFleet() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Fleet.Run(ctx, a.revokedThroughRedis)
	}()
	return func() { cancel(); <-done; _ = a.Fleet.Close() }
}

// revokedThroughRedis receives token ids another node published as revoked.
// The revocation list (REVOCATION_URL) is being built separately; when it
// is merged, this hands the ids to it so they are refused (and their
// tunnels closed) on this node too. Until then they are only logged.
func (a *App) revokedThroughRedis(tokenIDs []string) {
	a.log.Info("token ids revoked through Redis", "count", len(tokenIDs), "token_ids", tokenIDs)
}
