package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/sync/errgroup"
)

// Workload names, as used by -workloads and in JSON reports.
const (
	wDown1     = "down1"      // one tunnel, origin → client
	wUp1       = "up1"        // one tunnel, client → origin
	wDownN     = "downN"      // -tunnels tunnels at once (HTTP/2: one connection)
	wUpN       = "upN"        //
	wSetup     = "setup"      // new connection to the proxy + CONNECT per tunnel
	wSetupWarm = "setup-warm" // HTTP/2 CONNECT streams on one warm connection
	wForward   = "forward"    // plain HTTP GET /1k through the proxy
	wMemory    = "memory"     // proxy RSS per idle tunnel
)

// allWorkloads is the default order. Memory goes first so that it sees the
// proxy before the other workloads have grown its heap.
var allWorkloads = []string{wMemory, wDown1, wUp1, wDownN, wUpN, wSetup, wSetupWarm, wForward}

// Result is one measured figure.
type Result struct {
	Workload string  `json:"workload"`
	N        int     `json:"n"` // tunnels or clients
	Unit     string  `json:"unit"`
	Value    float64 `json:"value"`
	P50Ms    float64 `json:"p50_ms,omitempty"`
	P99Ms    float64 `json:"p99_ms,omitempty"`
	Ops      int64   `json:"ops,omitempty"`    // completed operations
	Errors   int64   `json:"errors,omitempty"` // failed operations
	Error    string  `json:"error,omitempty"`  // first error, or why the workload could not run
	// ProxyCPU and BenchCPU are the processor time the proxy processes
	// (-pid) and pinaka-bench itself (clients and origins) spent per unit of
	// work while the figure was measured, in CPUUnit (see chargeCPU).
	ProxyCPU *float64 `json:"proxy_cpu,omitempty"`
	BenchCPU *float64 `json:"bench_cpu,omitempty"`
	CPUUnit  string   `json:"cpu_unit,omitempty"`
	// Baseline and Ratio are set when the same invocation also measured the
	// direct baseline (-baseline).
	Baseline *float64 `json:"baseline,omitempty"`
	Ratio    *float64 `json:"ratio,omitempty"`
}

// benchConfig is what the workloads need from the command line.
type benchConfig struct {
	duration    time.Duration
	timeout     time.Duration // per dial/CONNECT/request
	tunnels     int           // for downN/upN
	clients     int           // for setup and forward
	idleTunnels int           // for memory
	perConn     int           // HTTP/2 streams per connection in the memory workload
	settle      time.Duration // memory: wait before reading RSS
	pids        []int         // memory: processes whose RSS is summed
}

// bench runs workloads either directly against the origins (proxy nil) or
// through one proxy over HTTP/1.1 or HTTP/2.
type bench struct {
	cfg    benchConfig
	origin *origin
	proxy  *proxyClient // nil: direct baseline
	h2     bool
	h3     bool // HTTP/3 (h3.go)
}

// applies reports whether workload w means something for this bench.
func (b *bench) applies(w string) bool {
	if b.h3 {
		return slices.Contains(h3Workloads, w) || w == wUDP
	}
	switch w {
	case wSetupWarm:
		return b.h2
	case wMemory:
		return b.proxy != nil
	case wUDP: // CONNECT-UDP: directly, or over HTTP/3 (-proxy-h3)
		return b.proxy == nil
	}
	return true
}

func (b *bench) run(ctx context.Context, w string) Result {
	var (
		r   Result
		err error
	)
	switch w {
	case wDown1:
		r, err = b.throughput(ctx, cmdDown, 1)
	case wUp1:
		r, err = b.throughput(ctx, cmdUp, 1)
	case wDownN:
		r, err = b.throughput(ctx, cmdDown, b.cfg.tunnels)
	case wUpN:
		r, err = b.throughput(ctx, cmdUp, b.cfg.tunnels)
	case wSetup:
		r, err = b.setup(ctx, false)
	case wSetupWarm:
		r, err = b.setup(ctx, true)
	case wForward:
		r, err = b.forward(ctx)
	case wMemory:
		r, err = b.memory(ctx)
	case wUDP:
		r, err = b.udpDatagrams(ctx)
	default:
		err = fmt.Errorf("unknown workload %q", w)
	}
	r.Workload = w
	if err != nil {
		r.Error = err.Error()
	}
	return r
}

// stream opens a byte stream to addr: a TCP connection for the baseline, a
// CONNECT tunnel otherwise (on cc for HTTP/2).
func (b *bench) stream(ctx context.Context, cc *http2.ClientConn, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
	defer cancel()
	switch {
	case b.proxy == nil:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("dialing origin %s: %w", addr, err)
		}
		return c, nil
	case b.h2:
		return b.proxy.tunnelH2(ctx, cc, addr)
	default:
		return b.proxy.tunnelH1(ctx, addr)
	}
}

