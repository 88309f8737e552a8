// Package config reads Pinaka's configuration from the environment and an
// optional .env file. Variable names are the Rust proxy's, kept unchanged so
// existing .env files keep working; everything new follows the same style.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/joho/godotenv"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// MinSecretBytes is the shortest JWT_SECRET accepted: HS256 keys shorter than
// the hash output weaken the MAC.
const MinSecretBytes = 32

// Config is the effective configuration of one Pinaka process.
type Config struct {
	// Listener.
	ProxyPort        int
	ProxyBind        string
	HTTPProxyEnabled bool
	TLSCertPath      string
	TLSKeyPath       string
	// TLSPostQuantum offers the hybrid X25519MLKEM768 key exchange first.
	TLSPostQuantum bool

	// Authentication.
	JWTSecret []byte
	// JWTPublicKeysPath is the PEM or JWKS file of token verification
	// keys, reloaded on SIGHUP; JWTPublicKeys is what it held at Load.
	JWTPublicKeysPath string
	JWTPublicKeys     *auth.KeySet
	// JWKSURL publishes keys too: fetched at start, refreshed every
	// JWKSRefreshInterval and on an unknown kid.
	JWKSURL             string
	JWKSRefreshInterval time.Duration
	// StateDir is what the node keeps across restarts (the last good
	// JWKS); "" keeps nothing.
	StateDir        string
	JWTLeeway       time.Duration
	ProbeNodeName   string
	ProbeNodeRegion string

	// Rate limiting and limits.
	RateLimitRequestsPerMinute int
	RateLimitBurstSize         int
	RateLimitMaxTokens         int
	MaxConnections             int
	MaxTunnelsPerToken         int
	MaxForwardsPerToken        int
	AuthFailuresPerMinute      int
	// Per-client-address caps (IPv6 by /64) and what credential-less
	// traffic may write.
	MaxConnectionsPerIP                int
	MaxUnauthenticatedConnectionsPerIP int
	UnauthenticatedRecordsPerMinute    int
	RequestBodyIdleTimeout             time.Duration
	MaxHeaderBytes                     int
	MaxConcurrentStreams               uint32
	HTTP2BodyBufferBytes               int64
	HeaderReadTimeout                  time.Duration
	IdleTimeout                        time.Duration
	TunnelIdleTimeout                  time.Duration
	UpstreamDialTimeout                time.Duration
	UpstreamHeaderTimeout              time.Duration

	// Egress.
	EgressAllowCIDRs []netip.Prefix
	EgressDenyCIDRs  []netip.Prefix
	AllowedPorts     PortSet
	DNSServers       []string
	DNSTimeout       time.Duration
	DNSCacheSize     int
	AddForwardedFor  bool

	// Records and shipping.
	BackendURL       string
	BackendAPIKey    string
	LogBatchSize     int
	LogBatchInterval time.Duration
	LogShipTimeout   time.Duration
	LogSpoolDir      string
	LogSpoolMaxBytes int64
	LogQueueSize     int
	LogIncludeQuery  bool

	// Mutual TLS to the backend: BACKEND_CA_PATH,
	// BACKEND_CLIENT_CERT_PATH, BACKEND_CLIENT_KEY_PATH, and what they
	// held at Load (nil when none is set). Every client the node points at
	// the backend builds its TLS from BackendTLS; SIGHUP reloads it.
	BackendCAPath         string
	BackendClientCertPath string
	BackendClientKeyPath  string
	BackendTLS            *backendtls.Client
	// Revocation: the revoked token ids, polled from RevocationURL ("" =
	// off) every RevocationInterval; see parseRevocation.
	RevocationURL      string
	RevocationInterval time.Duration
	// Fleet mode (REDIS_URL): the nodes on one Redis share the token
	// buckets, the tunnel caps and revocations (see internal/fleet).
	RedisURL       string        // "" = off: no Redis client is created
	RedisKeyPrefix string        // every key and channel starts with it
	RedisTimeout   time.Duration // per call; past it the node decides locally
	FleetSize      int           // the local fallback allows limit / FleetSize
	TunnelLeaseTTL time.Duration // a dead node's tunnel leases expire after it

	// Operations.
	LogLevel        string
	AdminAddr       string
	ShutdownTimeout time.Duration

	// Tracing: OTEL_* and TRACE_PROPAGATE (tracing.go).
	Tracing Tracing

	// Client certificates as credentials: ClientTrust is what
	// CLIENT_CA_PATH and CLIENT_CRL_PATH held at Load (nil without a CA);
	// SIGHUP reloads both.
	ClientCAPath   string
	ClientCertMode string // ClientCertOff, ClientCertOptional or ClientCertRequire
	ClientCRLPath  string
	ClientTrust    *auth.ClientTrust

	// Dev is true for `pinaka serve --dev`: the certificate and secret are
	// generated in memory instead of read from files.
	Dev bool

	// HTTP/3: a QUIC listener on UDP PROXY_BIND:PROXY_PORT beside the TLS
	// one (see loadHTTP3).
	HTTP3Enabled bool
	// CONNECT-UDP (RFC 9298) over HTTP/3: the UDP ports flows may reach,
	// the flows a token may hold open at once, and how long a flow may
	// carry no datagram before it is closed (see loadHTTP3).
	AllowedUDPPorts     PortSet
	MaxUDPFlowsPerToken int
	UDPIdleTimeout      time.Duration
}

