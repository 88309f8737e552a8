package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func lookupOf(m map[string]string) Lookup {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestDefaultsInDevMode(t *testing.T) {
	c, err := Load(lookupOf(nil), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr() != "127.0.0.1:8443" || !c.HTTPProxyEnabled || c.RateLimitRequestsPerMinute != 10000 ||
		c.RateLimitBurstSize != 500 || c.RateLimitMaxTokens != 10000 || c.AdminAddr != "127.0.0.1:9090" ||
		c.LogBatchSize != 100 || c.LogBatchInterval != 5*time.Second || c.ShutdownTimeout != 30*time.Second ||
		c.ProbeNodeRegion != "dev" || c.LogLevel != "info" {
		t.Errorf("dev defaults: %+v", c)
	}
	for port, want := range map[uint16]bool{80: true, 443: true, 1024: true, 65535: true, 22: false, 25: false, 1023: false} {
		if c.AllowedPorts.Contains(port) != want {
			t.Errorf("default ALLOWED_PORTS contains %d = %v", port, !want)
		}
	}
}

func TestProductionRequiresSecretAndCertificate(t *testing.T) {
	_, err := Load(lookupOf(nil), false)
	for _, want := range []string{"JWT_SECRET is required", "TLS_CERT_PATH is required", "TLS_KEY_PATH is required"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
	_, err = Load(lookupOf(map[string]string{"JWT_SECRET": "short", "TLS_CERT_PATH": "/nonexistent/cert.pem", "TLS_KEY_PATH": t.TempDir()}), false)
	for _, want := range []string{"JWT_SECRET must be at least 32 bytes", "TLS_CERT_PATH: no such file", "TLS_KEY_PATH: is a directory"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not say %q", err, want)
		}
	}
}

func TestInvalidValuesNameTheVariable(t *testing.T) {
	for name, value := range map[string]string{
		"PROXY_PORT":         "70000",
		"PROXY_BIND":         "not-an-ip",
		"HTTP_PROXY_ENABLED": "maybe",
		"EGRESS_ALLOW_CIDRS": "10.0.0.0/33",
		"ALLOWED_PORTS":      "443,0",
		"DNS_SERVERS":        "resolver.example",
		"LOG_LEVEL":          "loud",
		"SHUTDOWN_TIMEOUT":   "soon",
		"BACKEND_URL":        "ftp://backend",
		"ADMIN_ADDR":         "9090",
		"LOG_BATCH_SIZE":     "0",
		"LOG_SHIP_TIMEOUT":   "0",
	} {
		_, err := Load(lookupOf(map[string]string{name: value}), true)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s=%q: error %v does not name the variable", name, value, err)
		}
	}
}

func TestParsing(t *testing.T) {
	c, err := Load(lookupOf(map[string]string{
		"EGRESS_ALLOW_CIDRS": "127.0.0.0/8, ::1, 10.1.2.3/16",
		"DNS_SERVERS":        "127.0.0.1:5353,::1",
		"ALLOWED_PORTS":      "443, 8000-8100",
		"SHUTDOWN_TIMEOUT":   "45",
		"LOG_BATCH_INTERVAL": "250ms",
		"LOG_SHIP_TIMEOUT":   "3",
		"RUST_LOG":           "pinaka=debug,hyper=warn",
		"BACKEND_URL":        "https://backend.example/",
	}), true)
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"), netip.MustParsePrefix("10.1.0.0/16")}
	if len(c.EgressAllowCIDRs) != 3 || c.EgressAllowCIDRs[0] != want[0] || c.EgressAllowCIDRs[1] != want[1] || c.EgressAllowCIDRs[2] != want[2] {
		t.Errorf("allow %v", c.EgressAllowCIDRs)
	}
	if strings.Join(c.DNSServers, ",") != "127.0.0.1:5353,[::1]:53" {
		t.Errorf("dns %v", c.DNSServers)
	}
	if c.AllowedPorts.String() != "443,8000-8100" || !c.AllowedPorts.Contains(8050) || c.AllowedPorts.Contains(80) {
		t.Errorf("ports %v", c.AllowedPorts)
	}
	if c.ShutdownTimeout != 45*time.Second || c.LogBatchInterval != 250*time.Millisecond || c.LogShipTimeout != 3*time.Second {
		t.Errorf("durations %v %v %v", c.ShutdownTimeout, c.LogBatchInterval, c.LogShipTimeout)
	}
	if c.LogLevel != "debug" {
		t.Errorf("RUST_LOG directive level: %q", c.LogLevel)
	}
	if c.BackendURL != "https://backend.example" {
		t.Errorf("backend %q", c.BackendURL)
	}
}

func TestLogLevelWinsOverRustLog(t *testing.T) {
	c, err := Load(lookupOf(map[string]string{"RUST_LOG": "debug", "LOG_LEVEL": "warn"}), true)
	if err != nil || c.LogLevel != "warn" {
		t.Fatalf("%v %q", err, c.LogLevel)
	}
	for in, want := range map[string]string{"info": "info", "trace": "trace", "warn,pinaka=debug": "warn", "": "info"} {
		if got := rustLevel(in); got != want && !(in == "" && got == "info") {
			t.Errorf("rustLevel(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestEnvironmentWinsOverDotEnv(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".env")
	os.WriteFile(path, []byte("PROXY_PORT=9000\nPROBE_NODE_REGION=from-file\n# comment\nLOG_LEVEL=debug\n"), 0o600)
	for _, k := range []string{"PROBE_NODE_REGION", "LOG_LEVEL", "RUST_LOG"} {
		t.Setenv(k, "") // restored after the test
		os.Unsetenv(k)
	}
	t.Setenv("PROXY_PORT", "9100")
	lookup, err := EnvWithDotEnv(path, true)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Load(lookup, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.ProxyPort != 9100 || c.ProbeNodeRegion != "from-file" || c.LogLevel != "debug" {
		t.Errorf("port %d region %q level %q", c.ProxyPort, c.ProbeNodeRegion, c.LogLevel)
	}
	if _, err := EnvWithDotEnv(filepath.Join(t.TempDir(), "missing.env"), true); err == nil {
		t.Error("an explicit missing --env-file was accepted")
	}
	if _, err := EnvWithDotEnv(filepath.Join(t.TempDir(), "missing.env"), false); err != nil {
		t.Errorf("an absent default .env is an error: %v", err)
	}
}

func TestHardeningLimits(t *testing.T) {
	c, err := Load(lookupOf(map[string]string{}), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxConnectionsPerIP != 512 || c.MaxUnauthenticatedConnectionsPerIP != 64 || c.MaxForwardsPerToken != 256 ||
		c.UnauthenticatedRecordsPerMinute != 60 || c.RequestBodyIdleTimeout != 60*time.Second {
		t.Errorf("defaults: %d %d %d %d %v", c.MaxConnectionsPerIP, c.MaxUnauthenticatedConnectionsPerIP,
			c.MaxForwardsPerToken, c.UnauthenticatedRecordsPerMinute, c.RequestBodyIdleTimeout)
	}
	c, err = Load(lookupOf(map[string]string{
		"MAX_CONNECTIONS_PER_IP": "0", "MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP": "0", "REQUEST_BODY_IDLE_TIMEOUT": "0",
	}), true)
	if err != nil || c.MaxConnectionsPerIP != 0 || c.MaxUnauthenticatedConnectionsPerIP != 0 || c.RequestBodyIdleTimeout != 0 {
		t.Errorf("0 turns the caps off: %v %+v", err, c)
	}
	for _, bad := range []map[string]string{
		{"MAX_CONNECTIONS_PER_IP": "-1"},
		{"MAX_FORWARDS_PER_TOKEN": "0"},
		{"UNAUTHENTICATED_RECORDS_PER_MINUTE": "0"},
		{"REQUEST_BODY_IDLE_TIMEOUT": "soon"},
	} {
		if _, err := Load(lookupOf(bad), true); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// JWT_PUBLIC_KEYS alone is a source of trust; a file that does not parse
// is refused at start, the message naming the variable.
func TestPublicKeysReplaceTheSecret(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, []byte("x"), 0o600)
	os.WriteFile(key, []byte("x"), 0o600)
	good := filepath.Join(dir, "keys.json")
	// RFC 8037 A.2's Ed25519 public key.
	os.WriteFile(good, []byte(`{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}`), 0o600)
	bad := filepath.Join(dir, "bad.pem")
	os.WriteFile(bad, []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"), 0o600)
	base := map[string]string{"TLS_CERT_PATH": cert, "TLS_KEY_PATH": key}
	with := func(k, v string) Lookup {
		m := map[string]string{k: v}
		for a, b := range base {
			m[a] = b
		}
		return lookupOf(m)
	}

	c, err := Load(with("JWT_PUBLIC_KEYS", good), false)
	if err != nil {
		t.Fatalf("public keys without a secret: %v", err)
	}
	if len(c.JWTSecret) != 0 || c.JWTPublicKeys.Len() != 1 || c.JWTPublicKeys.IDs()[0] != "k1" {
		t.Errorf("config: secret %d bytes, keys %v", len(c.JWTSecret), c.JWTPublicKeys.IDs())
	}
	_, err = Load(lookupOf(base), false)
	if err == nil || !strings.Contains(err.Error(), "JWT_SECRET is required (or JWT_PUBLIC_KEYS") {
		t.Errorf("neither source: %v", err)
	}
	for _, path := range []string{bad, filepath.Join(dir, "missing"), dir} {
		_, err = Load(with("JWT_PUBLIC_KEYS", path), false)
		if err == nil || !strings.HasPrefix(err.Error(), "JWT_PUBLIC_KEYS: ") || strings.Contains(err.Error(), "JWT_SECRET") {
			t.Errorf("JWT_PUBLIC_KEYS=%s: %v", path, err)
		}
	}
}

func TestJWKSURLSettings(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, []byte("x"), 0o600)
	os.WriteFile(key, []byte("x"), 0o600)
	env := func(kv ...string) Lookup {
		m := map[string]string{"TLS_CERT_PATH": cert, "TLS_KEY_PATH": key}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return lookupOf(m)
	}
	c, err := Load(env("JWKS_URL", "https://issuer.test/jwks.json", "STATE_DIR", dir), false)
	if err != nil {
		t.Fatalf("JWKS_URL alone: %v", err)
	}
	if c.JWKSURL != "https://issuer.test/jwks.json" || c.JWKSRefreshInterval != 5*time.Minute || c.StateDir != dir {
		t.Errorf("config: %q %v %q", c.JWKSURL, c.JWKSRefreshInterval, c.StateDir)
	}
	for _, tc := range []struct{ k, v, want string }{
		{"JWKS_URL", "file:///etc/keys", "JWKS_URL must be an http:// or https:// URL"},
		{"JWKS_REFRESH_INTERVAL", "0", "JWKS_REFRESH_INTERVAL must be at least 1s"},
		{"STATE_DIR", filepath.Join(dir, "missing"), "STATE_DIR must be an existing directory"},
		{"STATE_DIR", cert, "STATE_DIR must be an existing directory"},
	} {
		_, err := Load(env("JWT_SECRET", strings.Repeat("s", 32), tc.k, tc.v), false)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s=%s: %v", tc.k, tc.v, err)
		}
	}
}
