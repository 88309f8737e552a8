package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/config"
)

// checkConfig loads and validates the configuration and the certificate,
// prints the effective settings with secrets masked, and fails naming what
// is wrong.
func checkConfig(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("check-config", stderr)
	dev := fs.Bool("dev", false, "check as `serve --dev` would run")
	envFile := envFileFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(*envFile, isSet(fs, "env-file"), *dev)
	if err != nil {
		return fmt.Errorf("configuration is invalid:\n%w", err)
	}
	certInfo := "generated at start (dev mode)"
	if cfg.TLSCertPath != "" {
		c, err := tls.LoadX509KeyPair(cfg.TLSCertPath, cfg.TLSKeyPath)
		if err != nil {
			return fmt.Errorf("TLS_CERT_PATH/TLS_KEY_PATH: %w", err)
		}
		if time.Now().After(c.Leaf.NotAfter) {
			return fmt.Errorf("TLS_CERT_PATH: certificate expired on %s", c.Leaf.NotAfter.Format(time.RFC3339))
		}
		// Clients match the proxy's name against the SANs only (never the
		// CN), so a certificate without them cannot work.
		names := strings.Join(append(c.Leaf.DNSNames, ipStrings(c.Leaf.IPAddresses)...), ",")
		if names == "" {
			names = "(none: clients will reject this certificate)"
		}
		certInfo = fmt.Sprintf("%s, names %s, expires %s", c.Leaf.Subject.CommonName,
			names, c.Leaf.NotAfter.Format(time.RFC3339))
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	row := func(k string, v any) { fmt.Fprintf(tw, "%s\t%v\n", k, v) }
	row("PROXY_BIND:PROXY_PORT", cfg.ListenAddr())
	row("HTTP_PROXY_ENABLED", cfg.HTTPProxyEnabled)
	row("TLS_CERT_PATH", orNone(cfg.TLSCertPath))
	row("TLS_KEY_PATH", orNone(cfg.TLSKeyPath))
	row("certificate", certInfo)
	row("TLS_POST_QUANTUM", cfg.TLSPostQuantum)
	row("HTTP3_ENABLED", cfg.HTTP3Enabled)
	clientCertRows(cfg, row)
	row("JWT_SECRET", mask(string(cfg.JWTSecret)))
	row("JWT_PUBLIC_KEYS", publicKeys(cfg))
	row("JWKS_URL", orNone(redactURL(cfg.JWKSURL)))
	row("JWKS_REFRESH_INTERVAL", cfg.JWKSRefreshInterval)
	row("STATE_DIR", orNone(cfg.StateDir))
	row("JWT_LEEWAY", cfg.JWTLeeway)
	row("PROBE_NODE_NAME", cfg.ProbeNodeName)
	row("PROBE_NODE_REGION", orNone(cfg.ProbeNodeRegion))
	row("RATE_LIMIT_REQUESTS_PER_MINUTE", cfg.RateLimitRequestsPerMinute)
	row("RATE_LIMIT_BURST_SIZE", cfg.RateLimitBurstSize)
	row("RATE_LIMIT_MAX_TOKENS", cfg.RateLimitMaxTokens)
	row("MAX_CONNECTIONS", cfg.MaxConnections)
	row("MAX_TUNNELS_PER_TOKEN", cfg.MaxTunnelsPerToken)
	row("MAX_FORWARDS_PER_TOKEN", cfg.MaxForwardsPerToken)
	row("MAX_UDP_FLOWS_PER_TOKEN", cfg.MaxUDPFlowsPerToken)
	row("AUTH_FAILURES_PER_MINUTE", cfg.AuthFailuresPerMinute)
	row("MAX_CONNECTIONS_PER_IP", cfg.MaxConnectionsPerIP)
	row("MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP", cfg.MaxUnauthenticatedConnectionsPerIP)
	row("UNAUTHENTICATED_RECORDS_PER_MINUTE", cfg.UnauthenticatedRecordsPerMinute)
	row("REQUEST_BODY_IDLE_TIMEOUT", cfg.RequestBodyIdleTimeout)
	row("MAX_HEADER_BYTES", cfg.MaxHeaderBytes)
	row("HTTP2_MAX_CONCURRENT_STREAMS", cfg.MaxConcurrentStreams)
	row("HEADER_READ_TIMEOUT", cfg.HeaderReadTimeout)
	row("IDLE_TIMEOUT", cfg.IdleTimeout)
	row("TUNNEL_IDLE_TIMEOUT", cfg.TunnelIdleTimeout)
	row("UDP_IDLE_TIMEOUT", cfg.UDPIdleTimeout)
	row("UPSTREAM_CONNECT_TIMEOUT", cfg.UpstreamDialTimeout)
	row("UPSTREAM_RESPONSE_TIMEOUT", cfg.UpstreamHeaderTimeout)
	row("EGRESS_ALLOW_CIDRS", prefixes(cfg.EgressAllowCIDRs))
	row("EGRESS_DENY_CIDRS", prefixes(cfg.EgressDenyCIDRs))
	row("ALLOWED_PORTS", cfg.AllowedPorts.String())
	row("ALLOWED_UDP_PORTS", cfg.AllowedUDPPorts.String())
	row("DNS_SERVERS", orNone(strings.Join(cfg.DNSServers, ",")))
	row("DNS_TIMEOUT", cfg.DNSTimeout)
	row("DNS_CACHE_SIZE", cfg.DNSCacheSize)
	row("ADD_X_FORWARDED_FOR", cfg.AddForwardedFor)
	row("BACKEND_URL", orNone(redactURL(cfg.BackendURL)))
	row("BACKEND_API_KEY", mask(cfg.BackendAPIKey))
	row("BACKEND_CA_PATH", orNone(cfg.BackendCAPath))
	row("BACKEND_CLIENT_CERT_PATH", backendClientCert(cfg))
	row("LOG_BATCH_SIZE", cfg.LogBatchSize)
	row("LOG_BATCH_INTERVAL", cfg.LogBatchInterval)
	row("LOG_SHIP_TIMEOUT", cfg.LogShipTimeout)
	row("LOG_SPOOL_DIR", orNone(cfg.LogSpoolDir))
	row("LOG_SPOOL_MAX_BYTES", cfg.LogSpoolMaxBytes)
	row("LOG_QUEUE_SIZE", cfg.LogQueueSize)
	row("LOG_INCLUDE_QUERY", cfg.LogIncludeQuery)
	revURL := redactURL(cfg.RevocationURL)
	if revURL == "" {
		revURL = "off"
	}
	row("REVOCATION_URL", revURL)
	row("REVOCATION_INTERVAL", cfg.RevocationInterval)
	row("REDIS_URL", orNone(redactURL(cfg.RedisURL)))
	if cfg.RedisURL != "" {
		row("REDIS_KEY_PREFIX", cfg.RedisKeyPrefix)
		row("REDIS_TIMEOUT", cfg.RedisTimeout)
		row("FLEET_SIZE", cfg.FleetSize)
		row("TUNNEL_LEASE_TTL", cfg.TunnelLeaseTTL)
	}
	row("LOG_LEVEL", cfg.LogLevel)
	row("ADMIN_ADDR", orNone(cfg.AdminAddr))
	row("SHUTDOWN_TIMEOUT", cfg.ShutdownTimeout)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "configuration OK")
	return nil
}

