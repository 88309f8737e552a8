package collector

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// pki is the test's certificates: serverCA signs the collector's
// certificate, nodeCA the nodes', other is a CA nobody trusts.
type pki struct {
	dir                     string
	serverCA, nodeCA, other *testutil.TestCA
	serverCAPath            string // a node's BACKEND_CA_PATH
}

func newPKI(t *testing.T) *pki {
	p := &pki{
		dir:      t.TempDir(),
		serverCA: testutil.NewTestCA(t, "collector CA"),
		nodeCA:   testutil.NewTestCA(t, "node CA"),
		other:    testutil.NewTestCA(t, "other CA"),
	}
	p.serverCAPath = filepath.Join(p.dir, "server-ca.pem")
	testutil.WriteFile(t, p.serverCAPath, p.serverCA.CertPEM)
	return p
}

// nodeCert issues a client certificate naming node from ca.
func (p *pki) nodeCert(t *testing.T, ca *testutil.TestCA, file, node string) (certPath, keyPath string) {
	return ca.IssueFiles(t, p.dir, file, testutil.Leaf{CommonName: node, URIs: []string{backendtls.NodeURIPrefix + node}, Client: true})
}

// tlsCollector is `pinaka collector` with TLS and node certificates on a
// loopback port, over a fresh database.
type tlsCollector struct {
	url                             string
	pool                            *pgxpool.Pool
	reload                          chan os.Signal
	certPath, keyPath, clientCAPath string
}

