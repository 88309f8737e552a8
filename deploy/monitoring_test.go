package deploy

// The dashboard (grafana/pinaka.json) and the alert rules
// (prometheus/pinaka-alerts.yml) are checked against the real thing: a
// Prometheus (Debian package `prometheus`, which ships promtool) scrapes a
// running pinaka, its collector and nothing else, while the test drives
// traffic through the proxy; then every dashboard query and every alert
// expression is evaluated through Prometheus's HTTP API.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

const (
	dashboardFile  = "grafana/pinaka.json"
	pendingFile    = "grafana/pending-metrics.txt"
	rulesFile      = "prometheus/pinaka-alerts.yml"
	rulesTestFile  = "prometheus/pinaka-alerts_test.yml"
	exampleConfig  = "prometheus/prometheus.example.yml"
	monitorSecret  = "monitoring-secret-0123456789abcdef0123456789"
	monitorRegion  = "us-east"
	monitorNode    = "node-a"
	rateInterval   = "5m" // $__rate_interval: longer than the whole test, so every window holds all its samples
	interval       = "1m" // $__interval
	scrapeInterval = "1s"
)

// requireTool finds a command, failing the test when it is missing: a
// skipped check here would be one that cannot fail.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (scripts/deps.sh installs the Debian package prometheus)", name)
	}
	return p
}

func promtool(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(requireTool(t, "promtool"), args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// alertNames lists the alerts of the rules file, in order.
func alertNames(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile(`(?m)^\s*- alert:\s*(\S+)\s*$`).FindAllSubmatch(b, -1) {
		names = append(names, string(m[1]))
	}
	if len(names) == 0 {
		t.Fatalf("%s has no alerts", rulesFile)
	}
	return names
}

// TestAlertRulesPromtool: the rules pass `promtool check rules`, their unit
// tests pass, every alert has a unit test where it fires and one where it
// does not, and the example scrape configuration is valid.
func TestAlertRulesPromtool(t *testing.T) {
	out := promtool(t, "check", "rules", rulesFile)
	names := alertNames(t)
	if !strings.Contains(out, fmt.Sprintf("SUCCESS: %d rules found", len(names))) {
		t.Errorf("promtool check rules: want %d rules:\n%s", len(names), out)
	}
	if strings.Contains(out, "WARNING") {
		t.Errorf("promtool check rules warns:\n%s", out)
	}
	promtool(t, "test", "rules", rulesTestFile)
	promtool(t, "check", "config", "--syntax-only", exampleConfig)

	// Which alerts the unit tests show firing (exp_alerts with entries) and
	// not firing (exp_alerts: []).
	f, err := os.Open(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	firing, quiet := map[string]bool{}, map[string]bool{}
	alertRe := regexp.MustCompile(`^\s*alertname:\s*(\S+)\s*$`)
	expRe := regexp.MustCompile(`^\s*exp_alerts:\s*(\[\])?\s*$`)
	cur := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := alertRe.FindStringSubmatch(sc.Text()); m != nil {
			cur = m[1]
		} else if m := expRe.FindStringSubmatch(sc.Text()); m != nil && cur != "" {
			if m[1] == "[]" {
				quiet[cur] = true
			} else {
				firing[cur] = true
			}
			cur = ""
		}
	}
	for _, n := range names {
		if !firing[n] {
			t.Errorf("%s: no unit test shows %s firing", rulesTestFile, n)
		}
		if !quiet[n] {
			t.Errorf("%s: no unit test shows %s not firing", rulesTestFile, n)
		}
	}
	for n := range firing {
		if !slices.Contains(names, n) {
			t.Errorf("%s tests %s, which is not in %s", rulesTestFile, n, rulesFile)
		}
	}
}

// ---- the dashboard -------------------------------------------------------

type grafanaPanel struct {
	Title   string         `json:"title"`
	Type    string         `json:"type"`
	Panels  []grafanaPanel `json:"panels"` // a collapsed row's
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

type dashboardQuery struct{ panel, expr string }

// dashboardQueries returns every query of the dashboard and the query of
// its node variable.
func dashboardQueries(t *testing.T) (queries []dashboardQuery, nodeVar string) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels     []grafanaPanel `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Type       string `json:"type"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				queries = append(queries, dashboardQuery{p.Title, tg.Expr})
			}
		}
	}
	walk(d.Panels)
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
		if v.Name == "node" {
			nodeVar = v.Definition
		}
	}
	if vars["datasource"] != "datasource" || vars["node"] != "query" || nodeVar == "" {
		t.Fatalf("%s: want a datasource variable and a node query variable, got %v", dashboardFile, vars)
	}
	if len(queries) == 0 {
		t.Fatalf("%s has no queries", dashboardFile)
	}
	return queries, nodeVar
}

