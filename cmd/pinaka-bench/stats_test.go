package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"single p50", []time.Duration{7}, 50, 7},
		{"single p99", []time.Duration{7}, 99, 7},
		{"p50 of 1..100", hundred, 50, 50 * time.Millisecond},
		{"p99 of 1..100", hundred, 99, 99 * time.Millisecond},
		{"p100 of 1..100", hundred, 100, 100 * time.Millisecond},
		{"p0 is the minimum", hundred, 0, time.Millisecond},
		// Nearest rank: ceil(0.5*3) = 2nd sample.
		{"p50 of three", []time.Duration{1, 2, 3}, 50, 2},
		// ceil(0.99*3) = 3rd sample, the maximum.
		{"p99 of three", []time.Duration{1, 2, 3}, 99, 3},
	}
	for _, tt := range tests {
		if got := percentile(tt.sorted, tt.p); got != tt.want {
			t.Errorf("%s: percentile(p%v) = %v, want %v", tt.name, tt.p, got, tt.want)
		}
	}
}

func TestLatenciesSortsSamplesFromAllWorkers(t *testing.T) {
	var l latencies
	l.add([]time.Duration{9 * time.Millisecond, 1 * time.Millisecond})
	l.add([]time.Duration{5 * time.Millisecond, 3 * time.Millisecond})
	p50, p99 := l.percentiles()
	if p50 != 3 || p99 != 9 {
		t.Fatalf("percentiles = %v ms, %v ms; want 3 ms, 9 ms", p50, p99)
	}
}

func TestRatio(t *testing.T) {
	if r := ratio(50, 200); r == nil || *r != 0.25 {
		t.Fatalf("ratio(50, 200) = %v, want 0.25", r)
	}
	if r := ratio(50, 0); r != nil {
		t.Fatalf("ratio with a zero baseline = %v, want nil", *r)
	}
	if r := ratio(0, 10); r != nil {
		t.Fatalf("ratio of a failed measurement = %v, want nil", *r)
	}
}

func f(v float64) *float64 { return &v }

func TestWriteTable(t *testing.T) {
	reports := []Report{
		{Label: "direct", Protocol: protoDirect, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 2000},
			{Workload: wSetup, N: 16, Unit: "tunnels/s", Value: 3000, P50Ms: 1.5, P99Ms: 4},
			{Workload: wForward, N: 16, Unit: "req/s", Value: 60000},
		}},
		{Label: "Pinaka", Protocol: protoH1, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 1300},
			{Workload: wSetup, N: 16, Unit: "tunnels/s", Value: 2500},
			{Workload: wMemory, N: 1000, Unit: "KB/tunnel", Value: 20},
		}},
		{Label: "Pinaka", Protocol: protoH2, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 700},
			{Workload: wSetupWarm, N: 16, Unit: "tunnels/s", Value: 7000},
			{Workload: wForward, N: 16, Unit: "req/s", Error: "GET: proxy answered 400 | bad"},
		}},
		{Label: "Squid", Protocol: protoH1, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 1000, Ratio: f(0.9)},
			{Workload: wSetup, N: 16, Unit: "tunnels/s", Value: 2600},
			{Workload: wMemory, N: 1000, Unit: "KB/tunnel", Value: 30},
		}},
	}
	tableFor := func(reports []Report) string {
		t.Helper()
		var b strings.Builder
		if err := writeTable(&b, reports); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	table := tableFor(reports)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if lines[0] != "| workload | target | direct | Pinaka | Squid |" {
		t.Fatalf("header = %q", lines[0])
	}
	row := func(prefix string) string {
		t.Helper()
		for _, l := range lines {
			if strings.HasPrefix(l, "| "+prefix+" |") {
				return l
			}
		}
		t.Fatalf("no row %q in\n%s", prefix, table)
		return ""
	}
	// A ratio stored in the report (to its adjacent baseline) wins over one
	// computed from the direct column: Squid's 0.9, Pinaka's 1300/2000.
	if got, want := row("HTTP/1.1 CONNECT, 1 tunnel, download"),
		"| HTTP/1.1 CONNECT, 1 tunnel, download | ≥0.60× | 2000 MB/s | 1300 MB/s (0.65×) ✓ | 1000 MB/s (0.90×) ✓ |"; got != want {
		t.Errorf("download row\n got %s\nwant %s", got, want)
	}
	if got, want := row("HTTP/2 CONNECT, 1 tunnel, download"),
		"| HTTP/2 CONNECT, 1 tunnel, download | ≥0.40× | 2000 MB/s | 700 MB/s (0.35×) ✗ | n/a |"; got != want {
		t.Errorf("HTTP/2 download row\n got %s\nwant %s", got, want)
	}
	// "≥ Squid" compares with the Squid column, and Squid is not marked.
	if got, want := row("HTTP/1.1 tunnel setup, new TLS connection + CONNECT, 16 workers"),
		"| HTTP/1.1 tunnel setup, new TLS connection + CONNECT, 16 workers | ≥ Squid | 3000/s<br>p50 1.50 ms, p99 4.00 ms | 2500/s (0.83×) ✗ | 2600/s (0.87×) |"; got != want {
		t.Errorf("setup row\n got %s\nwant %s", got, want)
	}
	// With adjacent baselines on both sides, "≥ Squid" compares ratios:
	// Pinaka's lower rate came with a proportionally lower baseline.
	reports[1].Results[1].Ratio = f(0.95)
	reports[3].Results[1].Ratio = f(0.90)
	if !strings.Contains(tableFor(reports), "| 2500/s (0.95×) ✓ |") {
		t.Errorf("setup compared by value despite ratios:\n%s", tableFor(reports))
	}
	// Warm HTTP/2 setup is compared with the direct setup rate and checked
	// against an absolute target.
	if got := row("HTTP/2 tunnel setup, CONNECT streams on one warm connection, 16 workers"); !strings.Contains(got, "| ≥8000/s |") || !strings.Contains(got, "7000/s (2.33×) ✗") {
		t.Errorf("warm setup row: %s", got)
	}
	if got, want := row("HTTP/1.1 proxy memory per idle tunnel (1000 tunnels)"),
		"| HTTP/1.1 proxy memory per idle tunnel (1000 tunnels) | ≤24.0 KB | — | 20.0 KB ✓ | 30.0 KB ✗ |"; got != want {
		t.Errorf("memory row\n got %s\nwant %s", got, want)
	}
	// A failed workload shows its error, with table pipes escaped.
	if got := row("HTTP/2 plain forwarding, 16 streams on one connection, 1 KB"); !strings.Contains(got, "error: GET: proxy answered 400 / bad") {
		t.Errorf("failed forwarding row: %s", got)
	}
	// Rows nobody measured are left out.
	if strings.Contains(table, "16 tunnels") {
		t.Errorf("unmeasured rows present:\n%s", table)
	}
}

