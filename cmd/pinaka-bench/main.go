// Command pinaka-bench is a load generator for HTTP proxies (Pinaka, or any
// other CONNECT/forwarding proxy). It runs its own origins on loopback and
// measures tunnel throughput, tunnel setup rate and latency, plain-HTTP
// forwarding and the proxy's memory per idle tunnel; the same workloads run
// without a proxy so that each figure has a baseline from the same run.
//
//	pinaka-bench [flags]                          run workloads
//	pinaka-bench table [-o FILE] REPORT.json...   merge -json reports into a markdown table
//	pinaka-bench ports N                          print N free loopback TCP ports (for scripts)
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch {
	case len(os.Args) > 1 && os.Args[1] == "table":
		err = tableMain(os.Args[2:], os.Stdout)
	case len(os.Args) > 1 && os.Args[1] == "ports":
		err = portsMain(os.Args[2:], os.Stdout)
	default:
		err = benchMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "pinaka-bench:", err)
		if errors.Is(err, errWorkloadFailed) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// errWorkloadFailed is returned after the report was written when at least
// one workload failed, so scripts can keep the report and still notice.
var errWorkloadFailed = errors.New("some workloads failed")

func benchMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("pinaka-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		proxyURL  = fs.String("proxy", "", "proxy URL, https://host:port or http://host:port; empty: measure the direct baseline only")
		proxyH2   = fs.Bool("proxy-h2", false, "speak HTTP/2 to the proxy (ALPN h2; needs an https proxy)")
		proxyH3   = fs.Bool("proxy-h3", false, "speak HTTP/3 to the proxy, over QUIC on the UDP port of the proxy URL (throughput workloads only)")
		insecure  = fs.Bool("insecure", false, "do not verify the proxy's certificate")
		bearer    = fs.String("bearer", "", "send Proxy-Authorization: Bearer TOKEN")
		basic     = fs.String("basic", "", "send Proxy-Authorization: Basic with TOKEN as password")
		pidList   = fs.String("pid", "", "proxy process id(s), comma-separated, whose RSS is summed for the memory workload")
		workloads = fs.String("workloads", "all", "comma-separated workloads: "+strings.Join(allWorkloads, ",")+"; or "+wUDP+" (CONNECT-UDP over HTTP/3, not in all)")
		label     = fs.String("label", "", "name of this target in reports (default: direct, or the proxy URL)")
		jsonOut   = fs.Bool("json", false, "write the report as JSON")
		baseline  = fs.Bool("baseline", true, "with -proxy, also measure the direct baseline and report ratios")
		cfg       benchConfig
	)
	fs.DurationVar(&cfg.duration, "duration", 3*time.Second, "length of each measurement")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Second, "timeout for each dial, CONNECT or request")
	fs.IntVar(&cfg.tunnels, "tunnels", 16, "tunnels for the downN/upN workloads (HTTP/2: streams on one connection)")
	fs.IntVar(&cfg.clients, "clients", 16, "concurrent workers for setup and forwarding")
	fs.IntVar(&cfg.idleTunnels, "idle-tunnels", 1000, "tunnels held open by the memory workload")
	fs.IntVar(&cfg.perConn, "streams-per-conn", 100, "HTTP/2 streams per connection in the memory workload")
	fs.DurationVar(&cfg.settle, "settle", 2*time.Second, "memory workload: wait after opening the tunnels before reading RSS")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *bearer != "" && *basic != "" {
		return errors.New("-bearer and -basic are exclusive")
	}
	if cfg.duration <= 0 || cfg.timeout <= 0 || cfg.tunnels < 1 || cfg.clients < 1 || cfg.idleTunnels < 1 || cfg.perConn < 1 {
		return errors.New("-duration, -timeout, -tunnels, -clients, -idle-tunnels and -streams-per-conn must be positive")
	}
	for _, s := range strings.Split(*pidList, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		pid, err := strconv.Atoi(s)
		if err != nil || pid <= 0 {
			return fmt.Errorf("parsing -pid %q: not a process id", s)
		}
		cfg.pids = append(cfg.pids, pid)
	}
	names, err := parseWorkloads(*workloads)
	if err != nil {
		return err
	}

	o, err := startOrigin()
	if err != nil {
		return err
	}
	defer o.Close()

	direct := &bench{cfg: cfg, origin: o}
	rep := Report{Label: "direct", Protocol: protoDirect, Duration: cfg.duration.String()}
	target := direct
	if *proxyURL != "" {
		pc, err := newProxyClient(*proxyURL, *insecure, authHeader(*bearer, *basic))
		if err != nil {
			return err
		}
		if (*proxyH2 || *proxyH3) && pc.tls == nil {
			return errors.New("-proxy-h2 and -proxy-h3 need an https:// proxy")
		}
		if *proxyH2 && *proxyH3 {
			return errors.New("-proxy-h2 and -proxy-h3 are exclusive")
		}
		target = &bench{cfg: cfg, origin: o, proxy: pc, h2: *proxyH2, h3: *proxyH3}
		rep.Label, rep.Proxy, rep.Protocol = *proxyURL, *proxyURL, protoH1
		switch {
		case *proxyH2:
			rep.Protocol = protoH2
		case *proxyH3:
			rep.Protocol = protoH3
		}
	}
	if *label != "" {
		rep.Label = *label
	}

	baselines := map[string]Result{}
	failed := false
	for _, w := range names {
		if !target.applies(w) {
			if *workloads != "all" {
				rep.Results = append(rep.Results, Result{Workload: w, Error: "not applicable to " + rep.Protocol})
			}
			continue
		}
		var base *Result
		if bw := baselineOf(w); *baseline && target != direct && bw != "" {
			br, ok := baselines[bw]
			if !ok {
				fmt.Fprintf(stderr, "%s: running %s (direct baseline)\n", rep.Label, bw)
				br = direct.run(ctx, bw)
				baselines[bw] = br
			}
			base = &br
		}
		fmt.Fprintf(stderr, "%s: running %s (%s)\n", rep.Label, w, rep.Protocol)
		r := target.run(ctx, w)
		if base != nil && base.Error == "" && r.Error == "" {
			r.Baseline = &base.Value
			r.Ratio = ratio(r.Value, base.Value)
		}
		if r.Error != "" {
			failed = true
			fmt.Fprintf(stderr, "%s: %s failed: %s\n", rep.Label, w, r.Error)
		}
		rep.Results = append(rep.Results, r)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}

	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return fmt.Errorf("writing report: %w", err)
		}
	} else if err := writeText(stdout, rep); err != nil {
		return fmt.Errorf("writing report: %w", err)
	}
	if failed {
		return errWorkloadFailed
	}
	return nil
}

