package main

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/server"
)

// startH3Pinaka runs a real Pinaka with HTTP/3 on loopback and returns its
// QUIC address and a valid token.
func startH3Pinaka(t *testing.T) (addr, token string) {
	t.Helper()
	const secret = "0123456789abcdef0123456789abcdef-bench-secret"
	v := map[string]string{
		"JWT_SECRET": secret, "PROXY_BIND": "127.0.0.1", "ADMIN_ADDR": "off", "PROBE_NODE_REGION": "bench",
		"HTTP3_ENABLED": "true", "EGRESS_ALLOW_CIDRS": "127.0.0.0/8", "LOG_LEVEL": "error",
	}
	cfg, err := config.Load(func(k string) (string, bool) { s, ok := v[k]; return s, ok }, true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ProxyPort = 0
	cert, _, _, err := selfsigned.Cert(time.Hour, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	app, err := server.NewApp(cfg, slog.New(slog.DiscardHandler), server.AppOptions{Certs: server.StaticCertStore(cert)})
	if err != nil {
		t.Fatal(err)
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = app.Shutdown(ctx)
	})
	token, err = auth.Mint([]byte(secret), auth.MintOptions{UserID: "bench", TokenID: "bench", Regions: []string{"bench"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return app.Server.H3Addr().String(), token
}

// TestUDPWorkload: the CONNECT-UDP workload moves datagrams directly and
// through a real Pinaka over HTTP/3, charges the proxy's CPU per datagram,
// and reports a refusal as its error.
func TestUDPWorkload(t *testing.T) {
	direct := &bench{cfg: smokeConfig()}
	r := direct.run(context.Background(), wUDP)
	if r.Error != "" || r.Value <= 0 || r.Unit != "datagrams/s" || r.CPUUnit != "µs/datagram" || r.ProxyCPU != nil {
		t.Fatalf("direct: %+v", r)
	}

	addr, token := startH3Pinaka(t)
	pc, err := newProxyClient("https://"+addr, true, authHeader(token, ""))
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{cfg: smokeConfig(), proxy: pc, h3: true}
	if !b.applies(wUDP) {
		t.Fatal("udp does not apply to an HTTP/3 proxy")
	}
	if (&bench{cfg: smokeConfig(), proxy: pc, h2: true}).applies(wUDP) {
		t.Fatal("udp applies to an HTTP/2 proxy")
	}
	r = b.run(context.Background(), wUDP)
	if r.Error != "" || r.Value <= 0 || r.Ops == 0 || r.Ops%2 != 0 || r.ProxyCPU == nil || *r.ProxyCPU <= 0 {
		t.Fatalf("through Pinaka: %+v", r)
	}

	wrong, _ := newProxyClient("https://"+addr, true, authHeader("not-a-token", ""))
	r = (&bench{cfg: smokeConfig(), proxy: wrong, h3: true}).run(context.Background(), wUDP)
	if !strings.Contains(r.Error, "407") {
		t.Fatalf("refused flow: error %q, want the 407", r.Error)
	}

	plain, _ := newProxyClient("http://"+addr, false, "")
	if (&bench{cfg: smokeConfig(), proxy: plain}).applies(wUDP) {
		t.Fatal("udp applies to an HTTP/1.1 proxy")
	}
}

// TestUDPWorkloadByNameOnly: "all" leaves udp out, naming it with
// -proxy-h3 runs it, in an HTTP/3 report.
func TestUDPWorkloadByNameOnly(t *testing.T) {
	all, err := parseWorkloads("all")
	if err != nil || len(all) == 0 {
		t.Fatal(all, err)
	}
	for _, w := range all {
		if w == wUDP {
			t.Fatal("udp is in all")
		}
	}
	if names, err := parseWorkloads("udp"); err != nil || len(names) != 1 {
		t.Fatalf("parseWorkloads(udp) = %v, %v", names, err)
	}
	addr, token := startH3Pinaka(t)
	var out strings.Builder
	err = benchMain(context.Background(), []string{"-proxy", "https://" + addr, "-proxy-h3", "-insecure", "-bearer", token, "-json",
		"-workloads", "udp", "-duration", "100ms", "-tunnels", "2"}, &out, io.Discard)
	if err != nil {
		t.Fatalf("benchMain: %v\n%s", err, out.String())
	}
	for _, want := range []string{`"protocol": "HTTP/3"`, `"workload": "udp"`, `"unit": "datagrams/s"`, `"ratio":`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %s:\n%s", want, out.String())
		}
	}
}
