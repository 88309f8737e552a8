package main

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// promtool finds promtool (Debian package prometheus; scripts/deps.sh
// installs it). Outside CI a machine without it skips the test, saying
// so; in CI (CI set, as .ci/run does) its absence fails it.
func promtool(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool not found (scripts/deps.sh installs the prometheus package); CI must run this test")
		}
		t.Skip("promtool not found: install the prometheus package (scripts/deps.sh) to run this test")
	}
	return path
}

// The real /metrics of a running proxy that has forwarded a request,
// tunnelled and shipped records passes `promtool check metrics` (names,
// units, help, histogram shape), with the timing histograms and the
// shipping lag in it.
func TestMetricsPassPromtool(t *testing.T) {
	bin := promtool(t)
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusOK)
	}))
	defer backend.Close()
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer origin.Close()
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := startBinary(t, certPath, keyPath, "ADMIN_ADDR="+admin, "BACKEND_URL="+backend.URL,
		"LOG_SPOOL_DIR="+dir+"/spool", "LOG_BATCH_INTERVAL=100ms")
	tok := testToken(t)

	// A tunnel and a forwarded request, so the histograms have series.
	c, br := tunnel1(t, p.Addr, echoOrigin(t), tok)
	echoOnce(t, c, br, "ping")
	c.Close()
	fc, err := tls.Dial("tcp", p.Addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(fc, "GET %s/ HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\nConnection: close\r\n\r\n", origin.URL, origin.Listener.Addr(), tok)
	resp, err := io.ReadAll(fc)
	fc.Close()
	if err != nil || !bytes.HasPrefix(resp, []byte("HTTP/1.1 200")) {
		t.Fatalf("forwarded GET: %v %.80q", err, resp)
	}

	var body []byte
	for _, want := range []string{
		`pinaka_upstream_connect_seconds_bucket{kind="connect",outcome="ok",protocol="HTTP/1.1"`,
		`pinaka_upstream_ttfb_seconds_bucket{kind="forward",outcome="ok",protocol="HTTP/1.1"`,
		`pinaka_upstream_connect_seconds_count{kind="forward",outcome="ok",protocol="HTTP/1.1"}`,
		"pinaka_ship_lag_seconds ",
		"pinaka_ship_spool_bytes ",
	} {
		// The tunnel's record is written when it ends, just after the
		// client closed: poll until its series is there.
		waitForMetric(t, admin, want, &body)
	}
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

func waitForMetric(t *testing.T, admin, want string, body *[]byte) {
	t.Helper()
	for range 200 {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		*body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(*body), want) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("/metrics has no %q:\n%s", want, *body)
}
