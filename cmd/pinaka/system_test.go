package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
)

// fakeBackend is the batch endpoint with a switch: failing (503) or
// accepting. It keeps every batch it accepted, by batch_id.
type fakeBackend struct {
	*httptest.Server
	failing  atomic.Bool
	mu       sync.Mutex
	batches  map[string]accesslog.Batch
	attempts map[string]int
	auth     string
}

func newFakeBackend(t *testing.T) *fakeBackend {
	b := &fakeBackend{batches: map[string]accesslog.Batch{}, attempts: map[string]int{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/forward-proxy/logs/batch" || r.Method != "POST" {
			http.Error(w, "wrong endpoint", 404)
			return
		}
		var batch accesslog.Batch
		if err := json.NewDecoder(r.Body).Decode(&batch); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		b.attempts[batch.BatchID]++
		b.auth = r.Header.Get("Authorization")
		if b.failing.Load() {
			http.Error(w, "down", 503)
			return
		}
		b.batches[batch.BatchID] = batch
	}))
	t.Cleanup(b.Close)
	return b
}

// records returns every accepted record, and how often each appeared.
func (b *fakeBackend) records() (all []accesslog.Record, dup int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	seen := map[string]bool{}
	for _, batch := range b.batches {
		for _, r := range batch.Logs {
			key := r.Timestamp.String() + r.TargetURL + r.Method
			if seen[key] {
				dup++
			}
			seen[key] = true
			all = append(all, r)
		}
	}
	return all, dup
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// forward sends one plain-HTTP request through the proxy and returns the
// status.
func forward(t *testing.T, proxyAddr, target, auth string) int {
	t.Helper()
	pu, _ := url.Parse("https://" + proxyAddr)
	tr := &http.Transport{Proxy: http.ProxyURL(pu), TLSClientConfig: insecureTLS()}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("GET", target, nil)
	if auth != "" {
		req.Header.Set("Proxy-Authorization", auth)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func origin(t *testing.T) string {
	o := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from origin")
	}))
	t.Cleanup(o.Close)
	return o.URL
}

// Records reach the backend exactly once, even when the backend is down
// for a whole proxy lifetime: they wait in the spool across the restart.
func TestRecordsExactlyOnceAcrossRestartWithSpool(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	spool := filepath.Join(dir, "spool")
	backend := newFakeBackend(t)
	backend.failing.Store(true)
	env := []string{"BACKEND_URL=" + backend.URL, "BACKEND_API_KEY=k-123", "LOG_SPOOL_DIR=" + spool,
		"LOG_BATCH_SIZE=4", "LOG_BATCH_INTERVAL=100ms", "SHUTDOWN_TIMEOUT=5s"}
	o := origin(t)
	tok := "Bearer " + testToken(t)

	p := startBinary(t, certPath, keyPath, env...)
	for i := 0; i < 10; i++ {
		if s := forward(t, p.Addr, fmt.Sprintf("%s/req/%d", o, i), tok); s != 200 {
			t.Fatalf("request %d: %d", i, s)
		}
	}
	for i := 0; i < 2; i++ { // refused requests are records too
		if s := forward(t, p.Addr, o+"/unauth", ""); s != 407 {
			t.Fatalf("unauthenticated: %d", s)
		}
	}
	waitFor(t, "delivery attempts", func() bool {
		backend.mu.Lock()
		defer backend.mu.Unlock()
		return len(backend.attempts) > 0
	})
	p.Signal(syscall.SIGTERM)
	if code, _ := p.Wait(t, 20*time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	files, _ := filepath.Glob(filepath.Join(spool, "*.json"))
	if len(files) == 0 {
		t.Fatal("backend down at exit, but nothing was spooled")
	}
	if got, _ := backend.records(); len(got) != 0 {
		t.Fatalf("failing backend stored %d records", len(got))
	}

	// The backend is back; a new process delivers the spool.
	backend.failing.Store(false)
	p2 := startBinary(t, certPath, keyPath, env...)
	waitFor(t, "spooled records delivered", func() bool { got, _ := backend.records(); return len(got) >= 12 })
	if s := forward(t, p2.Addr, o+"/after-restart", tok); s != 200 {
		t.Fatalf("after restart: %d", s)
	}
	p2.Signal(syscall.SIGTERM)
	if code, _ := p2.Wait(t, 20*time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	got, dup := backend.records()
	if len(got) != 13 || dup != 0 {
		t.Fatalf("backend has %d records (%d duplicates), want 13 exactly once", len(got), dup)
	}
	statuses := map[int]int{}
	for _, r := range got {
		statuses[r.StatusCode]++
	}
	if statuses[200] != 11 || statuses[407] != 2 {
		t.Errorf("statuses %v", statuses)
	}
	backend.mu.Lock()
	for id, n := range backend.attempts {
		if _, ok := backend.batches[id]; !ok {
			t.Errorf("batch %s tried %d times, never stored", id, n)
		}
	}
	if backend.auth != "Bearer k-123" {
		t.Errorf("Authorization %q", backend.auth)
	}
	backend.mu.Unlock()
	if files, _ := filepath.Glob(filepath.Join(spool, "*.json")); len(files) != 0 {
		t.Errorf("spool still holds %v", files)
	}
}

var metricLine = regexp.MustCompile(`^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$`)

func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if m := metricLine.FindStringSubmatch(sc.Text()); m != nil {
			v, _ := strconv.ParseFloat(m[3], 64)
			out[m[1]+m[2]] = v
		}
	}
	return out
}