// ListenAddr is the proxy listener's host:port.
func (c *Config) ListenAddr() string {
	return net.JoinHostPort(c.ProxyBind, strconv.Itoa(c.ProxyPort))
}

// Lookup returns an environment value and whether it is set.
type Lookup func(string) (string, bool)

// EnvWithDotEnv returns a Lookup over the process environment that falls back
// to the named .env file. The environment wins. A missing file is not an
// error unless required is true (an explicit --env-file).
func EnvWithDotEnv(path string, required bool) (Lookup, error) {
	file := map[string]string{}
	if path != "" {
		m, err := godotenv.Read(path)
		switch {
		case err == nil:
			file = m
		case errors.Is(err, os.ErrNotExist) && !required:
		default:
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	return func(k string) (string, bool) {
		if v, ok := os.LookupEnv(k); ok {
			return v, true
		}
		v, ok := file[k]
		return v, ok
	}, nil
}

// Load builds and validates a Config. Every problem is reported, each naming
// its variable, joined into one error.
func Load(lookup Lookup, dev bool) (*Config, error) {
	p := parser{lookup: lookup}
	c := &Config{Dev: dev}

	defPort, defBind := 443, "0.0.0.0"
	if dev {
		defPort, defBind = 8443, "127.0.0.1"
	}
	c.ProxyPort = p.int("PROXY_PORT", defPort, 1, 65535)
	c.ProxyBind = p.str("PROXY_BIND", defBind)
	if c.ProxyBind != "" && net.ParseIP(c.ProxyBind) == nil {
		p.fail("PROXY_BIND", "must be an IP address, got %q", c.ProxyBind)
	}
	c.HTTPProxyEnabled = p.bool("HTTP_PROXY_ENABLED", true)
	c.TLSCertPath = p.str("TLS_CERT_PATH", "")
	c.TLSKeyPath = p.str("TLS_KEY_PATH", "")
	c.TLSPostQuantum = p.bool("TLS_POST_QUANTUM", true)
	if !dev {
		p.file("TLS_CERT_PATH", c.TLSCertPath)
		p.file("TLS_KEY_PATH", c.TLSKeyPath)
	}

	// Either source of trust is enough: a node holding only public keys
	// cannot mint tokens, which is the point of JWT_PUBLIC_KEYS.
	c.JWTPublicKeysPath = p.str("JWT_PUBLIC_KEYS", "")
	if c.JWTPublicKeysPath != "" {
		ks, err := auth.LoadKeySet(c.JWTPublicKeysPath)
		if err != nil {
			p.errs = append(p.errs, fmt.Errorf("JWT_PUBLIC_KEYS: %w", err))
		}
		c.JWTPublicKeys = ks
	}
	c.JWKSURL = p.httpURL("JWKS_URL")
	c.JWKSRefreshInterval = p.duration("JWKS_REFRESH_INTERVAL", 5*time.Minute)
	if c.JWKSRefreshInterval < time.Second {
		p.fail("JWKS_REFRESH_INTERVAL", "must be at least 1s")
	}
	c.StateDir = p.str("STATE_DIR", "")
	if c.StateDir != "" {
		if st, err := os.Stat(c.StateDir); err != nil || !st.IsDir() {
			p.fail("STATE_DIR", "must be an existing directory, got %q", c.StateDir)
		}
	}
	secret := p.str("JWT_SECRET", "")
	switch {
	case secret == "" && c.JWTPublicKeysPath == "" && c.JWKSURL == "" && !dev:
		p.fail("JWT_SECRET", "is required (or JWT_PUBLIC_KEYS, a file of public keys, or JWKS_URL)")
	case secret != "" && len(secret) < MinSecretBytes:
		p.fail("JWT_SECRET", "must be at least %d bytes", MinSecretBytes)
	}
	c.JWTSecret = []byte(secret)
	c.JWTLeeway = p.duration("JWT_LEEWAY", 30*time.Second)
	host, _ := os.Hostname()
	c.ProbeNodeName = p.str("PROBE_NODE_NAME", host)
	if c.ProbeNodeName == "" { // set but empty, as in a templated .env
		c.ProbeNodeName = host
	}
	c.ProbeNodeRegion = p.str("PROBE_NODE_REGION", "")
	if c.ProbeNodeRegion == "" && dev {
		c.ProbeNodeRegion = "dev"
	}

	c.RateLimitRequestsPerMinute = p.int("RATE_LIMIT_REQUESTS_PER_MINUTE", 10000, 1, 1<<30)
	c.RateLimitBurstSize = p.int("RATE_LIMIT_BURST_SIZE", 500, 1, 1<<30)
	c.RateLimitMaxTokens = p.int("RATE_LIMIT_MAX_TOKENS", 10000, 1, 1<<30)
	c.MaxConnections = p.int("MAX_CONNECTIONS", 10000, 1, 1<<30)
	c.MaxTunnelsPerToken = p.int("MAX_TUNNELS_PER_TOKEN", 512, 1, 1<<30)
	c.MaxForwardsPerToken = p.int("MAX_FORWARDS_PER_TOKEN", 256, 1, 1<<30)
	c.AuthFailuresPerMinute = p.int("AUTH_FAILURES_PER_MINUTE", 120, 1, 1<<30)
	c.MaxConnectionsPerIP = p.int("MAX_CONNECTIONS_PER_IP", 512, 0, 1<<30)
	c.MaxUnauthenticatedConnectionsPerIP = p.int("MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP", 64, 0, 1<<30)
	c.UnauthenticatedRecordsPerMinute = p.int("UNAUTHENTICATED_RECORDS_PER_MINUTE", 60, 1, 1<<30)
	c.RequestBodyIdleTimeout = p.duration("REQUEST_BODY_IDLE_TIMEOUT", 60*time.Second)
	c.MaxHeaderBytes = p.int("MAX_HEADER_BYTES", 32<<10, 1<<10, 1<<20)
	c.MaxConcurrentStreams = uint32(p.int("HTTP2_MAX_CONCURRENT_STREAMS", 250, 1, 10000))
	c.HTTP2BodyBufferBytes = int64(p.int("HTTP2_BODY_BUFFER_BYTES", 256<<20, 1<<20, 1<<40))
	c.HeaderReadTimeout = p.duration("HEADER_READ_TIMEOUT", 10*time.Second)
	c.IdleTimeout = p.duration("IDLE_TIMEOUT", 120*time.Second)
	c.TunnelIdleTimeout = p.duration("TUNNEL_IDLE_TIMEOUT", 10*time.Minute)
	c.UpstreamDialTimeout = p.duration("UPSTREAM_CONNECT_TIMEOUT", 10*time.Second)
	c.UpstreamHeaderTimeout = p.duration("UPSTREAM_RESPONSE_TIMEOUT", 60*time.Second)

	c.EgressAllowCIDRs = p.prefixes("EGRESS_ALLOW_CIDRS")
	c.EgressDenyCIDRs = p.prefixes("EGRESS_DENY_CIDRS")
	ports := p.str("ALLOWED_PORTS", DefaultAllowedPorts)
	ps, err := ParsePortSet(ports)
	if err != nil {
		p.fail("ALLOWED_PORTS", "%v", err)
	}
	c.AllowedPorts = ps
	c.DNSServers = p.hostPorts("DNS_SERVERS")
	c.DNSTimeout = p.duration("DNS_TIMEOUT", 5*time.Second)
	c.DNSCacheSize = p.int("DNS_CACHE_SIZE", 10000, 1, 1<<24)
	c.AddForwardedFor = p.bool("ADD_X_FORWARDED_FOR", false)

	c.BackendURL = strings.TrimRight(p.httpURL("BACKEND_URL"), "/")
	c.BackendAPIKey = p.str("BACKEND_API_KEY", "")
	c.LogBatchSize = p.int("LOG_BATCH_SIZE", 100, 1, 100000)
	c.LogBatchInterval = p.duration("LOG_BATCH_INTERVAL", 5*time.Second)
	// Short on purpose: while an attempt waits, its batch is only in
	// memory (with LOG_SPOOL_DIR it is spooled when the attempt fails).
	c.LogShipTimeout = p.duration("LOG_SHIP_TIMEOUT", 10*time.Second)
	if c.LogShipTimeout == 0 {
		p.fail("LOG_SHIP_TIMEOUT", "must be more than 0")
	}
	c.LogSpoolDir = p.str("LOG_SPOOL_DIR", "")
	c.LogSpoolMaxBytes = int64(p.int("LOG_SPOOL_MAX_BYTES", 1<<30, 1<<10, 1<<62))
	c.LogQueueSize = p.int("LOG_QUEUE_SIZE", 100000, 1, 1<<26)
	c.LogIncludeQuery = p.bool("LOG_INCLUDE_QUERY", false)
	p.backendTLS(c)
	c.RevocationURL, c.RevocationInterval = p.parseRevocation(c.BackendURL)

	c.RedisURL = p.redisURL("REDIS_URL")
	c.RedisKeyPrefix = p.keyPrefix("REDIS_KEY_PREFIX", "pinaka:")
	c.RedisTimeout = p.durationIn("REDIS_TIMEOUT", 50*time.Millisecond, time.Millisecond, 10*time.Second)
	c.FleetSize = p.int("FLEET_SIZE", 1, 1, 10000)
	c.TunnelLeaseTTL = p.durationIn("TUNNEL_LEASE_TTL", 30*time.Second, 3*time.Second, time.Hour)

	c.LogLevel = "info"
	if v, ok := lookup("RUST_LOG"); ok && v != "" {
		c.LogLevel = rustLevel(v)
	}
	if v, ok := lookup("LOG_LEVEL"); ok && v != "" {
		c.LogLevel = strings.ToLower(strings.TrimSpace(v))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	case "trace":
		c.LogLevel = "debug"
	case "warning":
		c.LogLevel = "warn"
	default:
		p.fail("LOG_LEVEL", "must be one of debug, info, warn, error; got %q", c.LogLevel)
	}
	c.AdminAddr = p.str("ADMIN_ADDR", "127.0.0.1:9090")
	if c.AdminAddr != "" && c.AdminAddr != "off" {
		if _, _, err := net.SplitHostPort(c.AdminAddr); err != nil {
			p.fail("ADMIN_ADDR", "must be host:port or \"off\", got %q", c.AdminAddr)
		}
	}
	c.ShutdownTimeout = p.duration("SHUTDOWN_TIMEOUT", 30*time.Second)
	loadClientCerts(&p, c)
	loadHTTP3(&p, c)
	c.Tracing = p.parseTracing()

	if len(p.errs) > 0 {
		return nil, errors.Join(p.errs...)
	}
	return c, nil
}

// parseRevocation reads REVOCATION_URL and REVOCATION_INTERVAL. Unset,
// the URL is the backend's revocation endpoint when BACKEND_URL is set,
// else off; "off" turns it off even then (a backend without the
// endpoint).
func (p *parser) parseRevocation(backendURL string) (string, time.Duration) {
	u := p.str("REVOCATION_URL", "")
	switch {
	case strings.EqualFold(u, "off"):
		u = ""
	case u != "":
		u = p.httpURL("REVOCATION_URL")
	case backendURL != "":
		u = backendURL + revocation.Path
	}
	interval := p.duration("REVOCATION_INTERVAL", 10*time.Second)
	if interval < time.Second {
		p.fail("REVOCATION_INTERVAL", "must be at least 1s, got %s", interval)
	}
	return u, interval
}

// rustLevel maps an env_logger filter ("info", "pinaka=debug,hyper=warn") to
// a single level: the first bare level, else the first directive's level.
func rustLevel(v string) string {
	level := ""
	for _, d := range strings.Split(v, ",") {
		d = strings.TrimSpace(d)
		if i := strings.LastIndexByte(d, '='); i >= 0 {
			if level == "" {
				level = d[i+1:]
			}
			continue
		}
		if d != "" {
			return strings.ToLower(d)
		}
	}
	if level == "" {
		return "info"
	}
	return strings.ToLower(level)
}

type parser struct {
	lookup Lookup
	errs   []error
}

func (p *parser) fail(name, format string, args ...any) {
	p.errs = append(p.errs, fmt.Errorf("%s %s", name, fmt.Sprintf(format, args...)))
}

// httpURL reads an optional http:// or https:// URL.
func (p *parser) httpURL(name string) string {
	v := p.str(name, "")
	if v != "" {
		u, err := url.Parse(v)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			p.fail(name, "must be an http:// or https:// URL, got %q", v)
		}
	}
	return v
}

func (p *parser) str(name, def string) string {
	if v, ok := p.lookup(name); ok {
		return strings.TrimSpace(v)
	}
	return def
}

func (p *parser) int(name string, def, min, max int) int {
	v, ok := p.lookup(name)
	if !ok || strings.TrimSpace(v) == "" {
		return def
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil {
		p.fail(name, "must be an integer, got %q", v)
		return def
	}
	if n < min || n > max {
		p.fail(name, "must be between %d and %d, got %d", min, max, n)
		return def
	}
	return n
}

func (p *parser) bool(name string, def bool) bool {
	v, ok := p.lookup(name)
	if !ok || strings.TrimSpace(v) == "" {
		return def
	}
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "true", "yes", "on":
		return true
	case "0", "false", "no", "off":
		return false
	}
	p.fail(name, "must be true or false, got %q", v)
	return def
}

// duration accepts Go durations ("5s", "1m30s") and, like the Rust proxy's
// plain-number settings, a bare number of seconds.
func (p *parser) duration(name string, def time.Duration) time.Duration {
	v, ok := p.lookup(name)
	v = strings.TrimSpace(v)
	if !ok || v == "" {
		return def
	}
	if n, err := strconv.Atoi(v); err == nil {
		if n < 0 {
			p.fail(name, "must not be negative, got %q", v)
			return def
		}
		return time.Duration(n) * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		p.fail(name, "must be a duration like 5s or a number of seconds, got %q", v)
		return def
	}
	return d
}

func (p *parser) file(name, path string) {
	if path == "" {
		p.fail(name, "is required (or run `pinaka serve --dev`)")
		return
	}
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		p.errs = append(p.errs, fmt.Errorf("%s: no such file: %s", name, path))
	case err != nil:
		p.errs = append(p.errs, fmt.Errorf("%s: %w", name, err))
	case st.IsDir():
		p.errs = append(p.errs, fmt.Errorf("%s: is a directory: %s", name, path))
	}
}