// startTLSCollector configures the collector through LoadConfig, as
// `pinaka collector` does, with extra variables env.
func startTLSCollector(t *testing.T, p *pki, env ...string) *tlsCollector {
	t.Helper()
	pool, dsn := testDB(t)
	c := &tlsCollector{pool: pool, reload: make(chan os.Signal, 1)}
	c.certPath, c.keyPath = p.serverCA.IssueFiles(t, p.dir, "collector", testutil.Leaf{CommonName: "collector", IPs: []string{"127.0.0.1"}})
	c.clientCAPath = filepath.Join(p.dir, "node-ca.pem")
	testutil.WriteFile(t, c.clientCAPath, p.nodeCA.CertPEM)
	vars := map[string]string{
		"DATABASE_URL":             dsn,
		"COLLECTOR_TLS_CERT_PATH":  c.certPath,
		"COLLECTOR_TLS_KEY_PATH":   c.keyPath,
		"COLLECTOR_CLIENT_CA_PATH": c.clientCAPath,
		"SHUTDOWN_TIMEOUT":         "5s",
	}
	for i := 0; i < len(env); i += 2 {
		vars[env[i]] = env[i+1]
	}
	cfg, err := LoadConfig(func(k string) (string, bool) { v, ok := vars[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	cfg.Reload = c.reload
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.url = "https://" + ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, testLog(), ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("collector: %v", err)
		}
	})
	// Healthy once migrated: asked with a node certificate, which the
	// listener requires of everyone.
	cert, key := p.nodeCert(t, p.nodeCA, "probe", "probe")
	hc := c.client(t, p, cert, key)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := hc.Get(c.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("collector never healthy: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	hc.CloseIdleConnections()
	return c
}

// client is the node's HTTP client to the collector, built the way the
// proxy builds it (config → backendtls), with certPath/keyPath "" for none.
func (c *tlsCollector) client(t *testing.T, p *pki, certPath, keyPath string) *http.Client {
	t.Helper()
	bt, err := backendtls.New(backendtls.Options{CAPath: p.serverCAPath, CertPath: certPath, KeyPath: keyPath})
	if err != nil {
		t.Fatal(err)
	}
	hc, err := bt.HTTPClient(c.url, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return hc
}

// metric reads one sample from the collector's /metrics.
func (c *tlsCollector) metric(t *testing.T, hc *http.Client, name string) string {
	t.Helper()
	resp, err := hc.Get(c.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return v
		}
	}
	return "absent"
}

// mtlsShipper is the proxy's shipper for node, with bt's client.
func mtlsShipper(t *testing.T, url string, hc *http.Client, node, spoolDir string) (*accesslog.Shipper, *metrics.Metrics) {
	t.Helper()
	m := metrics.New()
	s, err := accesslog.New(accesslog.Options{
		Log: testLog(), BackendURL: url, BatchSize: 3, BatchInterval: time.Hour, SpoolDir: spoolDir,
		ProbeNode: node, Region: "eu-west", Metrics: m, Client: hc,
		RetryBase: time.Millisecond, RetryMax: 5 * time.Millisecond, MaxAttempts: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s, m
}

func spooled(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".json") {
			n++
		}
	}
	return n
}

func nodeRecord(node, tok string) accesslog.Record {
	return accesslog.Record{Timestamp: time.Now(), TokenID: tok, ProbeNode: node, Method: "CONNECT", Protocol: "HTTP/2", TargetURL: "example.com:443", StatusCode: 200, Success: true}
}

// The shipper presents node-a's certificate to a collector that requires
// node certificates (and has no API key): the batch is stored.
func TestMTLSShipperStored(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p)
	cert, key := p.nodeCert(t, p.nodeCA, "node-a", "node-a")
	s, m := mtlsShipper(t, c.url, c.client(t, p, cert, key), "node-a", t.TempDir())
	for i := range 3 {
		s.Record(nodeRecord("", fmt.Sprintf("mtls-%d", i)))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := count(t, c.pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE probe_node = 'node-a' AND token_id LIKE 'mtls-%'`); got != 3 {
		t.Errorf("%d records of node-a stored, want 3", got)
	}
	if got := promtest.ToFloat64(m.BatchesSent); got != 1 {
		t.Errorf("batches sent = %v, want 1", got)
	}
}

// A node without a certificate, and one whose certificate another CA
// signed, are refused at the handshake: nothing is stored, the shipper
// keeps the batch in its spool, and the collector counts the handshakes.
func TestMTLSRefusedAtHandshake(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p)
	otherCert, otherKey := p.nodeCert(t, p.other, "foreign", "node-a")
	noID, noIDKey := p.nodeCA.IssueFiles(t, p.dir, "noid", testutil.Leaf{CommonName: "node-a", DNSNames: []string{"node-a"}, Client: true})
	for _, tc := range []struct{ name, cert, key, want string }{
		{"no certificate", "", "", "certificate required"},
		{"certificate from another CA", otherCert, otherKey, "unknown certificate authority"},
		{"certificate naming no node", noID, noIDKey, "bad certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hc := c.client(t, p, tc.cert, tc.key)
			if _, err := hc.Get(c.url + "/healthz"); err == nil {
				t.Error("GET /healthz succeeded")
			}
			// The alert itself: with TLS 1.3 the client finishes its
			// side first and reads the server's refusal next.
			cfg := hc.Transport.(*http.Transport).TLSClientConfig.Clone()
			conn, err := tls.Dial("tcp", strings.TrimPrefix(c.url, "https://"), cfg)
			if err == nil {
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("handshake: err = %v, want %q", err, tc.want)
			}
			dir := t.TempDir()
			s, m := mtlsShipper(t, c.url, hc, "node-a", dir)
			for i := range 3 {
				s.Record(nodeRecord("", "refused-"+tc.name+fmt.Sprint(i)))
			}
			if err := s.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := spooled(t, dir); got != 1 {
				t.Errorf("%d batches in the spool, want 1 (kept for redelivery)", got)
			}
			if got := promtest.ToFloat64(m.BatchesDeadLetter); got != 0 {
				t.Errorf("%v batches dead-lettered, want 0", got)
			}
		})
	}
	if got := count(t, c.pool, `SELECT count(*) FROM forward_proxy_request_logs`); got != 0 {
		t.Errorf("%d records stored, want 0", got)
	}
	cert, key := p.nodeCert(t, p.nodeCA, "reader", "reader")
	// At least the three GETs and three shipper attempts failed.
	if v := c.metric(t, c.client(t, p, cert, key), "pinaka_collector_tls_handshake_failures_total"); v == "0" || v == "absent" {
		t.Errorf("pinaka_collector_tls_handshake_failures_total = %s, want > 0", v)
	}
}

// node-a's certificate with records claiming node-b (in the records or in
// the envelope): 403, nothing stored, counted; the shipper dead-letters it.
func TestMTLSOtherNodesRecordsRefused(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p)
	cert, key := p.nodeCert(t, p.nodeCA, "node-a", "node-a")
	hc := c.client(t, p, cert, key)

	dir := t.TempDir()
	s, m := mtlsShipper(t, c.url, hc, "node-a", dir)
	s.Record(nodeRecord("", "mine-1"))
	s.Record(nodeRecord("node-b", "theirs"))
	s.Record(nodeRecord("", "mine-2"))
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := promtest.ToFloat64(m.BatchesDeadLetter); got != 1 {
		t.Errorf("%v batches dead-lettered, want 1", got)
	}
	dl, err := os.ReadFile(filepath.Join(dir, accesslog.DeadLetterFile))
	if err != nil || !strings.Contains(string(dl), "theirs") || !strings.Contains(string(dl), "403") {
		t.Errorf("dead-letter file: %v %.300s", err, dl)
	}

	// The envelope claiming another node, posted directly.
	b := sampleBatch(2) // probe_node node-1 everywhere
	req, _ := http.NewRequest(http.MethodPost, c.url+accesslog.BatchPath, strings.NewReader(string(mustJSON(b))))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var body [512]byte
	n, _ := resp.Body.Read(body[:])
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body[:n]), `batch claims probe_node \"node-1\" but the node certificate says \"node-a\"`) {
		t.Errorf("envelope of node-1 from node-a: %d %s", resp.StatusCode, body[:n])
	}

	if got := count(t, c.pool, `SELECT count(*) FROM forward_proxy_request_logs`); got != 0 {
		t.Errorf("%d records stored, want 0", got)
	}
	if got := count(t, c.pool, `SELECT count(*) FROM forward_proxy_batches`); got != 0 {
		t.Errorf("%d batches stored, want 0", got)
	}
	if v := c.metric(t, hc, `pinaka_collector_batches_refused_total{reason="node_mismatch"}`); v != "2" {
		t.Errorf("node_mismatch refusals = %s, want 2", v)
	}
}

// With an API key configured too, both are required.
func TestMTLSWithAPIKeyNeedsBoth(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p, "COLLECTOR_API_KEY", testKey)
	cert, key := p.nodeCert(t, p.nodeCA, "node-1", "node-1")
	hc := c.client(t, p, cert, key)
	for _, tc := range []struct {
		key  string
		want int
	}{{"", 401}, {"wrong", 401}, {testKey, 200}} {
		req, _ := http.NewRequest(http.MethodPost, c.url+accesslog.BatchPath, strings.NewReader(string(mustJSON(sampleBatch(1)))))
		if tc.key != "" {
			req.Header.Set("Authorization", "Bearer "+tc.key)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("key %q: %d, want %d", tc.key, resp.StatusCode, tc.want)
		}
	}
}

// The shipper verifies the collector with BACKEND_CA_PATH: a collector
// whose certificate another CA signed is refused, the batch stays in the
// spool and is retried, and once the node trusts that CA (a reload, what
// SIGHUP calls) it is delivered — without a restart and without loss.
func TestMTLSShipperVerifiesCollector(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p)
	// The node trusts only the other CA.
	caPath := filepath.Join(p.dir, "node-trusts.pem")
	testutil.WriteFile(t, caPath, p.other.CertPEM)
	cert, key := p.nodeCert(t, p.nodeCA, "node-a", "node-a")
	bt, err := backendtls.New(backendtls.Options{CAPath: caPath, CertPath: cert, KeyPath: key, Node: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	hc, err := bt.HTTPClient(c.url, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hc.Get(c.url + "/healthz"); err == nil || !strings.Contains(err.Error(), "BACKEND_CA_PATH") {
		t.Fatalf("GET with the wrong CA: err = %v, want a verification error", err)
	} else if !errors.As(err, new(*tls.CertificateVerificationError)) {
		t.Errorf("error is not a certificate verification error: %v", err)
	}
	dir := t.TempDir()
	s, m := mtlsShipper(t, c.url, hc, "node-a", dir)
	for i := range 3 {
		s.Record(nodeRecord("", fmt.Sprintf("late-%d", i)))
	}
	waitFor(t, "the batch to be spooled", func() bool { return promtest.ToFloat64(m.BatchesSpooled) >= 1 })
	if got := count(t, c.pool, `SELECT count(*) FROM forward_proxy_request_logs`); got != 0 {
		t.Fatalf("%d records stored through an unverified collector", got)
	}
	testutil.WriteFile(t, caPath, append(append([]byte{}, p.other.CertPEM...), p.serverCA.CertPEM...))
	if err := bt.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the spooled batch to be delivered", func() bool {
		return count(t, c.pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id LIKE 'late-%'`) == 3
	})
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := spooled(t, dir); got != 0 {
		t.Errorf("%d batches left in the spool, want 0", got)
	}
}

// SIGHUP (the Reload channel) gives new handshakes the collector's new
// certificate and client CA bundle; a bad file on reload is refused,
// counted, and the one in use kept.
func TestCollectorTLSReload(t *testing.T) {
	p := newPKI(t)
	c := startTLSCollector(t, p)
	newNodeCA := testutil.NewTestCA(t, "node CA 2")
	oldCert, oldKey := p.nodeCert(t, p.nodeCA, "old", "node-1")
	newCert, newKey := p.nodeCert(t, newNodeCA, "new", "node-1")
	serial := func() string {
		conn, err := tls.Dial("tcp", strings.TrimPrefix(c.url, "https://"), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	status := func(cert, key string) error {
		hc := c.client(t, p, cert, key)
		defer hc.CloseIdleConnections()
		resp, err := hc.Get(c.url + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
	before := serial()
	if err := status(newCert, newKey); err == nil {
		t.Fatal("a node certificate from a CA not yet in the bundle was accepted")
	}

	// Rotation: a new collector certificate, and the new node CA added
	// beside the old one (the overlap).
	p.serverCA.IssueFiles(t, p.dir, "collector", testutil.Leaf{CommonName: "collector 2", IPs: []string{"127.0.0.1"}})
	testutil.WriteFile(t, c.clientCAPath, append(append([]byte{}, p.nodeCA.CertPEM...), newNodeCA.CertPEM...))
	c.reload <- os.Interrupt // any signal value: serve only reads the channel
	waitFor(t, "the new certificate to be served", func() bool { return serial() != before })
	for _, tc := range []struct{ name, cert, key string }{{"old CA", oldCert, oldKey}, {"new CA", newCert, newKey}} {
		if err := status(tc.cert, tc.key); err != nil {
			t.Errorf("during the overlap, node certificate of the %s refused: %v", tc.name, err)
		}
	}

	// End of the overlap: the old CA goes; then a bad bundle is refused.
	testutil.WriteFile(t, c.clientCAPath, newNodeCA.CertPEM)
	c.reload <- os.Interrupt
	waitFor(t, "the old node CA to be dropped", func() bool { return status(oldCert, oldKey) != nil })
	testutil.WriteFile(t, c.clientCAPath, []byte("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"))
	c.reload <- os.Interrupt
	hc := c.client(t, p, newCert, newKey)
	waitFor(t, "the bad reload to be counted", func() bool {
		return c.metric(t, hc, "pinaka_collector_tls_reload_failures_total") == "1"
	})
	hc.CloseIdleConnections()
	if err := status(newCert, newKey); err != nil {
		t.Errorf("after a refused reload the bundle in use should stay: %v", err)
	}
}

// waitFor polls cond; the deadline only bounds a failing test.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLoadConfigTLS(t *testing.T) {
	p := newPKI(t)
	cert, key := p.serverCA.IssueFiles(t, p.dir, "collector", testutil.Leaf{IPs: []string{"127.0.0.1"}})
	bad := filepath.Join(p.dir, "bad.pem")
	testutil.WriteFile(t, bad, []byte("not pem"))
	missing := filepath.Join(p.dir, "missing.pem")
	db := "postgres://u@127.0.0.1/db"
	env := func(kv ...string) func(string) (string, bool) {
		m := map[string]string{"DATABASE_URL": db}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	// A client CA is a credential: no API key needed.
	c, err := LoadConfig(env("COLLECTOR_TLS_CERT_PATH", cert, "COLLECTOR_TLS_KEY_PATH", key, "COLLECTOR_CLIENT_CA_PATH", p.serverCAPath))
	if err != nil || !c.tls.requireNode() || c.APIKey != "" {
		t.Errorf("TLS with client CA and no key: %v (%+v)", err, c)
	}
	// TLS alone still needs the key.
	if _, err := LoadConfig(env("COLLECTOR_TLS_CERT_PATH", cert, "COLLECTOR_TLS_KEY_PATH", key)); err == nil || !strings.Contains(err.Error(), "COLLECTOR_API_KEY") {
		t.Errorf("TLS without client CA or key: %v", err)
	}
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"COLLECTOR_TLS_CERT_PATH", cert}, "COLLECTOR_TLS_CERT_PATH is set but COLLECTOR_TLS_KEY_PATH is not"},
		{[]string{"COLLECTOR_TLS_KEY_PATH", key}, "COLLECTOR_TLS_KEY_PATH is set but COLLECTOR_TLS_CERT_PATH is not"},
		{[]string{"COLLECTOR_CLIENT_CA_PATH", p.serverCAPath}, "COLLECTOR_CLIENT_CA_PATH needs COLLECTOR_TLS_CERT_PATH"},
		{[]string{"COLLECTOR_TLS_CERT_PATH", missing, "COLLECTOR_TLS_KEY_PATH", key, "COLLECTOR_API_KEY", "k"}, "COLLECTOR_TLS_CERT_PATH/COLLECTOR_TLS_KEY_PATH"},
		{[]string{"COLLECTOR_TLS_CERT_PATH", cert, "COLLECTOR_TLS_KEY_PATH", bad, "COLLECTOR_API_KEY", "k"}, "COLLECTOR_TLS_CERT_PATH/COLLECTOR_TLS_KEY_PATH"},
		{[]string{"COLLECTOR_TLS_CERT_PATH", cert, "COLLECTOR_TLS_KEY_PATH", key, "COLLECTOR_CLIENT_CA_PATH", bad}, "COLLECTOR_CLIENT_CA_PATH"},
		{[]string{"COLLECTOR_TLS_CERT_PATH", cert, "COLLECTOR_TLS_KEY_PATH", key, "COLLECTOR_CLIENT_CA_PATH", missing}, "COLLECTOR_CLIENT_CA_PATH"},
	} {
		if _, err := LoadConfig(env(tc.env...)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("LoadConfig(%v) = %v, want an error containing %q", tc.env, err, tc.want)
		}
	}
}