func TestAdminMetricsMoveByTheRightAmounts(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := startBinary(t, certPath, keyPath, "ADMIN_ADDR="+admin, "RATE_LIMIT_BURST_SIZE=8", "RATE_LIMIT_REQUESTS_PER_MINUTE=1",
		"EGRESS_ALLOW_CIDRS=127.0.0.0/8", "EGRESS_DENY_CIDRS=127.0.0.99/32")
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + admin + path)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", path, err, resp)
		}
		resp.Body.Close()
	}
	o := origin(t)
	tok := "Bearer " + testToken(t)
	for i := 0; i < 3; i++ {
		forward(t, p.Addr, o+"/ok", tok) // 3 × 200
	}
	forward(t, p.Addr, o+"/x", "")                     // 407 missing
	forward(t, p.Addr, o+"/x", "Bearer junk")          // 407 invalid
	forward(t, p.Addr, "http://127.0.0.99:8080/", tok) // 403 denied
	origin := echoOrigin(t)
	c, br := tunnel1(t, p.Addr, origin, testToken(t)) // 1 tunnel
	echoOnce(t, c, br, "0123456789")                  // 10 bytes each way
	m := scrape(t, admin)
	if m["pinaka_active_tunnels"] != 1 {
		t.Errorf("active tunnels %v, want 1", m["pinaka_active_tunnels"])
	}
	// Quiet for a second, both directions of the tunnel park.
	waitFor(t, "idle tunnel parked", func() bool { return scrape(t, admin)["pinaka_tunnel_directions_parked"] == 2 })
	c.Close()
	for i := 0; i < 6; i++ {
		forward(t, p.Addr, o+"/limited", tok) // bucket of 8: 3+1+1 used → 3 more pass, then 429s
	}
	waitFor(t, "tunnel closed", func() bool { return scrape(t, admin)["pinaka_active_tunnels"] == 0 })
	m = scrape(t, admin)
	want := map[string]float64{
		`pinaka_requests_total{method="GET",protocol="HTTP/1.1",status="200"}`:     6,
		`pinaka_requests_total{method="GET",protocol="HTTP/1.1",status="407"}`:     2,
		`pinaka_requests_total{method="GET",protocol="HTTP/1.1",status="403"}`:     1,
		`pinaka_requests_total{method="GET",protocol="HTTP/1.1",status="429"}`:     3,
		`pinaka_requests_total{method="CONNECT",protocol="HTTP/1.1",status="200"}`: 1,
		`pinaka_auth_failures_total{reason="missing"}`:                             1,
		`pinaka_auth_failures_total{reason="invalid"}`:                             1,
		`pinaka_egress_denied_total{reason="denied by EGRESS_DENY_CIDRS"}`:         1,
		`pinaka_rate_limited_total`:                                                3,
		`pinaka_active_tunnels`:                                                    0,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	if m["pinaka_upstream_bytes_total"] < 10 || m["pinaka_downstream_bytes_total"] < 10+6*17 {
		t.Errorf("bytes up %v down %v", m["pinaka_upstream_bytes_total"], m["pinaka_downstream_bytes_total"])
	}
	// Six forwards share one pooled upstream connection; the tunnel is the
	// second dial. The denied target never reaches a dial.
	if m["pinaka_upstream_dial_seconds_count"] != 2 {
		t.Errorf("dial histogram count %v, want 2", m["pinaka_upstream_dial_seconds_count"])
	}
	if exp := m["pinaka_tls_certificate_not_after_seconds"]; exp < float64(time.Now().Add(50*time.Minute).Unix()) || exp > float64(time.Now().Add(70*time.Minute).Unix()) {
		t.Errorf("certificate expiry gauge %v, want about an hour from now (the test certificate)", exp)
	}
	if m["pinaka_active_connections"] < 0 {
		t.Errorf("active connections %v", m["pinaka_active_connections"])
	}
}