func (p *parser) list(name string) []string {
	v, _ := p.lookup(name)
	var out []string
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// prefixes parses a comma-separated list of CIDRs; a bare address means a
// single host.
func (p *parser) prefixes(name string) []netip.Prefix {
	var out []netip.Prefix
	for _, f := range p.list(name) {
		if pr, err := netip.ParsePrefix(f); err == nil {
			out = append(out, pr.Masked())
			continue
		}
		if a, err := netip.ParseAddr(f); err == nil {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p.fail(name, "has an invalid CIDR %q", f)
	}
	return out
}

func (p *parser) hostPorts(name string) []string {
	var out []string
	for _, f := range p.list(name) {
		if _, port, err := net.SplitHostPort(f); err == nil && port != "" {
			out = append(out, f)
			continue
		}
		if net.ParseIP(f) != nil {
			out = append(out, net.JoinHostPort(f, "53"))
			continue
		}
		p.fail(name, "entries must be host:port, got %q", f)
	}
	return out
}

// DefaultAllowedPorts is ALLOWED_PORTS when unset.
const DefaultAllowedPorts = "80,443,1024-65535"

// PortSet is a set of allowed TCP ports, from a list like "80,443,1024-65535".
type PortSet struct{ ranges [][2]uint16 }

// ParsePortSet parses a comma-separated list of ports and port ranges.
func ParsePortSet(s string) (PortSet, error) {
	var ps PortSet
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(f, "-")
		a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
		b := a
		var err2 error
		if isRange {
			b, err2 = strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
		}
		if err1 != nil || err2 != nil || a == 0 || b < a {
			return PortSet{}, fmt.Errorf("invalid port or range %q", f)
		}
		ps.ranges = append(ps.ranges, [2]uint16{uint16(a), uint16(b)})
	}
	if len(ps.ranges) == 0 {
		return PortSet{}, errors.New("no ports listed")
	}
	return ps, nil
}

// Contains reports whether port is allowed.
func (ps PortSet) Contains(port uint16) bool {
	for _, r := range ps.ranges {
		if port >= r[0] && port <= r[1] {
			return true
		}
	}
	return false
}

// String renders the set in ALLOWED_PORTS syntax.
func (ps PortSet) String() string {
	var b strings.Builder
	for i, r := range ps.ranges {
		if i > 0 {
			b.WriteByte(',')
		}
		if r[0] == r[1] {
			fmt.Fprintf(&b, "%d", r[0])
		} else {
			fmt.Fprintf(&b, "%d-%d", r[0], r[1])
		}
	}
	return b.String()
}

// Client certificate modes (CLIENT_CERT_MODE).
const (
	ClientCertOff      = "off"      // no certificate is asked for
	ClientCertOptional = "optional" // asked for, verified if sent; tokens still work
	ClientCertRequire  = "require"  // a handshake without a valid certificate fails
)

// loadClientCerts reads CLIENT_CA_PATH, CLIENT_CERT_MODE and
// CLIENT_CRL_PATH. Without CLIENT_CERT_MODE the mode is optional when a
// CA bundle is configured (a bundle set up and silently unused would be a
// surprise) and off otherwise. Both files are parsed here, so that a
// malformed one stops start-up with the variable named.
func loadClientCerts(p *parser, c *Config) {
	c.ClientCAPath = p.str("CLIENT_CA_PATH", "")
	c.ClientCRLPath = p.str("CLIENT_CRL_PATH", "")
	def := ClientCertOff
	if c.ClientCAPath != "" {
		def = ClientCertOptional
	}
	c.ClientCertMode = strings.ToLower(p.str("CLIENT_CERT_MODE", def))
	if c.ClientCertMode == "" {
		c.ClientCertMode = def
	}
	switch c.ClientCertMode {
	case ClientCertOff:
	case ClientCertOptional, ClientCertRequire:
		if c.ClientCAPath == "" {
			p.fail("CLIENT_CA_PATH", "is required when CLIENT_CERT_MODE is %s", c.ClientCertMode)
		}
	default:
		p.fail("CLIENT_CERT_MODE", "must be off, optional or require, got %q", c.ClientCertMode)
	}
	if c.ClientCRLPath != "" && c.ClientCAPath == "" {
		p.fail("CLIENT_CRL_PATH", "needs CLIENT_CA_PATH (a CRL is checked against the CA that signed it)")
	}
	if c.ClientCAPath == "" {
		return
	}
	t, err := LoadClientTrust(c.ClientCAPath, c.ClientCRLPath)
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	c.ClientTrust = t
}

// LoadClientTrust reads the CA bundle and the CRLs (crlPath may be
// empty); its errors name the variable of the file at fault. SIGHUP
// reloads with it too.
func LoadClientTrust(caPath, crlPath string) (*auth.ClientTrust, error) {
	cas, err := auth.LoadClientCAs(caPath)
	if err != nil {
		return nil, fmt.Errorf("CLIENT_CA_PATH: %w", err)
	}
	var crls []*auth.CRL
	if crlPath != "" {
		if crls, err = auth.LoadCRLs(crlPath, cas); err != nil {
			return nil, fmt.Errorf("CLIENT_CRL_PATH: %w", err)
		}
	}
	return auth.NewClientTrust(cas, crls), nil
}

// loadHTTP3 reads HTTP3_ENABLED. HTTP/3 is off by default: few clients
// speak HTTP/3 to a proxy yet, and it opens a UDP port that firewalls must
// allow on purpose.
//
// CONNECT-UDP flows are refused unless their port is in ALLOWED_UDP_PORTS
// (DefaultAllowedUDPPorts: DNS, QUIC on 443, and the unprivileged range
// where other QUIC and WebRTC media live; the privileged ports below 1024
// are left out as for TCP, where NTP 123, SNMP 161, syslog 514 and other
// amplifiable or management services sit). MAX_UDP_FLOWS_PER_TOKEN bounds
// the sockets a token holds: a browser opens one flow per QUIC origin.
// UDP_IDLE_TIMEOUT is 2 minutes, the shortest UDP mapping lifetime RFC
// 4787 (REQ-5) allows a NAT: clients keep UDP state alive at least that
// often, and a flow costs a socket while it lasts.
func loadHTTP3(p *parser, c *Config) {
	c.HTTP3Enabled = p.bool("HTTP3_ENABLED", false)
	ps, err := ParsePortSet(p.str("ALLOWED_UDP_PORTS", DefaultAllowedUDPPorts))
	if err != nil {
		p.fail("ALLOWED_UDP_PORTS", "%v", err)
	}
	c.AllowedUDPPorts = ps
	c.MaxUDPFlowsPerToken = p.int("MAX_UDP_FLOWS_PER_TOKEN", 128, 1, 1<<30)
	c.UDPIdleTimeout = p.duration("UDP_IDLE_TIMEOUT", 2*time.Minute)
	if c.UDPIdleTimeout <= 0 {
		p.fail("UDP_IDLE_TIMEOUT", "must be more than 0")
	}
}

// DefaultAllowedUDPPorts is ALLOWED_UDP_PORTS when unset (see loadHTTP3).
const DefaultAllowedUDPPorts = "53,443,1024-65535"
