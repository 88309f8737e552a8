package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	// utime 250 and stime 50 ticks: 3 s. The command name holds a space
	// and a ')' of its own, which must not shift the fields.
	line := "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 100 1000000 200 18446744073709551615\n"
	if d, err := parseStatCPU([]byte(line)); err != nil || d != 3*time.Second {
		t.Fatalf("parseStatCPU = %v, %v; want 3s", d, err)
	}
	for name, bad := range map[string]string{
		"no command": "4242 S 1 2 3",
		"short":      "4242 (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250",
		"not number": "4242 (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 lots 50 0",
		"negative":   "4242 (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 -5 50 0",
	} {
		if _, err := parseStatCPU([]byte(bad)); err == nil {
			t.Errorf("%s: parseStatCPU succeeded on %q", name, bad)
		}
	}
	// This process's real file: it has been running, so time has passed.
	if _, ok := readCPU("/proc/self/stat"); !ok {
		t.Skip("no /proc/self/stat (not Linux)")
	}
	spin := time.Now().Add(50 * time.Millisecond)
	for time.Now().Before(spin) {
	}
	if d, ok := readCPU("/proc/self/stat"); !ok || d <= 0 {
		t.Fatalf("readCPU(self) = %v, %v after 50 ms of spinning", d, ok)
	}
	if _, ok := readCPU("/proc/1073741824/stat"); ok {
		t.Fatal("readCPU of a nonexistent process succeeded")
	}
}

// TestChargeCPU checks the units: CPU seconds per unit of work times 10^6,
// which is ms per GB for work in MB and µs per operation for operations.
func TestChargeCPU(t *testing.T) {
	if _, ok := readCPU("/proc/self/stat"); !ok {
		t.Skip("no /proc/self/stat (not Linux)")
	}
	b := &bench{cfg: benchConfig{pids: []int{os.Getpid()}}, proxy: &proxyClient{}}
	// A sample from before any CPU was used: everything since counts.
	from := cpuSample{proxyOK: true, selfOK: true}
	res := Result{Unit: "MB/s"}
	b.chargeCPU(&res, from, 1000) // 1000 MB = 1 GB: ms per GB = ms of CPU
	self, _ := readCPU("/proc/self/stat")
	if res.CPUUnit != "ms/GB" || res.ProxyCPU == nil || res.BenchCPU == nil {
		t.Fatalf("charged %+v", res)
	}
	// The charge is computed in floating point (ticks → seconds → ms per
	// GB), so it may exceed the whole-millisecond reading by a rounding
	// error: 3780.0000000000005 against 3780 failed CI once.
	if ms := float64(self.Milliseconds()); *res.BenchCPU <= 0 || *res.BenchCPU > ms+1e-6 {
		t.Errorf("bench CPU %v ms/GB for 1 GB, want (0, %v]: this process's whole CPU time", *res.BenchCPU, ms)
	}
	res = Result{Unit: "tunnels/s"}
	b.chargeCPU(&res, from, 0)
	if res.CPUUnit != "" || res.BenchCPU != nil {
		t.Errorf("no work done, yet charged %+v", res)
	}
	// The direct baseline charges only pinaka-bench's own CPU, -pid or not.
	direct := &bench{cfg: benchConfig{pids: []int{os.Getpid()}}}
	res = Result{Unit: "req/s"}
	direct.chargeCPU(&res, direct.sampleCPU(), 10)
	if res.CPUUnit != "µs/request" || res.ProxyCPU != nil || res.BenchCPU == nil {
		t.Errorf("direct: charged %+v", res)
	}
}

func TestWriteCPUTable(t *testing.T) {
	reports := []Report{
		{Label: "direct", Protocol: protoDirect, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 2000, BenchCPU: f(1000), CPUUnit: "ms/GB"},
			{Workload: wSetup, N: 16, Unit: "tunnels/s", Value: 3000, BenchCPU: f(300), CPUUnit: "µs/tunnel"},
		}},
		{Label: "Pinaka", Protocol: protoH2, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 700, ProxyCPU: f(1500), BenchCPU: f(1800), CPUUnit: "ms/GB"},
			{Workload: wSetupWarm, N: 16, Unit: "tunnels/s", Value: 7000, ProxyCPU: f(120.4), BenchCPU: f(90), CPUUnit: "µs/tunnel"},
			{Workload: wMemory, N: 1000, Unit: "KB/tunnel", Value: 20},
		}},
		{Label: "Squid", Protocol: protoH1, Results: []Result{
			{Workload: wDown1, N: 1, Unit: "MB/s", Value: 1000, BenchCPU: f(1500), CPUUnit: "ms/GB"},
		}},
	}
	var b strings.Builder
	if err := writeTable(&b, reports); err != nil {
		t.Fatal(err)
	}
	_, cpu, ok := strings.Cut(b.String(), "CPU per unit of work")
	if !ok {
		t.Fatalf("no CPU table:\n%s", b.String())
	}
	for _, want := range []string{
		"| workload | unit | direct | Pinaka | Squid |",
		// Squid's CPU was not readable: shown as unknown, not as zero.
		"| HTTP/1.1 CONNECT, 1 tunnel, download | ms/GB | 1000 | n/a | ? + 1500 |",
		"| HTTP/2 CONNECT, 1 tunnel, download | ms/GB | 1000 | 1500 + 1800 | n/a |",
		// Warm setup's direct column is the full setup it is compared with.
		"| HTTP/2 tunnel setup, CONNECT streams on one warm connection, 16 workers | µs/tunnel | 300 | 120 + 90.0 | n/a |",
	} {
		if !strings.Contains(cpu, want+"\n") {
			t.Errorf("CPU table lacks %q:\n%s", want, cpu)
		}
	}
	if strings.Contains(cpu, "memory") {
		t.Errorf("memory has no CPU row:\n%s", cpu)
	}
	// Reports without CPU figures (older JSON) get no CPU table.
	var old strings.Builder
	if err := writeTable(&old, []Report{{Label: "Pinaka", Protocol: protoH1, Results: []Result{{Workload: wDown1, N: 1, Unit: "MB/s", Value: 1}}}}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(old.String(), "CPU per unit") {
		t.Errorf("CPU table without CPU figures:\n%s", old.String())
	}
}

func TestWriteTextCPU(t *testing.T) {
	var b strings.Builder
	rep := Report{Label: "x", Protocol: protoH1, Duration: "3s", Results: []Result{
		{Workload: wDown1, N: 1, Unit: "MB/s", Value: 900, ProxyCPU: f(700), BenchCPU: f(1200), CPUUnit: "ms/GB"},
		{Workload: wSetup, N: 16, Unit: "tunnels/s", Value: 2000, BenchCPU: f(500), CPUUnit: "µs/tunnel"},
		{Workload: wMemory, N: 1000, Unit: "KB/tunnel", Value: 30},
	}}
	if err := writeText(&b, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"cpu proxy 700 + bench 1200 ms/GB\n", "cpu bench 500 µs/tunnel\n", "30.0 KB\n"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, b.String())
		}
	}
}
