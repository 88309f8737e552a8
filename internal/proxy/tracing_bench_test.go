package proxy_test

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/server"
)

// BenchmarkForwardTracing is the request path (a forwarded GET over a kept
// alive HTTP/1.1 connection to the proxy and from it to the origin), with
// tracing off and on (every request sampled, exported to a receiver on
// loopback that discards). allocs/op is the stable measure on a shared
// machine: off must equal the code without tracing (docs/PERFORMANCE.md).
func BenchmarkForwardTracing(b *testing.B) {
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer origin.Close()
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	}))
	defer sink.Close()
	for _, mode := range []string{"off", "on"} {
		b.Run(mode, func(b *testing.B) {
			v := map[string]string{
				"JWT_SECRET": testSecret, "PROXY_BIND": "127.0.0.1", "PROXY_PORT": "1", "ADMIN_ADDR": "off",
				"PROBE_NODE_REGION": "us-east", "EGRESS_ALLOW_CIDRS": "127.0.0.0/8", "LOG_LEVEL": "error",
				"RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000000", "RATE_LIMIT_BURST_SIZE": "1000000000",
			}
			if mode == "on" {
				v["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.URL
				v["OTEL_TRACES_SAMPLER"] = "always_on"
				b.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.URL)
				b.Setenv("OTEL_TRACES_SAMPLER", "always_on")
			}
			cfg, err := config.Load(func(k string) (string, bool) { s, ok := v[k]; return s, ok }, true)
			if err != nil {
				b.Fatal(err)
			}
			cfg.ProxyPort = 0
			app, err := server.NewApp(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), server.AppOptions{
				Certs: server.StaticCertStore(proxyCert),
			})
			if err != nil {
				b.Fatal(err)
			}
			if err := app.Start(); err != nil {
				b.Fatal(err)
			}
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = app.Shutdown(ctx)
			}()
			tok, err := auth.Mint([]byte(testSecret), auth.MintOptions{UserID: "u", TokenID: "bench", Regions: []string{"us-east"}, TTL: time.Hour})
			if err != nil {
				b.Fatal(err)
			}
			tr := &http.Transport{
				Proxy:           http.ProxyURL(&url.URL{Scheme: "https", Host: app.Server.ProxyAddr().String()}),
				TLSClientConfig: &tls.Config{RootCAs: testRoots, NextProtos: []string{"http/1.1"}},
			}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: authForward{tr, "Bearer " + tok}}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				resp, err := c.Get(origin.URL + "/")
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatal(resp.Status)
				}
			}
		})
	}
}
