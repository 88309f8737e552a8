package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
)

// Secret values the output must never show.
const (
	jwtSecretValue  = "jwt-secret-value-that-must-never-be-printed"
	backendKeyValue = "backend-api-key-that-must-never-be-printed"
)

// writeCertPair writes a self-signed certificate valid for validity (negative:
// already expired) and its key into dir.
func writeCertPair(t *testing.T, dir string, validity time.Duration) (certPath, keyPath string) {
	t.Helper()
	_, certPEM, keyPEM, err := selfsigned.Cert(validity)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return certPath, keyPath
}

// goodConfig is a complete, valid configuration with a fresh certificate.
func goodConfig(t *testing.T) map[string]string {
	t.Helper()
	cert, key := writeCertPair(t, t.TempDir(), 90*24*time.Hour)
	return map[string]string{
		"TLS_CERT_PATH":      cert,
		"TLS_KEY_PATH":       key,
		"JWT_SECRET":         jwtSecretValue,
		"BACKEND_URL":        "http://127.0.0.1:8080/",
		"BACKEND_API_KEY":    backendKeyValue,
		"PROBE_NODE_NAME":    "probe-7",
		"PROBE_NODE_REGION":  "us-east",
		"EGRESS_ALLOW_CIDRS": "127.0.0.0/8, 10.1.2.3",
		"ALLOWED_PORTS":      "443,8000-9000",
		"LOG_LEVEL":          "warning",
	}
}

// settings parses check-config's "NAME  value" table.
func settings(out string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "  "); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

func TestCheckConfigGood(t *testing.T) {
	clearEnv(t)
	setEnv(t, goodConfig(t))
	r := runCLI("check-config", "--env-file", emptyEnvFile(t))
	if r.code != 0 {
		t.Fatalf("check-config: %v", r)
	}
	if !strings.HasSuffix(r.stdout, "configuration OK\n") {
		t.Errorf("stdout does not end with \"configuration OK\":\n%s", r.stdout)
	}
	for _, secret := range []string{jwtSecretValue, backendKeyValue} {
		if strings.Contains(r.stdout+r.stderr, secret) {
			t.Errorf("output contains a secret value %q:\n%s", secret, r.stdout)
		}
	}
	s := settings(r.stdout)
	want := map[string]string{
		"PROXY_BIND:PROXY_PORT": "0.0.0.0:443",
		"JWT_SECRET":            "(set, 43 bytes)",
		"BACKEND_API_KEY":       "(set, 42 bytes)",
		"BACKEND_URL":           "http://127.0.0.1:8080",
		"PROBE_NODE_NAME":       "probe-7",
		"PROBE_NODE_REGION":     "us-east",
		"EGRESS_ALLOW_CIDRS":    "127.0.0.0/8,10.1.2.3/32",
		"EGRESS_DENY_CIDRS":     "(none)",
		"ALLOWED_PORTS":         "443,8000-9000",
		"ALLOWED_UDP_PORTS":     "53,443,1024-65535",
		"UDP_IDLE_TIMEOUT":      "2m0s",
		"LOG_LEVEL":             "warn",
		"ADMIN_ADDR":            "127.0.0.1:9090",
		"SHUTDOWN_TIMEOUT":      "30s",
		"LOG_SPOOL_DIR":         "(not set)",
	}
	for k, v := range want {
		if s[k] != v {
			t.Errorf("%s shown as %q, want %q", k, s[k], v)
		}
	}
	if !regexp.MustCompile(`^pinaka dev, names localhost,127\.0\.0\.1,::1, expires \d{4}-`).MatchString(s["certificate"]) {
		t.Errorf("certificate line = %q", s["certificate"])
	}
	// Every configuration variable with a setting has a row.
	for _, k := range []string{"HTTP_PROXY_ENABLED", "JWT_LEEWAY", "RATE_LIMIT_REQUESTS_PER_MINUTE", "MAX_CONNECTIONS",
		"HTTP2_MAX_CONCURRENT_STREAMS", "TUNNEL_IDLE_TIMEOUT", "DNS_SERVERS", "LOG_BATCH_INTERVAL", "LOG_SHIP_TIMEOUT", "LOG_INCLUDE_QUERY",
		"HTTP3_ENABLED", "ALLOWED_UDP_PORTS", "MAX_UDP_FLOWS_PER_TOKEN", "UDP_IDLE_TIMEOUT"} {
		if _, ok := s[k]; !ok {
			t.Errorf("no %s row", k)
		}
	}
}