// pendingMetrics reads the metrics the dashboard names before main
// exports them.
func pendingMetrics(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(pendingFile)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

// substitute replaces Grafana's variables the way Grafana would for one
// node; a variable left over fails the test.
func substitute(t *testing.T, expr, instance string) string {
	t.Helper()
	// As Grafana does for a regex variable in PromQL: the regex escaped,
	// then its backslashes escaped for the string literal.
	node := strings.ReplaceAll(regexp.QuoteMeta(instance), `\`, `\\`)
	r := strings.NewReplacer(
		"${node}", node, "$node", node,
		"$__rate_interval", rateInterval, "${__rate_interval}", rateInterval,
		"$__interval", interval, "${__interval}", interval,
		"$__range", rateInterval, "${__range}", rateInterval,
	)
	out := r.Replace(expr)
	if strings.Contains(out, "$") {
		t.Errorf("query has a variable the test does not know: %s", expr)
	}
	return out
}

// ---- Prometheus ----------------------------------------------------------

type prometheus struct {
	url string
	log *testutil.SyncBuffer
}

// startPrometheus runs /usr/bin/prometheus with config (a template where
// RULES stands for the rules file's absolute path) on a free loopback
// port, with its own storage; it returns once Prometheus is ready.
func startPrometheus(t *testing.T, config string) *prometheus {
	t.Helper()
	bin := requireTool(t, "prometheus")
	dir := t.TempDir()
	rules, err := filepath.Abs(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "prometheus.yml")
	testutil.WriteFile(t, cfgPath, []byte(strings.ReplaceAll(config, "RULES", rules)))
	for attempt := 0; attempt < 5; attempt++ {
		addr := "127.0.0.1:" + testutil.FreePort(t)
		p := &prometheus{url: "http://" + addr, log: &testutil.SyncBuffer{}}
		cmd := exec.Command(bin, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, fmt.Sprint("data", attempt)),
			"--web.listen-address="+addr, "--log.level=info")
		cmd.Dir = dir
		cmd.Stdout, cmd.Stderr = p.log, p.log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		stop := func() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
		}
		ready := false
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline) && !ready; {
			select {
			case <-exited:
				deadline = time.Time{}
				continue
			case <-time.After(100 * time.Millisecond):
			}
			if resp, err := http.Get(p.url + "/-/ready"); err == nil {
				ready = resp.StatusCode == 200
				resp.Body.Close()
			}
		}
		if ready {
			t.Cleanup(func() {
				stop()
				if t.Failed() {
					t.Logf("prometheus log:\n%s", p.log.String())
				}
			})
			return p
		}
		stop()
		if !strings.Contains(p.log.String(), "address already in use") {
			t.Fatalf("prometheus did not start:\n%s", p.log.String())
		}
	}
	t.Fatal("prometheus: no free port after 5 attempts")
	return nil
}

type sample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

func (s sample) float() float64 {
	str, _ := s.Value[1].(string)
	v, err := strconv.ParseFloat(str, 64)
	if err != nil {
		return math.NaN()
	}
	return v
}

// query evaluates expr now; a PromQL error is returned, not fatal.
func (p *prometheus) query(t *testing.T, expr string) ([]sample, error) {
	t.Helper()
	resp, err := http.PostForm(p.url+"/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string          `json:"resultType"`
			Result     json.RawMessage `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("query %s: %v", expr, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s", r.Error)
	}
	if r.Data.ResultType != "vector" {
		return nil, fmt.Errorf("result type %s, want vector", r.Data.ResultType)
	}
	var out []sample
	if err := json.Unmarshal(r.Data.Result, &out); err != nil {
		t.Fatal(err)
	}
	return out, nil
}

func (p *prometheus) value(t *testing.T, expr string) float64 {
	t.Helper()
	s, err := p.query(t, expr)
	if err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	if len(s) != 1 {
		return math.NaN()
	}
	return s[0].float()
}

func (p *prometheus) get(t *testing.T, path string, into any) {
	t.Helper()
	resp, err := http.Get(p.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func waitUntil(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ---- the live test -------------------------------------------------------

// selectorRe finds the vector selectors of an expression: a metric name of
// ours (or up, process_*) and its label matchers.
var selectorRe = regexp.MustCompile(`\b(up|process_[a-z_]+|pinaka_[a-z0-9_]+)\b(\{[^}]*\})?`)

// TestDashboardAndAlertsAgainstPrometheus runs pinaka (forwarding,
// tunnels, shipping to a collector over mutual TLS, revocation polling,
// client certificates with a CRL, fleet mode on Redis), scraped every
// second by a real Prometheus that also loads the alert rules; drives
// traffic (HTTP/1.1 and HTTP/2 forwarding and tunnels, 407, 403 for region
// and egress, 429); then:
//
//   - every dashboard query, its variables substituted, parses and returns
//     at least one series with a finite value, except queries that name a
//     metric of pendingFile, which must still parse (and the test fails if
//     pinaka exports such a metric: the list is then out of date);
//   - the node variable's query lists this node;
//   - every alert rule is loaded and evaluated by Prometheus without error,
//     its expression parses when queried, and each vector selector in it
//     (metric name and label matchers, comparison and functions removed)
//     selects at least one series: an alert that is empty when healthy
//     must still watch series that exist, or it could never fire;
//   - the alerts firing are exactly those the setup calls for: the
//     serving and the backend client certificate, both issued for a day,
//     expire within 14 days.
func TestDashboardAndAlertsAgainstPrometheus(t *testing.T) {
	requireTool(t, "prometheus")
	t.Setenv("PINAKA_BIN", staticBinary(t)) // skips with -short; testutil starts this binary
	bin := testutil.BuildPinaka(t)
	_, dsn := pgtest.NewDB(t)
	redis := testutil.StartRedis(t)
	dir := t.TempDir()

	// The collector, over mutual TLS; Prometheus scrapes it with a node
	// certificate of its own, as docs/OPERATIONS.md says to.
	serverCA, nodeCA := testutil.NewTestCA(t, "collector CA"), testutil.NewTestCA(t, "node CA")
	collCert, collKey := serverCA.IssueFiles(t, dir, "collector", testutil.Leaf{IPs: []string{"127.0.0.1"}})
	nodeCAPath, serverCAPath := filepath.Join(dir, "node-ca.pem"), filepath.Join(dir, "server-ca.pem")
	testutil.WriteFile(t, nodeCAPath, nodeCA.CertPEM)
	testutil.WriteFile(t, serverCAPath, serverCA.CertPEM)
	nodeCert, nodeKey := nodeCA.IssueFiles(t, dir, "node", testutil.Leaf{CommonName: monitorNode,
		URIs: []string{backendtls.NodeURIPrefix + monitorNode}, Client: true})
	promCert, promKey := nodeCA.IssueFiles(t, dir, "prometheus", testutil.Leaf{CommonName: "prometheus",
		URIs: []string{backendtls.NodeURIPrefix + "prometheus"}, Client: true})
	collAddr := "127.0.0.1:" + testutil.FreePort(t)
	coll := exec.Command(bin, "collector")
	coll.Dir = t.TempDir()
	coll.Env = []string{"PATH=" + os.Getenv("PATH"), "COLLECTOR_ADDR=" + collAddr, "DATABASE_URL=" + dsn,
		"COLLECTOR_TLS_CERT_PATH=" + collCert, "COLLECTOR_TLS_KEY_PATH=" + collKey, "COLLECTOR_CLIENT_CA_PATH=" + nodeCAPath}
	collOut := &testutil.SyncBuffer{}
	coll.Stderr = collOut
	if err := coll.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = coll.Process.Signal(syscall.SIGTERM)
		_ = coll.Wait()
		if t.Failed() {
			t.Logf("collector log:\n%s", collOut.String())
		}
	})
	waitUntil(t, "the collector", func() bool { return strings.Contains(collOut.String(), "collector listening") })

	// Client certificates (optional) with a CRL, so their metrics exist.
	clientCA := testpki.NewCA(t, "clients")
	clientCAPath := testpki.Write(t, dir, "client-ca.pem", clientCA.PEM)
	crlPath := testpki.Write(t, dir, "client.crl", clientCA.CRL(t, time.Now().Add(7*24*time.Hour)))

	_, certPEM, keyPEM, err := selfsigned.Cert(24*time.Hour, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "proxy.crt"), filepath.Join(dir, "proxy.key")
	testutil.WriteFile(t, certPath, certPEM)
	testutil.WriteFile(t, keyPath, keyPEM)
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := testutil.StartPinaka(t,
		"JWT_SECRET="+monitorSecret, "TLS_CERT_PATH="+certPath, "TLS_KEY_PATH="+keyPath,
		"ADMIN_ADDR="+admin, "PROBE_NODE_NAME="+monitorNode, "PROBE_NODE_REGION="+monitorRegion,
		// A name for the DNS-time panels; the test's own server on loopback.
		"EGRESS_ALLOW_CIDRS=127.0.0.0/8", "DNS_SERVERS="+testutil.StartDNS(t, map[string]string{
			"r0.origin.test.": "127.0.0.1", "r1.origin.test.": "127.0.0.1", "r2.origin.test.": "127.0.0.1",
		}),
		// Loopback only, as in e2e: every other IPv4 range and all IPv6 denied.
		"EGRESS_DENY_CIDRS=0.0.0.0/2,64.0.0.0/3,96.0.0.0/4,112.0.0.0/5,120.0.0.0/6,124.0.0.0/7,126.0.0.0/8,128.0.0.0/1,::/0",
		"BACKEND_URL=https://"+collAddr, "BACKEND_CA_PATH="+serverCAPath,
		"BACKEND_CLIENT_CERT_PATH="+nodeCert, "BACKEND_CLIENT_KEY_PATH="+nodeKey,
		"LOG_SPOOL_DIR="+t.TempDir(), "LOG_BATCH_INTERVAL=200ms",
		"CLIENT_CERT_MODE=optional", "CLIENT_CA_PATH="+clientCAPath, "CLIENT_CRL_PATH="+crlPath,
		"REDIS_URL="+redis.URL(), "REDIS_TIMEOUT=2s", "FLEET_SIZE=1",
		"RATE_LIMIT_BURST_SIZE=40", "RATE_LIMIT_REQUESTS_PER_MINUTE=60",
		"LOG_LEVEL=info", "SHUTDOWN_TIMEOUT=5s",
	)

	prom := startPrometheus(t, fmt.Sprintf(`global:
  scrape_interval: %[1]s
  evaluation_interval: %[1]s
rule_files:
  - RULES
scrape_configs:
  - job_name: pinaka
    static_configs:
      - targets: [%[2]q]
  - job_name: pinaka-collector
    scheme: https
    tls_config:
      ca_file: %[3]q
      cert_file: %[4]q
      key_file: %[5]q
    static_configs:
      - targets: [%[6]q]
`, scrapeInterval, admin, serverCAPath, promCert, promKey, collAddr))
	// Scraped once before the load, so that rates and quantiles see it.
	waitUntil(t, "Prometheus to scrape pinaka and the collector", func() bool {
		return prom.value(t, `sum(up{job=~"pinaka|pinaka-collector"})`) == 2
	})

	// Two rounds of load with a scrape between them: a labelled series is
	// born at its first event, so only a second round gives it a rate.
	for round := 1; round <= 2; round++ {
		driveLoad(t, p.Addr, round)
		want := requestsCounted(t, admin)
		waitUntil(t, fmt.Sprintf("Prometheus to scrape round %d", round), func() bool {
			return prom.value(t, `sum(pinaka_requests_total{job="pinaka"})`) >= want
		})
	}
	// An open tunnel while Prometheus looks; and the records shipped.
	open := openTunnel(t, p.Addr, testutil.ServeTCP(t, func(c net.Conn) { defer c.Close(); _, _ = io.Copy(c, c) }), token(t, "t-open", monitorRegion))
	defer open.Close()
	waitUntil(t, "Prometheus to see the open tunnel and a delivered batch", func() bool {
		return prom.value(t, `sum(pinaka_active_tunnels{job="pinaka"})`) >= 1 &&
			prom.value(t, `sum(pinaka_ship_batches_sent_total{job="pinaka"})`) >= 1
	})
	time.Sleep(3 * time.Second) // a few evaluation intervals (1s) of the rules with that data

	t.Run("dashboard", func(t *testing.T) {
		queries, nodeVar := dashboardQueries(t)
		pending := pendingMetrics(t)
		for _, m := range pending {
			if s, _ := prom.query(t, fmt.Sprintf(`count({__name__=~"%s(_bucket|_sum|_count)?"})`, m)); len(s) > 0 {
				t.Errorf("pinaka exports %s now: remove it from %s", m, pendingFile)
			}
		}
		// label_values(metric, label): the metric's series carry this node.
		m := regexp.MustCompile(`^label_values\((\w+),\s*(\w+)\)$`).FindStringSubmatch(nodeVar)
		if m == nil {
			t.Fatalf("node variable %q: want label_values(metric, label)", nodeVar)
		}
		if s, err := prom.query(t, m[1]); err != nil || !slices.ContainsFunc(s, func(s sample) bool { return s.Metric[m[2]] == admin }) {
			t.Errorf("node variable %s does not list %s (%v)", nodeVar, admin, err)
		}
		evaluated, waiting := 0, 0
		for _, q := range queries {
			expr := substitute(t, q.expr, admin)
			s, err := prom.query(t, expr)
			if err != nil {
				t.Errorf("panel %q: %s: %v", q.panel, expr, err)
				continue
			}
			isPending := slices.ContainsFunc(pending, func(m string) bool { return strings.Contains(expr, m) })
			if isPending {
				waiting++
				continue
			}
			evaluated++
			if !slices.ContainsFunc(s, func(s sample) bool { v := s.float(); return !math.IsNaN(v) && !math.IsInf(v, 0) }) {
				t.Errorf("panel %q: %s: no series with a finite value: %v", q.panel, expr, s)
			}
		}
		t.Logf("%d dashboard queries returned data; %d name pending metrics (%s) and only parsed", evaluated, waiting, strings.Join(pending, ", "))
	})

	t.Run("alerts", func(t *testing.T) {
		names := alertNames(t)
		var rules struct {
			Data struct {
				Groups []struct {
					Name  string `json:"name"`
					Rules []struct {
						Name      string `json:"name"`
						Query     string `json:"query"`
						Health    string `json:"health"`
						LastError string `json:"lastError"`
						Type      string `json:"type"`
					} `json:"rules"`
				} `json:"groups"`
			} `json:"data"`
		}
		prom.get(t, "/api/v1/rules", &rules)
		var loaded []string
		for _, g := range rules.Data.Groups {
			for _, r := range g.Rules {
				loaded = append(loaded, r.Name)
				if r.Health != "ok" || r.LastError != "" {
					t.Errorf("rule %s: health %q, error %q", r.Name, r.Health, r.LastError)
				}
				if _, err := prom.query(t, r.Query); err != nil {
					t.Errorf("alert %s: %s: %v", r.Name, r.Query, err)
				}
				sels := selectorRe.FindAllString(r.Query, -1)
				if len(sels) == 0 {
					t.Errorf("alert %s: no selector found in %s", r.Name, r.Query)
				}
				for _, sel := range sels {
					if s, err := prom.query(t, sel); err != nil || len(s) == 0 {
						t.Errorf("alert %s: %s selects no series on a live node (%v): the alert watches nothing", r.Name, sel, err)
					}
				}
			}
		}
		slices.Sort(loaded)
		sorted := slices.Sorted(slices.Values(names))
		if !slices.Equal(loaded, sorted) {
			t.Errorf("Prometheus loaded %v, the rules file has %v", loaded, sorted)
		}

		var alerts struct {
			Data struct {
				Alerts []struct {
					Labels map[string]string `json:"labels"`
					State  string            `json:"state"`
				} `json:"alerts"`
			} `json:"data"`
		}
		prom.get(t, "/api/v1/alerts", &alerts)
		var firing []string
		for _, a := range alerts.Data.Alerts {
			if a.State == "firing" {
				firing = append(firing, a.Labels["alertname"])
			}
		}
		slices.Sort(firing)
		if want := []string{"PinakaBackendClientCertificateExpiring", "PinakaCertificateExpiring"}; !slices.Equal(firing, want) {
			t.Errorf("firing: %v, want %v (certificates issued for a day)", firing, want)
		}
		t.Logf("%d alert rules loaded and evaluated; firing: %v", len(loaded), firing)
	})
}

// ---- load ----------------------------------------------------------------

func token(t *testing.T, id, region string) string {
	t.Helper()
	tok, err := auth.Mint([]byte(monitorSecret), auth.MintOptions{UserID: "u-" + id, TokenID: id, Regions: []string{region}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// proxyClient sends requests through the proxy over HTTP/1.1, with tok as
// Basic credentials ("" for none).
func proxyClient(proxyAddr, tok string) *http.Client {
	u := &url.URL{Scheme: "https", Host: proxyAddr}
	if tok != "" {
		u.User = url.UserPassword("x", tok)
	}
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		Proxy:             http.ProxyURL(u),
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // the proxy's and the origin's test certificates
		DisableKeepAlives: true,                                  // a tunnel per https request
		ForceAttemptHTTP2: false,
	}}
}

func status(t *testing.T, c *http.Client, target string) int {
	t.Helper()
	resp, err := c.Get(target)
	if err != nil {
		t.Fatalf("GET %s through the proxy: %v", target, err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// driveLoad sends forwarded requests and tunnels over both protocols, and
// requests refused with 407, 403 and 429, and one to a closed port (502).
func driveLoad(t *testing.T, proxyAddr string, round int) {
	t.Helper()
	body := strings.Repeat("x", 4096)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, body) })
	plain := httptest.NewServer(handler)
	t.Cleanup(plain.Close)
	secure := httptest.NewTLSServer(handler)
	t.Cleanup(secure.Close)

	// One token per purpose: each stays within the burst of 40 over both rounds.
	fwd, tunnels := proxyClient(proxyAddr, token(t, "t-forward", monitorRegion)), proxyClient(proxyAddr, token(t, "t-tunnel", monitorRegion))
	for i := 0; i < 10; i++ {
		if got := status(t, fwd, fmt.Sprintf("%s/fwd/%d/%d", plain.URL, round, i)); got != 200 {
			t.Fatalf("forwarded GET: %d", got)
		}
		if got := status(t, tunnels, fmt.Sprintf("%s/tunnel/%d/%d", secure.URL, round, i)); got != 200 {
			t.Fatalf("GET through a tunnel: %d", got)
		}
	}
	if got := status(t, proxyClient(proxyAddr, ""), plain.URL+"/no-token"); got != 407 {
		t.Fatalf("no credentials: %d, want 407", got)
	}
	if got := status(t, proxyClient(proxyAddr, "not-a-jwt"), plain.URL+"/bad-token"); got != 407 {
		t.Fatalf("invalid credentials: %d, want 407", got)
	}
	if got := status(t, proxyClient(proxyAddr, token(t, "t-eu", "eu-west")), plain.URL+"/region"); got != 403 {
		t.Fatalf("wrong region: %d, want 403", got)
	}
	if got := status(t, fwd, "http://10.1.2.3/private"); got != 403 {
		t.Fatalf("private destination: %d, want 403", got)
	}
	// Through a name of the test's DNS server, a new one each round (a
	// cached answer is another series): lookups for the time-breakdown
	// panels.
	byName := strings.Replace(plain.URL, "127.0.0.1", fmt.Sprintf("r%d.origin.test", round), 1)
	if got := status(t, fwd, byName+"/by-name"); got != 200 {
		t.Fatalf("forwarded GET by name: %d", got)
	}
	// A dead origin: 502, so that the 5xx series exist.
	dead := "http://127.0.0.1:" + testutil.FreePort(t) + "/dead"
	if got := status(t, fwd, dead); got != 502 {
		t.Fatalf("closed origin port: %d, want 502", got)
	}
	flood, limited := proxyClient(proxyAddr, token(t, "t-flood", monitorRegion)), 0
	for i := 0; i < 50; i++ { // burst 40
		if status(t, flood, plain.URL+"/flood") == 429 {
			limited++
		}
	}
	if limited == 0 {
		t.Fatal("50 requests against a burst of 40: no 429")
	}

	// HTTP/2: a forwarded request and a tunnel on one connection.
	c, err := tls.Dial("tcp", proxyAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := testutil.NewH2Raw(t, c)
	pa := "Bearer " + token(t, "t-h2", monitorRegion)
	host := strings.TrimPrefix(plain.URL, "http://")
	s := h.Open(t, true, ":method", "GET", ":scheme", "http", ":authority", host, ":path", "/h2", "proxy-authorization", pa)
	if r := s.Response(t); r.StatusCode != 200 {
		t.Fatalf("HTTP/2 forwarded GET: %d", r.StatusCode)
	}
	_, _ = io.ReadAll(s)
	echo := testutil.ServeTCP(t, func(c net.Conn) { defer c.Close(); _, _ = io.Copy(c, c) })
	tun := h.Open(t, false, ":method", "CONNECT", ":authority", echo, "proxy-authorization", pa)
	if r := tun.Response(t); r.StatusCode != 200 {
		t.Fatalf("HTTP/2 CONNECT: %d", r.StatusCode)
	}
	if _, err := tun.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = tun.CloseWrite()
	if b, _ := io.ReadAll(tun); string(b) != "ping" {
		t.Fatalf("HTTP/2 tunnel echoed %q", b)
	}
}

// openTunnel opens an HTTP/1.1 tunnel to target and leaves it open.
func openTunnel(t *testing.T, proxyAddr, target, tok string) net.Conn {
	t.Helper()
	c, err := tls.Dial("tcp", proxyAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n", target, target, tok)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT %s: %v %v", target, resp, err)
	}
	return c
}

// requestsCounted reads pinaka_requests_total from the node's /metrics.
func requestsCounted(t *testing.T, admin string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+admin+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, "pinaka_requests_total{") {
			v, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
			if err != nil {
				t.Fatalf("metrics line %q: %v", l, err)
			}
			sum += v
		}
	}
	if sum == 0 {
		t.Fatal("pinaka counted no requests")
	}
	return sum
}
