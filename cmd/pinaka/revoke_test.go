package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

func TestRevokeCommand(t *testing.T) {
	clearEnv(t)
	_, dsn := pgtest.NewDB(t)
	env := emptyEnvFile(t)

	r := runCLI("revoke", "--env-file", env, "--token-id", "x")
	if r.code != 1 || !strings.Contains(r.stderr, "DATABASE_URL is required") {
		t.Errorf("without DATABASE_URL: %v", r)
	}
	t.Setenv("DATABASE_URL", dsn)
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "exactly one of"},
		{[]string{"--list", "--remove", "a"}, "exactly one of"},
		{[]string{"--list", "--until", "1h"}, "--until and --reason go with --token-id"},
		{[]string{"--token-id", strings.Repeat("x", 51)}, "token_id is longer than 50 bytes"},
		{[]string{"--token-id", "a\tb"}, "token_id contains a control character"},
		{[]string{"--token-id", "a", "--until", "tomorrow"}, "--until must be an RFC 3339 time"},
		{[]string{"--token-id", "a", "--until", "2001-01-01T00:00:00Z"}, "is in the past"},
		{[]string{"--remove", "never-revoked"}, "is not revoked"},
	} {
		r := runCLI(append([]string{"revoke", "--env-file", env}, c.args...)...)
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("revoke %q: %v; want an error saying %q", c.args, r, c.want)
		}
	}

	if r := runCLI("revoke", "--env-file", env, "--token-id", "leaked-1", "--reason", "posted in a chat"); r.code != 0 || !strings.Contains(r.stdout, `"leaked-1" revoked`) {
		t.Fatalf("revoke: %v", r)
	}
	if r := runCLI("revoke", "--env-file", env, "--token-id", "session_5", "--until", "2h"); r.code != 0 || !strings.Contains(r.stdout, "until 20") {
		t.Fatalf("revoke --until: %v", r)
	}
	r = runCLI("revoke", "--env-file", env, "--list")
	if r.code != 0 {
		t.Fatalf("list: %v", r)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "TOKEN_ID") ||
		!strings.Contains(lines[1], "leaked-1") || !strings.Contains(lines[1], "posted in a chat") || !strings.Contains(lines[1], "active") ||
		!strings.Contains(lines[2], "session_5") || !strings.Contains(lines[2], "active") {
		t.Errorf("list:\n%s", r.stdout)
	}
	if r := runCLI("revoke", "--env-file", env, "--remove", "leaked-1"); r.code != 0 || !strings.Contains(r.stdout, "no longer revoked") {
		t.Fatalf("remove: %v", r)
	}
	r = runCLI("revoke", "--env-file", env, "--list")
	if strings.Contains(r.stdout, "leaked-1") || !strings.Contains(r.stdout, "session_5") {
		t.Errorf("list after remove:\n%s", r.stdout)
	}
}