// throughput measures bytes per second through n tunnels at once, with TLS
// end to end inside each tunnel so that the baseline (direct TLS to the same
// origin) does the same cryptographic work.
func (b *bench) throughput(ctx context.Context, dir byte, n int) (Result, error) {
	if b.h3 {
		return b.h3Throughput(ctx, dir, n)
	}
	res := Result{N: n, Unit: "MB/s"}
	var cc *http2.ClientConn
	if b.h2 {
		var err error
		if cc, err = b.proxy.h2Conn(ctx); err != nil {
			return res, err
		}
		defer cc.Close()
	}
	raws := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range raws {
			_ = c.Close()
		}
	}()
	conns := make([]*tls.Conn, 0, n)
	for range n {
		raw, err := b.stream(ctx, cc, b.origin.tlsAddr)
		if err != nil {
			return res, err
		}
		raws = append(raws, raw)
		tc := tls.Client(raw, b.origin.clientTLS)
		hctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
		err = tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			return res, fmt.Errorf("TLS handshake with origin through the tunnel: %w", err)
		}
		conns = append(conns, tc)
	}
	var (
		rate float64
		err  error
	)
	if dir == cmdDown {
		rate, err = b.download(ctx, &res, conns, raws)
	} else {
		rate, err = b.upload(ctx, &res, conns, raws)
	}
	res.Value = rate / 1e6
	return res, err
}

// download reads from every connection for the duration and counts what
// arrived at the client.
func (b *bench) download(ctx context.Context, res *Result, conns []*tls.Conn, raws []net.Conn) (float64, error) {
	for _, c := range conns {
		if _, err := c.Write([]byte{cmdDown}); err != nil {
			return 0, fmt.Errorf("writing download command: %w", err)
		}
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			buf := make([]byte, ioSize)
			for {
				k, err := c.Read(buf)
				total.Add(int64(k))
				if err != nil {
					return
				}
			}
		})
	}
	start, cpu := time.Now(), b.sampleCPU()
	select {
	case <-time.After(b.cfg.duration):
	case <-ctx.Done():
	}
	got, elapsed := total.Load(), time.Since(start)
	b.chargeCPU(res, cpu, float64(got)/1e6)
	// Closing the raw streams (not the TLS conns) ends the readers without a
	// close_notify that could block on a stalled tunnel.
	for _, c := range raws {
		_ = c.Close()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if got == 0 {
		return 0, errors.New("download: no bytes arrived")
	}
	return float64(got) / elapsed.Seconds(), nil
}

