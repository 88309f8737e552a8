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
	"github.com/pinaka-proxy/pinaka/internal/revocation"
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

// revokedThroughRedis puts the revocations published through Redis in
// force on this node at once (revocation.List.Push: the OnRevoke
// subscribers close the tokens' tunnels and requests), ahead of the next
// poll of REVOCATION_URL, which settles them.
func (a *App) revokedThroughRedis(msgs []fleet.RevocationMessage) {
	if a.Revoked == nil {
		return
	}
	ps := make([]revocation.Push, len(msgs))
	var revoked, removed []string
	for i, m := range msgs {
		ps[i] = revocation.Push{TokenID: m.TokenID, Until: m.Until, Remove: m.Remove}
		if m.Remove {
			removed = append(removed, m.TokenID)
		} else {
			revoked = append(revoked, m.TokenID)
		}
	}
	refused := a.Revoked.PushRefused()
	a.Revoked.Push(ps)
	// At most one batch (256 ids of at most 50 bytes) per line.
	a.log.Info("token ids revoked through Redis", "count", len(revoked), "token_ids", revoked,
		"withdrawn", removed)
	if n := a.Revoked.PushRefused() - refused; n > 0 {
		a.log.Error("token ids revoked through Redis refused: this node already holds the most pushed ids; they apply at the next poll of REVOCATION_URL",
			"refused", n, "max", revocation.MaxPushed)
	}
}