// The whole path with the binaries: `pinaka revoke` writes PostgreSQL,
// `pinaka collector` serves the list, `pinaka serve` polls it and closes a
// live HTTP/1.1 and a live HTTP/2 CONNECT tunnel of the token, whose
// records (shipped to the collector) say token_revoked; the token then
// gets 407 "token revoked" while another token works. A restart while the
// collector is down keeps the token refused (the list saved in STATE_DIR).
func TestRevocationEndToEnd(t *testing.T) {
	pool, dsn := pgtest.NewDB(t)
	bin := testutil.BuildPinaka(t)
	collAddr := "127.0.0.1:" + testutil.FreePort(t)
	coll := exec.Command(bin, "collector")
	coll.Dir = t.TempDir()
	coll.Env = []string{"PATH=" + os.Getenv("PATH"), "COLLECTOR_ADDR=" + collAddr, "COLLECTOR_API_KEY=ck", "DATABASE_URL=" + dsn}
	collOut := &testutil.SyncBuffer{}
	coll.Stderr = collOut
	if err := coll.Start(); err != nil {
		t.Fatal(err)
	}
	collDone := make(chan struct{})
	go func() { coll.Wait(); close(collDone) }()
	stopCollector := func() {
		coll.Process.Signal(syscall.SIGTERM)
		<-collDone
	}
	t.Cleanup(func() {
		stopCollector()
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
	state := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	nodeEnv := []string{"BACKEND_URL=http://" + collAddr, "BACKEND_API_KEY=ck", "REVOCATION_INTERVAL=1s",
		"STATE_DIR=" + state, "LOG_BATCH_INTERVAL=200ms", "PROBE_NODE_NAME=node-r"}
	p := startBinary(t, certPath, keyPath, nodeEnv...)
	origin := echoOrigin(t)
	tok := testToken(t) // token_id "t"
	other, err := auth.Mint([]byte(lifecycleSecret), auth.MintOptions{UserID: "u2", TokenID: "t2", Regions: []string{"test"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}

	c1, br1 := tunnel1(t, p.Addr, origin, tok)
	defer c1.Close()
	echoOnce(t, c1, br1, "h1 before")
	c2, br2 := tunnel1(t, p.Addr, origin, other)
	defer c2.Close()
	echoOnce(t, c2, br2, "other before")
	tc, err := tls.Dial("tcp", p.Addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	pr, pw := io.Pipe()
	defer pw.Close()
	resp, err := cc.RoundTrip(&http.Request{Method: "CONNECT", URL: &url.URL{Host: origin}, Host: origin,
		Header: http.Header{"Proxy-Authorization": {"Bearer " + tok}}, Body: pr})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %v %v", err, resp)
	}
	echoOnce(t, pw, resp.Body, "h2 before")

	h1Done, h2Done := make(chan error, 1), make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, br1); h1Done <- err }()
	go func() { _, err := io.Copy(io.Discard, resp.Body); h2Done <- err }()

	rev := exec.Command(bin, "revoke", "--token-id", "t", "--reason", "e2e")
	rev.Dir = t.TempDir()
	rev.Env = []string{"PATH=" + os.Getenv("PATH"), "DATABASE_URL=" + dsn}
	if out, err := rev.CombinedOutput(); err != nil {
		t.Fatalf("pinaka revoke: %v\n%s", err, out)
	}
	for what, done := range map[string]chan error{"HTTP/1.1 tunnel": h1Done, "HTTP/2 tunnel": h2Done} {
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s still open 20s after pinaka revoke", what)
		}
	}

	status, body := connectAnswer(t, p.Addr, origin, tok)
	if status != http.StatusProxyAuthRequired || strings.TrimSpace(body) != "token revoked" {
		t.Errorf("CONNECT with the revoked token: %d %q", status, body)
	}
	echoOnce(t, c2, br2, "other after")
	if status, _ := connectAnswer(t, p.Addr, origin, other); status != 200 {
		t.Errorf("CONNECT with the other token: %d", status)
	}

	// The records reach PostgreSQL through the collector.
	type row struct{ protocol, errCode string }
	var rows []row
	waitFor(t, "token_revoked records of both tunnels", func() bool {
		rows = rows[:0]
		rs, err := pool.Query(context.Background(), `SELECT protocol, error FROM forward_proxy_request_logs
			WHERE token_id = 't' AND method = 'CONNECT' AND status_code = 200`)
		if err != nil {
			return false
		}
		for rs.Next() {
			var r row
			rs.Scan(&r.protocol, &r.errCode)
			rows = append(rows, r)
		}
		return len(rows) == 2
	})
	for _, r := range rows {
		if r.errCode != "token_revoked" {
			t.Errorf("%s tunnel record: error %q, want token_revoked", r.protocol, r.errCode)
		}
	}
	var refused int
	pool.QueryRow(context.Background(), `SELECT count(*) FROM forward_proxy_request_logs
		WHERE token_id = 't' AND status_code = 407 AND error = 'token_revoked'`).Scan(&refused)
	if refused != 1 {
		// Shipped every 200ms; the refusal may still be on its way.
		waitFor(t, "the 407 record", func() bool {
			pool.QueryRow(context.Background(), `SELECT count(*) FROM forward_proxy_request_logs
				WHERE token_id = 't' AND status_code = 407 AND error = 'token_revoked'`).Scan(&refused)
			return refused == 1
		})
	}

	// Restart with the collector down: the saved list is in force.
	c2.Close()
	p.Signal(syscall.SIGTERM)
	if code, _ := p.Wait(t, 20*time.Second); code != 0 {
		t.Fatalf("proxy exit %d", code)
	}
	stopCollector()
	p2 := startBinary(t, certPath, keyPath, nodeEnv...)
	if !strings.Contains(p2.Log.String(), "revocation list loaded from STATE_DIR") {
		t.Errorf("restart did not load the saved list:\n%s", p2.Log.String())
	}
	if status, body := connectAnswer(t, p2.Addr, origin, tok); status != http.StatusProxyAuthRequired || strings.TrimSpace(body) != "token revoked" {
		t.Errorf("after a restart with the collector down: %d %q", status, body)
	}
	if status, _ := connectAnswer(t, p2.Addr, origin, other); status != 200 {
		t.Errorf("other token after the restart: %d", status)
	}
}

// connectAnswer sends an HTTP/1.1 CONNECT and returns the status and body
// of a refusal.
func connectAnswer(t *testing.T, addr, target, tok string) (int, string) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n", target, target, tok)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == 200 {
		return 200, ""
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	return resp.StatusCode, string(b)
}

func TestCheckConfigShowsRevocation(t *testing.T) {
	clearEnv(t)
	setEnv(t, goodConfig(t))
	r := runCLI("check-config", "--env-file", emptyEnvFile(t))
	s := settings(r.stdout)
	if r.code != 0 || s["REVOCATION_URL"] != "http://127.0.0.1:8080/api/forward-proxy/revocations" || s["REVOCATION_INTERVAL"] != "10s" {
		t.Errorf("default from BACKEND_URL: %v", r)
	}
	t.Setenv("REVOCATION_URL", "off")
	r = runCLI("check-config", "--env-file", emptyEnvFile(t))
	if s := settings(r.stdout); r.code != 0 || s["REVOCATION_URL"] != "off" {
		t.Errorf("REVOCATION_URL=off: %v", r)
	}
	t.Setenv("REVOCATION_URL", "")
	t.Setenv("REVOCATION_INTERVAL", "100ms")
	r = runCLI("check-config", "--env-file", emptyEnvFile(t))
	if r.code != 1 || !strings.Contains(r.stderr, "REVOCATION_INTERVAL must be at least 1s") {
		t.Errorf("REVOCATION_INTERVAL=100ms: %v", r)
	}
}
