package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// configVariables are every variable pinaka and its collector read. Tests
// unset them all so that nothing from the machine running the tests leaks
// into a case.
var configVariables = []string{
	"PROXY_PORT", "PROXY_BIND", "HTTP_PROXY_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH",
	"JWT_SECRET", "JWT_PUBLIC_KEYS", "JWKS_URL", "JWKS_REFRESH_INTERVAL", "STATE_DIR", "BACKEND_URL", "BACKEND_API_KEY", "PROBE_NODE_NAME", "PROBE_NODE_REGION",
	"RATE_LIMIT_REQUESTS_PER_MINUTE", "RATE_LIMIT_BURST_SIZE", "RATE_LIMIT_MAX_TOKENS",
	"RUST_LOG", "LOG_LEVEL", "EGRESS_ALLOW_CIDRS", "EGRESS_DENY_CIDRS", "ALLOWED_PORTS",
	"DNS_SERVERS", "ADMIN_ADDR", "LOG_BATCH_SIZE", "LOG_BATCH_INTERVAL", "LOG_SPOOL_DIR",
	"SHUTDOWN_TIMEOUT", "JWT_LEEWAY", "MAX_CONNECTIONS", "MAX_TUNNELS_PER_TOKEN",
	"AUTH_FAILURES_PER_MINUTE", "MAX_HEADER_BYTES", "HTTP2_MAX_CONCURRENT_STREAMS",
	"HEADER_READ_TIMEOUT", "IDLE_TIMEOUT", "TUNNEL_IDLE_TIMEOUT", "UPSTREAM_CONNECT_TIMEOUT",
	"UPSTREAM_RESPONSE_TIMEOUT", "DNS_TIMEOUT", "DNS_CACHE_SIZE", "ADD_X_FORWARDED_FOR",
	"LOG_SPOOL_MAX_BYTES", "LOG_QUEUE_SIZE", "LOG_INCLUDE_QUERY", "LOG_SHIP_TIMEOUT",
	"MAX_FORWARDS_PER_TOKEN", "MAX_CONNECTIONS_PER_IP", "MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP",
	"UNAUTHENTICATED_RECORDS_PER_MINUTE", "REQUEST_BODY_IDLE_TIMEOUT",
	"CLIENT_CA_PATH", "CLIENT_CERT_MODE", "CLIENT_CRL_PATH",
	"COLLECTOR_ADDR", "COLLECTOR_API_KEY", "DATABASE_URL", "COLLECTOR_INSECURE_NO_AUTH",
	"REVOCATION_URL", "REVOCATION_INTERVAL",
}

// clearEnv unsets every configuration variable for the rest of the test
// (t.Setenv restores the original values afterwards). An empty value is
// not the same as unset for some variables, hence Unsetenv.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, k := range configVariables {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
}

// setEnv sets variables for the rest of the test.
func setEnv(t *testing.T, vars map[string]string) {
	t.Helper()
	for k, v := range vars {
		t.Setenv(k, v)
	}
}

// envFile writes a .env file into a fresh temporary directory.
func envFile(t *testing.T, vars map[string]string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("# written by the test\n")
	for k, v := range vars {
		b.WriteString(k + "=" + v + "\n")
	}
	path := filepath.Join(t.TempDir(), ".env")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// emptyEnvFile is an --env-file with nothing in it, so no ./.env is read.
func emptyEnvFile(t *testing.T) string { return envFile(t, nil) }

type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

func runCLI(args ...string) result {
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return result{code: code, stdout: out.String(), stderr: errOut.String()}
}

var subcommands = []string{"serve", "token", "keygen", "collector", "check-config", "version", "revoke"}

func TestHelpListsCommands(t *testing.T) {
	for _, arg := range []string{"--help", "-h", "help"} {
		r := runCLI(arg)
		if r.code != 0 {
			t.Errorf("pinaka %s: %v", arg, r)
		}
		for _, c := range subcommands {
			if !strings.Contains(r.stdout, "pinaka "+c) {
				t.Errorf("pinaka %s does not list %q:\n%s", arg, c, r.stdout)
			}
		}
	}
}

func TestNoArgumentsPrintsUsage(t *testing.T) {
	r := runCLI()
	if r.code != 2 || !strings.Contains(r.stderr, "Usage:") || r.stdout != "" {
		t.Errorf("pinaka with no arguments: %v", r)
	}
}

func TestUnknownCommand(t *testing.T) {
	r := runCLI("frobnicate")
	if r.code != 2 {
		t.Errorf("exit %d, want 2", r.code)
	}
	if !strings.Contains(r.stderr, `unknown command "frobnicate"`) || !strings.Contains(r.stderr, "Usage:") {
		t.Errorf("stderr does not name the command and show usage:\n%s", r.stderr)
	}
}

func TestSubcommandHelp(t *testing.T) {
	for _, c := range []string{"serve", "token", "collector", "check-config", "revoke"} {
		r := runCLI(c, "--help")
		if r.code != 0 {
			t.Errorf("pinaka %s --help: %v", c, r)
		}
		if !strings.Contains(r.stderr, "-env-file") {
			t.Errorf("pinaka %s --help does not describe --env-file:\n%s", c, r.stderr)
		}
	}
	if r := runCLI("serve", "--no-such-flag"); r.code != 1 || !strings.Contains(r.stderr, "no-such-flag") {
		t.Errorf("pinaka serve --no-such-flag: %v", r)
	}
}

func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		r := runCLI(arg)
		v, ok := strings.CutPrefix(strings.TrimSpace(r.stdout), "pinaka ")
		if r.code != 0 || !ok || v == "" || strings.ContainsAny(v, " \n") {
			t.Errorf("pinaka %s: %v", arg, r)
		}
	}
}