// mask shows that a secret is set and its length, never its content.
func mask(s string) string {
	if s == "" {
		return "(not set)"
	}
	return fmt.Sprintf("(set, %d bytes)", len(s))
}

// redactURL hides a password in a URL's userinfo: BACKEND_URL may carry
// credentials, and check-config output ends up in tickets and chat.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return s
	}
	return u.Redacted()
}

func orNone(s string) string {
	if s == "" {
		return "(not set)"
	}
	return s
}

func prefixes(ps []netip.Prefix) string {
	if len(ps) == 0 {
		return "(none)"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func ipStrings[T fmt.Stringer](ips []T) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}

// publicKeys shows the key file and the kids it holds (kids are public).
func publicKeys(cfg *config.Config) string {
	if cfg.JWTPublicKeysPath == "" {
		return "(not set)"
	}
	return fmt.Sprintf("%s (%d keys, kids %s)", cfg.JWTPublicKeysPath,
		cfg.JWTPublicKeys.Len(), strings.Join(cfg.JWTPublicKeys.IDs(), ","))
}

// backendClientCert describes the node's client certificate towards the
// backend: the identity a collector will read from it, and its expiry.
func backendClientCert(cfg *config.Config) string {
	leaf := cfg.BackendTLS.Leaf()
	if leaf == nil {
		return "(none)"
	}
	id, err := backendtls.NodeIdentity(leaf)
	if err != nil {
		id = "no node identity: " + err.Error()
	}
	return fmt.Sprintf("%s (%s), expires %s", cfg.BackendClientCertPath, id, leaf.NotAfter.Format(time.RFC3339))
}