func TestReadRSS(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte("Name:\tx\nVmPeak:\t 9000 kB\nVmRSS:\t    1234 kB\nThreads: 3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if kb, err := readRSS(good); err != nil || kb != 1234 {
		t.Fatalf("readRSS = %d, %v; want 1234", kb, err)
	}
	for name, content := range map[string]string{
		"missing": "Name:\tx\n",
		"unit":    "VmRSS:\t1234 MB\n",
		"number":  "VmRSS:\tlots kB\n",
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := readRSS(p); err == nil {
			t.Errorf("readRSS(%s) succeeded, want an error", name)
		}
	}
	// The real file for this process, summed twice.
	one, err := rssKB([]int{os.Getpid()})
	if err != nil || one <= 0 {
		t.Fatalf("rssKB(self) = %d, %v", one, err)
	}
	if _, err := rssKB([]int{os.Getpid(), 1 << 30}); err == nil {
		t.Fatal("rssKB with a nonexistent pid succeeded")
	}
}

func TestAuthHeader(t *testing.T) {
	if got := authHeader("tok", ""); got != "Bearer tok" {
		t.Errorf("bearer: %q", got)
	}
	got := authHeader("", "tok")
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(got, "Basic "))
	if !strings.HasPrefix(got, "Basic ") || err != nil || !strings.HasSuffix(string(raw), ":tok") {
		t.Errorf("basic: %q (%s)", got, raw)
	}
	if got := authHeader("", ""); got != "" {
		t.Errorf("none: %q", got)
	}
}

func TestParseWorkloads(t *testing.T) {
	all, err := parseWorkloads("all")
	if err != nil || len(all) != len(allWorkloads) || all[0] != wMemory {
		t.Fatalf("all = %v, %v; want memory first", all, err)
	}
	got, err := parseWorkloads("down1, forward")
	if err != nil || len(got) != 2 || got[1] != wForward {
		t.Fatalf("list = %v, %v", got, err)
	}
	if _, err := parseWorkloads("down1,sideways"); err == nil {
		t.Fatal("unknown workload accepted")
	}
}