const testSecret = "0123456789abcdef0123456789abcdef-test-secret"

func TestTokenMintsAVerifiableToken(t *testing.T) {
	clearEnv(t)
	t.Setenv("JWT_SECRET", testSecret)
	before := time.Now()
	r := runCLI("token", "--env-file", emptyEnvFile(t), "--user", "alice", "--token-id", "42",
		"--regions", "us-east, eu-west", "--ttl", "2h")
	after := time.Now()
	if r.code != 0 {
		t.Fatalf("pinaka token: %v", r)
	}
	tok := strings.TrimSpace(r.stdout)
	if strings.Count(tok, ".") != 2 || strings.Contains(r.stdout, testSecret) {
		t.Fatalf("output is not a single JWT: %q", r.stdout)
	}

	id, err := auth.NewVerifier([]byte(testSecret), "eu-west", 0).Verify(tok)
	if err != nil {
		t.Fatalf("minted token does not verify: %v", err)
	}
	if id.UserID != "alice" || id.TokenID != "42" || id.TokenType != "manual" ||
		!slices.Equal(id.Regions, []string{"us-east", "eu-west"}) {
		t.Errorf("claims = %+v", id)
	}
	// exp is whole seconds: within a second of now + ttl.
	lo, hi := before.Add(2*time.Hour-time.Second), after.Add(2*time.Hour+time.Second)
	if id.Expires.Before(lo) || id.Expires.After(hi) {
		t.Errorf("exp = %v, want about %v", id.Expires, before.Add(2*time.Hour))
	}
	if _, err := auth.NewVerifier([]byte(testSecret), "ap-south", 0).Verify(tok); !errors.Is(err, auth.ErrRegion) {
		t.Errorf("token verified in a region it does not list: %v", err)
	}
	if _, err := auth.NewVerifier([]byte(strings.Repeat("x", 32)), "eu-west", 0).Verify(tok); !errors.Is(err, auth.ErrInvalid) {
		t.Errorf("token verified with another secret: %v", err)
	}
}

// Ids of exactly auth.MaxIDLen bytes are the longest the token command
// mints, and the proxy accepts them.
func TestTokenLongestIDs(t *testing.T) {
	clearEnv(t)
	t.Setenv("JWT_SECRET", testSecret)
	tokenID, user := strings.Repeat("t", auth.MaxIDLen), strings.Repeat("u", auth.MaxIDLen)
	r := runCLI("token", "--env-file", emptyEnvFile(t), "--user", user, "--token-id", tokenID, "--regions", "*")
	if r.code != 0 {
		t.Fatalf("pinaka token: %v", r)
	}
	id, err := auth.NewVerifier([]byte(testSecret), "eu-west", 0).Verify(strings.TrimSpace(r.stdout))
	if err != nil || id.TokenID != tokenID || id.UserID != user {
		t.Fatalf("Verify = %+v, %v", id, err)
	}
}

func TestTokenFromEnvFileWithTypeAndAlgorithm(t *testing.T) {
	clearEnv(t)
	file := envFile(t, map[string]string{"JWT_SECRET": testSecret})
	r := runCLI("token", "--env-file", file, "--token-id", "session_5", "--regions", "*",
		"--type", "session", "--alg", "HS512", "--ttl", "10m")
	if r.code != 0 {
		t.Fatalf("pinaka token: %v", r)
	}
	tok := strings.TrimSpace(r.stdout)
	id, err := auth.NewVerifier([]byte(testSecret), "anywhere", 0).Verify(tok)
	if err != nil {
		t.Fatalf("token from the .env secret does not verify: %v", err)
	}
	if id.TokenID != "session_5" || id.TokenType != "session" || !slices.Equal(id.Regions, []string{"*"}) {
		t.Errorf("claims = %+v", id)
	}
	hdr, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	if err != nil {
		t.Fatal(err)
	}
	var h struct{ Alg string }
	if err := json.Unmarshal(hdr, &h); err != nil || h.Alg != "HS512" {
		t.Errorf("header alg = %q (%v), want HS512", h.Alg, err)
	}
}