// The whole pipeline: proxy → `pinaka collector` → PostgreSQL.
func TestProxyToCollectorToPostgres(t *testing.T) {
	pool, dsn := pgtest.NewDB(t)
	collAddr := "127.0.0.1:" + testutil.FreePort(t)
	coll := exec.Command(testutil.BuildPinaka(t), "collector")
	coll.Dir = t.TempDir()
	coll.Env = []string{"PATH=" + os.Getenv("PATH"), "COLLECTOR_ADDR=" + collAddr, "COLLECTOR_API_KEY=ck", "DATABASE_URL=" + dsn}
	collOut := &testutil.SyncBuffer{}
	coll.Stderr = collOut
	if err := coll.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		coll.Process.Signal(syscall.SIGTERM)
		coll.Wait()
		if t.Failed() {
			t.Logf("collector stderr:\n%s", collOut.String())
		}
	})
	waitFor(t, "collector up", func() bool {
		c, err := net.Dial("tcp", collAddr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath, "BACKEND_URL=http://"+collAddr, "BACKEND_API_KEY=ck",
		"LOG_BATCH_SIZE=100", "LOG_BATCH_INTERVAL=200ms", "PROBE_NODE_NAME=node-a")
	o := origin(t)
	tok := "Bearer " + testToken(t)
	for i := 0; i < 5; i++ {
		forward(t, p.Addr, fmt.Sprintf("%s/row/%d?q=secret", o, i), tok)
	}
	forward(t, p.Addr, o+"/denied", "")
	p.Signal(syscall.SIGTERM)
	if code, _ := p.Wait(t, 20*time.Second); code != 0 {
		t.Fatalf("proxy exit %d", code)
	}
	var n, ok, denied int
	var node, target string
	waitFor(t, "rows stored", func() bool {
		pool.QueryRow(context.Background(), `SELECT count(*) FROM forward_proxy_request_logs`).Scan(&n)
		return n == 6
	})
	pool.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE success), count(*) FILTER (WHERE status_code = 407) FROM forward_proxy_request_logs`).Scan(&ok, &denied)
	pool.QueryRow(context.Background(), `SELECT probe_node, target_url FROM forward_proxy_request_logs WHERE target_url LIKE '%/row/3'`).Scan(&node, &target)
	if ok != 5 || denied != 1 || node != "node-a" || strings.Contains(target, "secret") || target != o+"/row/3" {
		t.Errorf("stored: ok=%d denied=%d node=%q target=%q", ok, denied, node, target)
	}
}

// `pinaka healthcheck` follows the admin listener: 0 while ready, non-zero
// once the process is gone.
func TestHealthcheckSubcommand(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := startBinary(t, certPath, keyPath, "ADMIN_ADDR="+admin)
	waitFor(t, "admin listener", func() bool {
		c, err := net.Dial("tcp", admin)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	check := func() (string, error) {
		cmd := exec.Command(testutil.BuildPinaka(t), "healthcheck")
		cmd.Dir = t.TempDir()
		cmd.Env = []string{"ADMIN_ADDR=" + admin}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := check(); err != nil || !strings.Contains(out, "ready") {
		t.Fatalf("healthy proxy: %v %q", err, out)
	}
	p.Signal(syscall.SIGTERM)
	p.Wait(t, 20*time.Second)
	if out, err := check(); err == nil {
		t.Fatalf("stopped proxy reported healthy: %q", out)
	}
}