// upload writes to every connection until the origin reports how many
// bytes it received during the duration.
func (b *bench) upload(ctx context.Context, res *Result, conns []*tls.Conn, raws []net.Conn) (float64, error) {
	var cmd [9]byte
	cmd[0] = cmdUp
	binary.BigEndian.PutUint64(cmd[1:], uint64(b.cfg.duration))
	rates := make([]float64, len(conns))
	received := make([]uint64, len(conns))
	cpu := b.sampleCPU()
	g, gctx := errgroup.WithContext(ctx)
	for i, c := range conns {
		if _, err := c.Write(cmd[:]); err != nil {
			return 0, fmt.Errorf("writing upload command: %w", err)
		}
		g.Go(func() error {
			done := make(chan struct{})
			go func() {
				defer close(done)
				buf := make([]byte, ioSize)
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
			stop := context.AfterFunc(gctx, func() { _ = raws[i].Close() })
			defer stop()
			var reply [16]byte
			_, err := io.ReadFull(c, reply[:])
			_ = raws[i].Close()
			<-done
			if err != nil {
				return fmt.Errorf("reading upload result: %w", err)
			}
			n := binary.BigEndian.Uint64(reply[:8])
			d := time.Duration(binary.BigEndian.Uint64(reply[8:]))
			if d <= 0 {
				return errors.New("reading upload result: zero duration")
			}
			rates[i] = float64(n) / d.Seconds()
			received[i] = n
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	var sum float64
	var moved uint64
	for i, r := range rates {
		sum += r
		moved += received[i]
	}
	// The CPU window runs from the commands to the last reply, a little
	// longer than the origins' counting window: the cost per GB errs high
	// by the replies' round trip.
	b.chargeCPU(res, cpu, float64(moved)/1e6)
	return sum, nil
}

// setup measures how many tunnels per second 'clients' workers can open,
// each tunnel carrying one ping exchange, and the latency of each.
// Cold: a new TCP+TLS connection per tunnel (the baseline: a new TCP+TLS
// connection straight to the origin). Warm: CONNECT streams on one HTTP/2
// connection opened beforehand.
func (b *bench) setup(ctx context.Context, warm bool) (Result, error) {
	res := Result{N: b.cfg.clients, Unit: "tunnels/s"}
	var open func(ctx context.Context) (net.Conn, error)
	switch {
	case b.proxy == nil:
		d := tls.Dialer{Config: b.origin.clientTLS}
		open = func(ctx context.Context) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", b.origin.tlsAddr)
		}
	case b.h2 && warm:
		wc := &warmConn{proxy: b.proxy}
		defer wc.Close()
		open = func(ctx context.Context) (net.Conn, error) {
			cc, err := wc.get(ctx)
			if err != nil {
				return nil, err
			}
			c, err := b.proxy.tunnelH2(ctx, cc, b.origin.plainAddr)
			if err != nil && !cc.CanTakeNewRequest() {
				// The proxy sent GOAWAY while this stream was starting;
				// like a browser, retry once on a new connection.
				if cc, err = wc.get(ctx); err != nil {
					return nil, err
				}
				c, err = b.proxy.tunnelH2(ctx, cc, b.origin.plainAddr)
			}
			return c, err
		}
	case b.h2:
		open = func(ctx context.Context) (net.Conn, error) {
			cc, err := b.proxy.h2Conn(ctx)
			if err != nil {
				return nil, err
			}
			s, err := b.proxy.tunnelH2(ctx, cc, b.origin.plainAddr)
			if err != nil {
				_ = cc.Close()
				return nil, err
			}
			return &closeWithConn{Conn: s, cc: cc}, nil
		}
	default:
		open = func(ctx context.Context) (net.Conn, error) {
			return b.proxy.tunnelH1(ctx, b.origin.plainAddr)
		}
	}
	op := func(ctx context.Context) (time.Duration, error) {
		t0 := time.Now()
		c, err := open(ctx)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		if err := ping(ctx, c, cmdPingClose); err != nil {
			return 0, err
		}
		lat := time.Since(t0)
		return lat, closeGracefully(ctx, c)
	}
	return b.closedLoop(ctx, res, op)
}

// forward measures plain HTTP requests per second through the proxy with
// 'clients' keep-alive clients (HTTP/2: streams on one connection).
func (b *bench) forward(ctx context.Context) (Result, error) {
	res := Result{N: b.cfg.clients, Unit: "req/s"}
	target := "http://" + b.origin.httpAddr + "/1k"
	var rt http.RoundTripper
	switch {
	case b.proxy != nil && b.h2:
		wc := &warmConn{proxy: b.proxy}
		defer wc.Close()
		rt = roundTripFunc(func(req *http.Request) (*http.Response, error) {
			cc, err := wc.get(req.Context())
			if err != nil {
				return nil, err
			}
			return cc.RoundTrip(req)
		})
	default:
		t := &http.Transport{
			MaxIdleConnsPerHost: b.cfg.clients,
			MaxConnsPerHost:     b.cfg.clients,
			DisableCompression:  true,
		}
		if b.proxy != nil {
			pu := *b.proxy.url
			pu.User = nil // credentials go in Proxy-Authorization below
			t.Proxy = func(*http.Request) (*url.URL, error) { return &pu, nil }
			if b.proxy.tls != nil {
				t.TLSClientConfig = b.proxy.tls.Clone()
				t.TLSClientConfig.NextProtos = []string{"http/1.1"}
			}
		}
		defer t.CloseIdleConnections()
		rt = t
	}
	op := func(ctx context.Context) (time.Duration, error) {
		t0 := time.Now()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return 0, fmt.Errorf("building request: %w", err)
		}
		if b.proxy != nil && b.proxy.auth != "" {
			req.Header.Set("Proxy-Authorization", b.proxy.auth)
		}
		resp, err := rt.RoundTrip(req)
		if err != nil {
			return 0, fmt.Errorf("GET %s: %w", target, err)
		}
		if resp.StatusCode != http.StatusOK {
			msg, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
			_ = resp.Body.Close()
			return 0, fmt.Errorf("GET %s: proxy answered %s: %q", target, resp.Status, msg)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if err != nil {
			return 0, fmt.Errorf("reading %s: %w", target, err)
		}
		if n != 1024 {
			return 0, fmt.Errorf("GET %s: %d bytes, want 1024", target, n)
		}
		return time.Since(t0), nil
	}
	return b.closedLoop(ctx, res, op)
}

// closedLoop runs op from 'clients' workers back to back for the duration
// and fills in the rate and latency percentiles of res. op returns the
// latency it measured.
func (b *bench) closedLoop(ctx context.Context, res Result, op func(context.Context) (time.Duration, error)) (Result, error) {
	var (
		lat      latencies
		ops      atomic.Int64
		errs     atomic.Int64
		firstErr error
		errOnce  sync.Once
		wg       sync.WaitGroup
	)
	start, cpu := time.Now(), b.sampleCPU()
	end := start.Add(b.cfg.duration)
	for range b.cfg.clients {
		wg.Go(func() {
			local := make([]time.Duration, 0, 4096)
			for ctx.Err() == nil && time.Now().Before(end) {
				octx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
				d, err := op(octx)
				cancel()
				if err != nil {
					errs.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				ops.Add(1)
				local = append(local, d)
			}
			lat.add(local)
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	res.Ops, res.Errors = ops.Load(), errs.Load()
	res.Value = float64(res.Ops) / elapsed.Seconds()
	b.chargeCPU(&res, cpu, float64(res.Ops))
	res.P50Ms, res.P99Ms = lat.percentiles()
	if firstErr != nil {
		return res, fmt.Errorf("%d of %d operations failed, first: %w", res.Errors, res.Errors+res.Ops, firstErr)
	}
	return res, ctx.Err()
}

// memory opens idleTunnels tunnels, makes one small exchange on each, lets
// the proxy settle and reports the growth of its resident set per tunnel.
func (b *bench) memory(ctx context.Context) (Result, error) {
	n := b.cfg.idleTunnels
	res := Result{N: n, Unit: "KB/tunnel"}
	if len(b.cfg.pids) == 0 {
		return res, errors.New("no -pid given")
	}
	before, err := rssKB(b.cfg.pids)
	if err != nil {
		return res, err
	}
	var ccs []*http2.ClientConn
	defer func() {
		for _, cc := range ccs {
			_ = cc.Close()
		}
	}()
	if b.h2 {
		for range (n + b.cfg.perConn - 1) / b.cfg.perConn {
			cc, err := b.proxy.h2Conn(ctx)
			if err != nil {
				return res, err
			}
			ccs = append(ccs, cc)
		}
	}
	conns := make([]net.Conn, n)
	if !b.h2 { // HTTP/2 tunnels end with their connections, without a burst of RST_STREAMs
		defer func() {
			for _, c := range conns {
				if c != nil {
					_ = c.Close()
				}
			}
		}()
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(b.cfg.clients)
	for i := range n {
		g.Go(func() error {
			var cc *http2.ClientConn
			if b.h2 {
				cc = ccs[i/b.cfg.perConn]
			}
			c, err := b.stream(gctx, cc, b.origin.plainAddr)
			if err != nil {
				return fmt.Errorf("opening idle tunnel %d: %w", i, err)
			}
			conns[i] = c
			pctx, cancel := context.WithTimeout(gctx, b.cfg.timeout)
			defer cancel()
			return ping(pctx, c, cmdPing)
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	select {
	case <-time.After(b.cfg.settle):
	case <-ctx.Done():
		return res, ctx.Err()
	}
	after, err := rssKB(b.cfg.pids)
	if err != nil {
		return res, err
	}
	res.Value = float64(after-before) / float64(n)
	return res, nil
}

// rssKB sums VmRSS of the given processes.
func rssKB(pids []int) (int64, error) {
	var total int64
	for _, pid := range pids {
		kb, err := readRSS("/proc/" + strconv.Itoa(pid) + "/status")
		if err != nil {
			return 0, err
		}
		total += kb
	}
	return total, nil
}

// readRSS parses the VmRSS line of a /proc/PID/status file.
func readRSS(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("reading RSS: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("reading RSS from %s: malformed line %q", path, sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("reading RSS from %s: %w", path, err)
		}
		return kb, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("reading RSS from %s: %w", path, err)
	}
	return 0, fmt.Errorf("reading RSS from %s: no VmRSS line", path)
}

// closeGracefully ends a tunnel whose origin has closed: half-close our
// side (END_STREAM on HTTP/2) and read to EOF, so that no side needs to
// reset anything. The caller still closes c.
func closeGracefully(ctx context.Context, c net.Conn) error {
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	// On TCP and TLS the origin's close is enough; on an HTTP/2 stream
	// END_STREAM is what lets the stream end without a reset.
	if s, ok := c.(streamEnder); ok {
		_ = s.endStream()
	}
	if _, err := io.Copy(io.Discard, c); err != nil {
		return fmt.Errorf("waiting for the tunnel to end: %w", err)
	}
	return nil
}

// warmConn is one HTTP/2 connection to the proxy, shared by workers and
// replaced when the proxy stops taking new streams on it (GOAWAY), as a
// browser would.
type warmConn struct {
	proxy *proxyClient
	mu    sync.Mutex
	cur   *http2.ClientConn
	all   []*http2.ClientConn
}

func (w *warmConn) get(ctx context.Context) (*http2.ClientConn, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cur != nil && w.cur.CanTakeNewRequest() {
		return w.cur, nil
	}
	cc, err := w.proxy.h2Conn(ctx)
	if err != nil {
		return nil, err
	}
	w.cur = cc
	w.all = append(w.all, cc)
	return cc, nil
}

// Close closes every connection get opened.
func (w *warmConn) Close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cc := range w.all {
		_ = cc.Close()
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