func parseWorkloads(s string) ([]string, error) {
	if s == "all" {
		return allWorkloads, nil
	}
	var names []string
	for _, w := range strings.Split(s, ",") {
		w = strings.TrimSpace(w)
		// udp (CONNECT-UDP over HTTP/3) is asked for by name only: few
		// proxies offer it, so "all" leaves it out.
		if !slices.Contains(allWorkloads, w) && w != wUDP {
			return nil, fmt.Errorf("unknown workload %q (known: %s,%s)", w, strings.Join(allWorkloads, ","), wUDP)
		}
		names = append(names, w)
	}
	return names, nil
}

func tableMain(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("pinaka-bench table", flag.ContinueOnError)
	out := fs.String("o", "", "also write the table to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var reports []Report
	for _, path := range fs.Args() {
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("reading report: %w", err)
		}
		var rep Report
		if err := json.Unmarshal(data, &rep); err != nil {
			return fmt.Errorf("parsing report %s: %w", path, err)
		}
		reports = append(reports, rep)
	}
	var b strings.Builder
	if err := writeTable(&b, reports); err != nil {
		return err
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
			return fmt.Errorf("writing table: %w", err)
		}
	}
	_, err := io.WriteString(stdout, b.String())
	return err
}

// portsMain prints free loopback ports for bench/run.sh, which has no
// portable way to find them itself. The listeners are held until all ports
// are chosen so that the same port is not printed twice.
func portsMain(args []string, stdout io.Writer) error {
	n := 1
	if len(args) == 1 {
		var err error
		if n, err = strconv.Atoi(args[0]); err != nil || n < 1 {
			return fmt.Errorf("ports: %q is not a positive count", args[0])
		}
	}
	var ports []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return fmt.Errorf("ports: finding a free port: %w", err)
		}
		defer ln.Close()
		ports = append(ports, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	_, err := fmt.Fprintln(stdout, strings.Join(ports, " "))
	return err
}
