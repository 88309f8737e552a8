package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// testProxy is a minimal CONNECT and forwarding proxy: HTTP/1.1 CONNECT by
// hijacking, HTTP/2 CONNECT as a full-duplex stream, everything else through
// httputil.ReverseProxy. It insists on a Proxy-Authorization value so that
// the tests also check that the tool sends credentials everywhere.
type testProxy struct {
	auth     string
	connects atomic.Int64
	forwards atomic.Int64
	rp       *httputil.ReverseProxy
}

func newTestProxy(auth string) *testProxy {
	return &testProxy{auth: auth, rp: &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = pr.In.Host
		},
	}}
}

func (p *testProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Proxy-Authorization") != p.auth {
		http.Error(w, "credentials", http.StatusProxyAuthRequired)
		return
	}
	if r.Method != http.MethodConnect {
		p.forwards.Add(1)
		p.rp.ServeHTTP(w, r)
		return
	}
	p.connects.Add(1)
	up, err := net.Dial("tcp", r.Host)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer up.Close()
	if r.ProtoMajor == 1 {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\n\r\n"); err != nil {
			return
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = io.Copy(up, brw)
			_ = up.(*net.TCPConn).CloseWrite()
		}()
		_, _ = io.Copy(c, up)
		_ = c.Close()
		<-done
		return
	}
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	go func() {
		_, _ = io.Copy(up, r.Body)
		_ = up.(*net.TCPConn).CloseWrite()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := up.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			if rc.Flush() != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// startTestProxy serves p over TLS with HTTP/2 and HTTP/1.1 on loopback.
func startTestProxy(t *testing.T, p *testProxy) string {
	t.Helper()
	ts := httptest.NewUnstartedServer(p)
	ts.EnableHTTP2 = true
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return ts.URL
}

func smokeConfig() benchConfig {
	return benchConfig{
		duration:    100 * time.Millisecond,
		timeout:     5 * time.Second,
		tunnels:     2,
		clients:     2,
		idleTunnels: 5,
		perConn:     100,
		settle:      time.Millisecond,
		pids:        []int{os.Getpid()},
	}
}

// TestWorkloadsThroughProxy runs every workload briefly through the test
// proxy over both protocols and directly, checking that each one moves data
// and reports a figure.
func TestWorkloadsThroughProxy(t *testing.T) {
	o, err := startOrigin()
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	tp := newTestProxy("Bearer secret-token")
	proxyURL := startTestProxy(t, tp)
	pc, err := newProxyClient(proxyURL, true, authHeader("secret-token", ""))
	if err != nil {
		t.Fatal(err)
	}

	benches := map[string]*bench{
		"direct":   {cfg: smokeConfig(), origin: o},
		"HTTP/1.1": {cfg: smokeConfig(), origin: o, proxy: pc},
		"HTTP/2":   {cfg: smokeConfig(), origin: o, proxy: pc, h2: true},
	}
	for name, b := range benches {
		t.Run(name, func(t *testing.T) {
			ran := 0
			for _, w := range allWorkloads {
				if !b.applies(w) {
					continue
				}
				ran++
				r := b.run(context.Background(), w)
				if r.Error != "" {
					t.Errorf("%s: %s", w, r.Error)
					continue
				}
				if r.Workload != w || r.Unit == "" {
					t.Errorf("%s: result not labelled: %+v", w, r)
				}
				// RSS may even shrink; everything else must have moved.
				if w != wMemory && r.Value <= 0 {
					t.Errorf("%s: value %v, want > 0", w, r.Value)
				}
				if (w == wSetup || w == wSetupWarm || w == wForward) && (r.Ops == 0 || r.P50Ms <= 0 || r.P99Ms < r.P50Ms) {
					t.Errorf("%s: ops %d, p50 %v ms, p99 %v ms", w, r.Ops, r.P50Ms, r.P99Ms)
				}
				// Every timed workload is charged CPU; the proxied benches
				// name this process as the proxy (-pid), the direct one
				// has no proxy to charge.
				if w != wMemory {
					if r.CPUUnit == "" || r.BenchCPU == nil || (r.ProxyCPU != nil) != (b.proxy != nil) {
						t.Errorf("%s: CPU not charged as expected: unit %q, bench %v, proxy %v", w, r.CPUUnit, r.BenchCPU, r.ProxyCPU)
					} else if (w == wDown1 || w == wUp1) && *r.BenchCPU <= 0 {
						t.Errorf("%s: moved data for %v at no CPU cost", w, b.cfg.duration)
					}
				}
			}
			want := 6 // down1 up1 downN upN setup forward
			if b.proxy != nil {
				want++ // memory
			}
			if b.h2 {
				want++ // setup-warm
			}
			if ran != want {
				t.Errorf("ran %d workloads, want %d", ran, want)
			}
		})
	}
	if tp.connects.Load() == 0 || tp.forwards.Load() == 0 {
		t.Fatalf("the proxy saw %d CONNECTs and %d forwarded requests; the proxied workloads bypassed it", tp.connects.Load(), tp.forwards.Load())
	}
}

// TestProxyRefusalIsReported checks that a proxy's refusal surfaces as the
// workload's error rather than as a zero figure.
func TestProxyRefusalIsReported(t *testing.T) {
	o, err := startOrigin()
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	proxyURL := startTestProxy(t, newTestProxy("Bearer right"))
	pc, err := newProxyClient(proxyURL, true, authHeader("wrong", ""))
	if err != nil {
		t.Fatal(err)
	}
	for _, h2 := range []bool{false, true} {
		b := &bench{cfg: smokeConfig(), origin: o, proxy: pc, h2: h2}
		for _, w := range []string{wDown1, wSetup, wForward} {
			r := b.run(context.Background(), w)
			if !strings.Contains(r.Error, "407") {
				t.Errorf("h2=%v %s: error %q, want the 407 status", h2, w, r.Error)
			}
		}
	}
}

// TestBenchMainJSON runs the command end to end with a baseline and checks
// that ratios are filled in.
func TestBenchMainJSON(t *testing.T) {
	proxyURL := startTestProxy(t, newTestProxy(""))
	var out, errOut strings.Builder
	err := benchMain(context.Background(), []string{
		"-proxy", proxyURL, "-insecure", "-label", "test", "-json",
		"-workloads", "down1,forward", "-duration", "100ms", "-clients", "2",
	}, &out, &errOut)
	if err != nil {
		t.Fatalf("benchMain: %v\n%s", err, errOut.String())
	}
	for _, want := range []string{`"label": "test"`, `"protocol": "HTTP/1.1"`, `"workload": "down1"`, `"workload": "forward"`, `"ratio":`, `"baseline":`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("JSON report lacks %s:\n%s", want, out.String())
		}
	}
}