func TestCheckConfigRedactsBackendURLPassword(t *testing.T) {
	clearEnv(t)
	setEnv(t, goodConfig(t))
	t.Setenv("BACKEND_URL", "https://shipper:url-password-value@127.0.0.1:8443/base")
	r := runCLI("check-config", "--env-file", emptyEnvFile(t))
	if r.code != 0 {
		t.Fatalf("check-config: %v", r)
	}
	if strings.Contains(r.stdout, "url-password-value") {
		t.Errorf("BACKEND_URL password printed:\n%s", r.stdout)
	}
	if got := settings(r.stdout)["BACKEND_URL"]; got != "https://shipper:xxxxx@127.0.0.1:8443/base" {
		t.Errorf("BACKEND_URL shown as %q", got)
	}
}

func TestCheckConfigReadsDotEnv(t *testing.T) {
	clearEnv(t)
	file := envFile(t, goodConfig(t))
	r := runCLI("check-config", "--env-file", file)
	if r.code != 0 {
		t.Fatalf("check-config with everything in .env: %v", r)
	}
	s := settings(r.stdout)
	if s["PROBE_NODE_REGION"] != "us-east" || s["JWT_SECRET"] != "(set, 43 bytes)" {
		t.Errorf(".env values not loaded: region %q, secret %q", s["PROBE_NODE_REGION"], s["JWT_SECRET"])
	}
	if strings.Contains(r.stdout, jwtSecretValue) {
		t.Errorf("output contains JWT_SECRET from .env")
	}
}

func TestCheckConfigEnvironmentWinsOverDotEnv(t *testing.T) {
	clearEnv(t)
	file := envFile(t, goodConfig(t))
	t.Setenv("PROBE_NODE_REGION", "eu-west")
	t.Setenv("PROXY_PORT", "8443")
	r := runCLI("check-config", "--env-file", file)
	if r.code != 0 {
		t.Fatalf("check-config: %v", r)
	}
	s := settings(r.stdout)
	if s["PROBE_NODE_REGION"] != "eu-west" || s["PROXY_BIND:PROXY_PORT"] != "0.0.0.0:8443" {
		t.Errorf("environment did not win: region %q, listener %q", s["PROBE_NODE_REGION"], s["PROXY_BIND:PROXY_PORT"])
	}
	// A bad value in the environment is not hidden by a good one in .env.
	t.Setenv("LOG_LEVEL", "loud")
	if r := runCLI("check-config", "--env-file", file); r.code != 1 || !strings.Contains(r.stderr, "LOG_LEVEL") {
		t.Errorf("bad LOG_LEVEL in the environment: %v", r)
	}
}

func TestCheckConfigDevMode(t *testing.T) {
	clearEnv(t)
	r := runCLI("check-config", "--dev", "--env-file", emptyEnvFile(t))
	if r.code != 0 {
		t.Fatalf("check-config --dev with nothing set: %v", r)
	}
	s := settings(r.stdout)
	if s["PROXY_BIND:PROXY_PORT"] != "127.0.0.1:8443" || s["certificate"] != "generated at start (dev mode)" ||
		s["PROBE_NODE_REGION"] != "dev" {
		t.Errorf("dev settings: listener %q, certificate %q, region %q",
			s["PROXY_BIND:PROXY_PORT"], s["certificate"], s["PROBE_NODE_REGION"])
	}
	// Without --dev the same empty configuration is refused.
	if r := runCLI("check-config", "--env-file", emptyEnvFile(t)); r.code != 1 {
		t.Errorf("check-config without --dev accepted an empty configuration: %v", r)
	}
}