func TestTokenErrors(t *testing.T) {
	tests := []struct {
		name   string
		secret string
		args   []string
		want   string
	}{
		{"short secret", "too-short", []string{"--token-id", "1", "--regions", "*"}, "JWT_SECRET"},
		{"no secret", "", []string{"--token-id", "1", "--regions", "*"}, "JWT_SECRET"},
		{"no token id", testSecret, []string{"--regions", "*"}, "--token-id"},
		{"no regions", testSecret, []string{"--token-id", "1"}, "--regions"},
		{"blank regions", testSecret, []string{"--token-id", "1", "--regions", " , "}, "--regions"},
		{"bad algorithm", testSecret, []string{"--token-id", "1", "--regions", "*", "--alg", "RS256"}, "RS256"},
		{"bad ttl", testSecret, []string{"--token-id", "1", "--regions", "*", "--ttl", "-1h"}, "ttl"},
		// Ids the proxy would refuse (auth.CheckID): the record store's
		// token_id column is VARCHAR(50).
		{"token id of 60 characters", testSecret, []string{"--token-id", strings.Repeat("t", 60), "--regions", "*"},
			"--token-id: token_id is longer than 50 bytes"},
		{"user id of 51 characters", testSecret, []string{"--token-id", "1", "--user", strings.Repeat("u", 51), "--regions", "*"},
			"--user: user_id is longer than 50 bytes"},
		{"token id with NUL", testSecret, []string{"--token-id", "t\x00", "--regions", "*"}, "--token-id: token_id contains a control character"},
		{"token id with newline", testSecret, []string{"--token-id", "t\n1", "--regions", "*"}, "--token-id: token_id contains a control character"},
		{"user id not UTF-8", testSecret, []string{"--token-id", "1", "--user", "\xff", "--regions", "*"}, "--user: user_id is not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			if tt.secret != "" {
				t.Setenv("JWT_SECRET", tt.secret)
			}
			r := runCLI(append([]string{"token", "--env-file", emptyEnvFile(t)}, tt.args...)...)
			if r.code != 1 || !strings.Contains(r.stderr, tt.want) {
				t.Errorf("want exit 1 naming %q, got %v", tt.want, r)
			}
			if r.stdout != "" {
				t.Errorf("printed a token anyway: %q", r.stdout)
			}
			if tt.secret != "" && strings.Contains(r.stderr, tt.secret) {
				t.Errorf("error output contains the secret")
			}
		})
	}
}

// TestServeConfigErrors: serve refuses to start on a bad configuration,
// exiting non-zero with every bad variable named.
func TestServeConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		want []string
	}{
		{"nothing configured", nil, []string{"JWT_SECRET is required", "TLS_CERT_PATH is required", "TLS_KEY_PATH is required"}},
		{"bad port", map[string]string{"PROXY_PORT": "99999", "JWT_SECRET": testSecret}, []string{"PROXY_PORT must be between 1 and 65535"}},
		{"bad bind", map[string]string{"PROXY_BIND": "proxy.example", "JWT_SECRET": testSecret}, []string{"PROXY_BIND must be an IP address"}},
		{"bad admin", map[string]string{"ADMIN_ADDR": "9090", "JWT_SECRET": testSecret}, []string{"ADMIN_ADDR must be host:port"}},
		{"bad duration", map[string]string{"SHUTDOWN_TIMEOUT": "soon", "JWT_SECRET": testSecret}, []string{"SHUTDOWN_TIMEOUT must be a duration"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			setEnv(t, tt.env)
			r := runCLI("serve", "--env-file", emptyEnvFile(t))
			if r.code != 1 {
				t.Fatalf("want exit 1, got %v", r)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stderr, w) {
					t.Errorf("stderr does not say %q:\n%s", w, r.stderr)
				}
			}
			if strings.Contains(r.stderr, testSecret) {
				t.Errorf("error output contains JWT_SECRET")
			}
		})
	}
}

func TestExplicitEnvFileMustExist(t *testing.T) {
	clearEnv(t)
	missing := filepath.Join(t.TempDir(), "nope.env")
	for _, c := range []string{"serve", "token", "check-config", "collector"} {
		r := runCLI(c, "--env-file", missing)
		if r.code != 1 || !strings.Contains(r.stderr, missing) {
			t.Errorf("pinaka %s --env-file missing: %v", c, r)
		}
	}
}

func TestCollectorConfigErrors(t *testing.T) {
	clearEnv(t)
	r := runCLI("collector", "--env-file", emptyEnvFile(t))
	if r.code != 1 || !strings.Contains(r.stderr, "DATABASE_URL") || !strings.Contains(r.stderr, "COLLECTOR_API_KEY") {
		t.Errorf("collector without DATABASE_URL and a key: %v", r)
	}
	t.Setenv("DATABASE_URL", "postgres://pinaka@127.0.0.1:5432/pinaka")
	t.Setenv("COLLECTOR_API_KEY", "k")
	t.Setenv("COLLECTOR_ADDR", "8080")
	r = runCLI("collector", "--env-file", emptyEnvFile(t))
	if r.code != 1 || !strings.Contains(r.stderr, "COLLECTOR_ADDR") || strings.Contains(r.stderr, "DATABASE_URL") {
		t.Errorf("collector with a bad COLLECTOR_ADDR: %v", r)
	}
}
