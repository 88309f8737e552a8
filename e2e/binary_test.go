// Package e2e tests the built pinaka binary from the outside: started as
// an operator starts it (explicit environment, no --dev), on a loopback
// port, reached by real clients (curl, an HTTP/2 client speaking RFC 8441).
// The browser test is chromium.mjs, run by run.sh.
//
// The binary is built once per test run, or taken from PINAKA_BIN. A
// missing curl skips its tests unless E2E_REQUIRE is set (run.sh sets it).
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/auth"
)

const secret = "e2e-secret-0123456789abcdef0123456789abcdef"

// Loopback only, as in lib.sh: deny every IPv4 range but 127.0.0.0/8 and
// all IPv6, and send DNS to a closed loopback port.
const (
	denyCIDRs  = "0.0.0.0/2,64.0.0.0/3,96.0.0.0/4,112.0.0.0/5,120.0.0.0/6,124.0.0.0/7,126.0.0.0/8,128.0.0.0/1,::/0"
	dnsServers = "127.0.0.1:9"
)

// fixture is what every test shares: the binary, and one self-signed
// certificate (127.0.0.1, localhost) used by the proxy and the TLS origins.
var fixture struct {
	once     sync.Once
	err      error
	dir      string
	certFile string
	keyFile  string
	cert     tls.Certificate
	roots    *x509.CertPool
}

func TestMain(m *testing.M) {
	code := m.Run()
	if fixture.dir != "" {
		os.RemoveAll(fixture.dir)
	}
	testutil.RemoveBuilt()
	os.Exit(code)
}

func setup(t *testing.T) {
	t.Helper()
	fixture.once.Do(func() { fixture.err = buildFixture() })
	if fixture.err != nil {
		t.Fatal(fixture.err)
	}
	testutil.BuildPinaka(t)
}

func buildFixture() error {
	dir, err := os.MkdirTemp("", "pinaka-e2e-go")
	if err != nil {
		return err
	}
	fixture.dir = dir
	cert, certPEM, keyPEM, err := selfsigned.Cert(24*time.Hour, "127.0.0.1", "localhost")
	if err != nil {
		return err
	}
	fixture.cert = cert
	fixture.certFile = filepath.Join(dir, "cert.pem")
	fixture.keyFile = filepath.Join(dir, "key.pem")
	if err := os.WriteFile(fixture.certFile, certPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(fixture.keyFile, keyPEM, 0o600); err != nil {
		return err
	}
	fixture.roots = x509.NewCertPool()
	fixture.roots.AppendCertsFromPEM(certPEM)
	return nil
}

// proc is a running pinaka process.
type proc struct{ *testutil.Pinaka }

// startPinaka runs the binary with the e2e configuration plus extra
// ("NAME=value"). The environment is built from scratch so nothing of the
// caller's (a BACKEND_URL, say) leaks in.
func startPinaka(t *testing.T, extra ...string) *proc {
	t.Helper()
	setup(t)
	return &proc{testutil.StartPinaka(t, append([]string{
		"JWT_SECRET=" + secret,
		"TLS_CERT_PATH=" + fixture.certFile,
		"TLS_KEY_PATH=" + fixture.keyFile,
		"ADMIN_ADDR=off",
		"EGRESS_ALLOW_CIDRS=127.0.0.0/8",
		"EGRESS_DENY_CIDRS=" + denyCIDRs,
		"DNS_SERVERS=" + dnsServers,
		"PROBE_NODE_REGION=us-east",
		"PROBE_NODE_NAME=e2e",
		"LOG_LEVEL=info",
		"SHUTDOWN_TIMEOUT=5s",
	}, extra...)...)}
}

// records returns the request records the process has logged.
func (p *proc) records(t *testing.T) []accesslog.Record {
	t.Helper()
	var out []accesslog.Record
	sc := bufio.NewScanner(strings.NewReader(p.Log.String()))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if !bytes.Contains(sc.Bytes(), []byte(`"msg":"request"`)) {
			continue
		}
		var r accesslog.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("bad record %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}

// waitRecord waits for a record matching f: records are written when a
// request or tunnel ends, which may be just after the client saw it end.
func (p *proc) waitRecord(t *testing.T, what string, f func(accesslog.Record) bool) accesslog.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		for _, r := range p.records(t) {
			if f(r) {
				return r
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no record for %s", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func mint(t *testing.T, tokenID string, regions ...string) string {
	t.Helper()
	tok, err := auth.Mint([]byte(secret), auth.MintOptions{UserID: "e2e-user", TokenID: tokenID, Regions: regions, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// requireTool finds a command, skipping the test when it is missing,
// unless E2E_REQUIRE is set.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("E2E_REQUIRE") != "" {
			t.Fatalf("%s not found (scripts/deps.sh installs it)", name)
		}
		t.Skipf("%s not found", name)
	}
	return path
}

func tlsConfig(protos ...string) *tls.Config {
	return &tls.Config{RootCAs: fixture.roots, ServerName: "127.0.0.1", NextProtos: protos}
}