func TestCheckConfigBad(t *testing.T) {
	tests := []struct {
		name string
		// edit changes a good configuration; dir is a scratch directory.
		edit func(t *testing.T, c map[string]string, dir string)
		want []string
	}{
		{"JWT_SECRET too short", func(t *testing.T, c map[string]string, _ string) {
			c["JWT_SECRET"] = "short-secret-value"
		}, []string{"JWT_SECRET must be at least 32 bytes"}},
		{"JWT_SECRET missing", func(t *testing.T, c map[string]string, _ string) {
			delete(c, "JWT_SECRET")
		}, []string{"JWT_SECRET is required"}},
		{"JWT_PUBLIC_KEYS malformed", func(t *testing.T, c map[string]string, dir string) {
			p := filepath.Join(dir, "keys.pem")
			if err := os.WriteFile(p, []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			c["JWT_PUBLIC_KEYS"] = p
		}, []string{"JWT_PUBLIC_KEYS: ", "PEM block 1"}},
		{"JWT_PUBLIC_KEYS missing file", func(t *testing.T, c map[string]string, dir string) {
			delete(c, "JWT_SECRET")
			c["JWT_PUBLIC_KEYS"] = filepath.Join(dir, "missing.json")
		}, []string{"JWT_PUBLIC_KEYS: ", "no such file"}},
		{"TLS_CERT_PATH file missing", func(t *testing.T, c map[string]string, dir string) {
			c["TLS_CERT_PATH"] = filepath.Join(dir, "missing.pem")
		}, []string{"TLS_CERT_PATH: no such file"}},
		{"TLS_KEY_PATH is a directory", func(t *testing.T, c map[string]string, dir string) {
			c["TLS_KEY_PATH"] = dir
		}, []string{"TLS_KEY_PATH: is a directory"}},
		{"PROXY_PORT out of range", func(t *testing.T, c map[string]string, _ string) {
			c["PROXY_PORT"] = "0"
		}, []string{"PROXY_PORT must be between 1 and 65535"}},
		{"PROXY_PORT not a number", func(t *testing.T, c map[string]string, _ string) {
			c["PROXY_PORT"] = "https"
		}, []string{"PROXY_PORT must be an integer"}},
		{"ALLOWED_PORTS", func(t *testing.T, c map[string]string, _ string) {
			c["ALLOWED_PORTS"] = "80,9000-8000"
		}, []string{"ALLOWED_PORTS", "9000-8000"}},
		{"EGRESS_ALLOW_CIDRS", func(t *testing.T, c map[string]string, _ string) {
			c["EGRESS_ALLOW_CIDRS"] = "10.0.0.0/33"
		}, []string{"EGRESS_ALLOW_CIDRS has an invalid CIDR", "10.0.0.0/33"}},
		{"LOG_LEVEL", func(t *testing.T, c map[string]string, _ string) {
			c["LOG_LEVEL"] = "loud"
		}, []string{"LOG_LEVEL must be one of"}},
		{"BACKEND_URL", func(t *testing.T, c map[string]string, _ string) {
			c["BACKEND_URL"] = "ftp://127.0.0.1/logs"
		}, []string{"BACKEND_URL must be an http:// or https:// URL"}},
		{"several at once", func(t *testing.T, c map[string]string, _ string) {
			c["PROXY_PORT"], c["DNS_SERVERS"], c["HTTP_PROXY_ENABLED"] = "-1", "resolver.invalid", "perhaps"
		}, []string{"PROXY_PORT", "DNS_SERVERS", "HTTP_PROXY_ENABLED"}},
		{"certificate and key do not match", func(t *testing.T, c map[string]string, dir string) {
			_, otherKey := writeCertPair(t, dir, time.Hour)
			c["TLS_KEY_PATH"] = otherKey
		}, []string{"TLS_CERT_PATH/TLS_KEY_PATH", "private key does not match public key"}},
		{"certificate expired", func(t *testing.T, c map[string]string, dir string) {
			c["TLS_CERT_PATH"], c["TLS_KEY_PATH"] = writeCertPair(t, dir, -time.Minute)
		}, []string{"TLS_CERT_PATH: certificate expired on"}},
		{"certificate not PEM", func(t *testing.T, c map[string]string, dir string) {
			p := filepath.Join(dir, "garbage.pem")
			if err := os.WriteFile(p, []byte("not a certificate"), 0o644); err != nil {
				t.Fatal(err)
			}
			c["TLS_CERT_PATH"] = p
		}, []string{"TLS_CERT_PATH/TLS_KEY_PATH"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			c := goodConfig(t)
			tt.edit(t, c, t.TempDir())
			setEnv(t, c)
			r := runCLI("check-config", "--env-file", emptyEnvFile(t))
			if r.code != 1 {
				t.Fatalf("want exit 1, got %v", r)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr does not say %q:\n%s", w, r.stderr)
				}
			}
			if strings.Contains(r.stdout, "configuration OK") {
				t.Errorf("said OK on stdout:\n%s", r.stdout)
			}
			for _, secret := range []string{jwtSecretValue, backendKeyValue, "short-secret-value"} {
				if strings.Contains(r.stdout+r.stderr, secret) {
					t.Errorf("output contains a secret value %q", secret)
				}
			}
		})
	}
}
