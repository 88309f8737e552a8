package main

import (
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

	"github.com/redis/go-redis/v9"
	"golang.org/x/net/http2"

	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// startCollector runs `pinaka collector` on dsn with API key "ck" and
// returns its address.
func startCollector(t *testing.T, dsn string) string {
	t.Helper()
	addr := "127.0.0.1:" + testutil.FreePort(t)
	c := exec.Command(testutil.BuildPinaka(t), "collector")
	c.Dir = t.TempDir()
	c.Env = []string{"PATH=" + os.Getenv("PATH"), "COLLECTOR_ADDR=" + addr, "COLLECTOR_API_KEY=ck", "DATABASE_URL=" + dsn}
	out := &testutil.SyncBuffer{}
	c.Stderr = out
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	t.Cleanup(func() {
		c.Process.Signal(syscall.SIGTERM)
		<-done
		if t.Failed() {
			t.Logf("collector stderr:\n%s", out.String())
		}
	})
	waitFor(t, "collector up", func() bool {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
	return addr
}

// runRevoke runs `pinaka revoke` with env and args.
func runRevoke(t *testing.T, env []string, args ...string) (stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(testutil.BuildPinaka(t), append([]string{"revoke"}, args...)...)
	cmd.Dir = t.TempDir()
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	var o, e strings.Builder
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		t.Fatalf("pinaka revoke %q: %v\n%s%s", args, err, o.String(), e.String())
	}
	return o.String(), e.String()
}

// h2Tunnel opens an HTTP/2 CONNECT tunnel and checks that it echoes.
func h2Tunnel(t *testing.T, addr, target, tok string) (io.ReadCloser, io.WriteCloser) {
	t.Helper()
	tc, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	resp, err := cc.RoundTrip(&http.Request{Method: "CONNECT", URL: &url.URL{Host: target}, Host: target,
		Header: http.Header{"Proxy-Authorization": {"Bearer " + tok}}, Body: pr})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %v %v", err, resp)
	}
	echoOnce(t, pw, resp.Body, "h2 before")
	return resp.Body, pw
}

// Three nodes on one Redis that poll the collector only every hour: a
// revocation reaches them through Redis alone. `pinaka revoke` closes a
// live HTTP/1.1 tunnel on one node and a live HTTP/2 tunnel on another
// (records say token_revoked), every node then refuses the token, another
// token is unaffected; `pinaka revoke --remove` lets it in again on every
// node, also through Redis.
func TestRevocationFansOutThroughRedis(t *testing.T) {
	pool, dsn := pgtest.NewDB(t)
	coll := startCollector(t, dsn)
	r := testutil.StartRedis(t)
	nodes := startFleet(t, 3, r.URL(), "BACKEND_URL=http://"+coll, "BACKEND_API_KEY=ck",
		"REVOCATION_INTERVAL=1h", "LOG_BATCH_INTERVAL=200ms")
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	waitFor(t, "three subscribers", func() bool {
		return c.PubSubNumSub(ctx, "pinaka:revocations").Val()["pinaka:revocations"] == 3
	})
	origin := echoOrigin(t)
	tok, other := fleetToken(t, "fan-t"), fleetToken(t, "fan-other")

	c1, br1 := tunnel1(t, nodes[0].Addr, origin, tok)
	defer c1.Close()
	echoOnce(t, c1, br1, "h1 before")
	h2r, _ := h2Tunnel(t, nodes[1].Addr, origin, tok)
	c3, br3 := tunnel1(t, nodes[1].Addr, origin, other)
	defer c3.Close()
	echoOnce(t, c3, br3, "other before")
	h1Done, h2Done := make(chan time.Time, 1), make(chan time.Time, 1)
	go func() { io.Copy(io.Discard, br1); h1Done <- time.Now() }()
	go func() { io.Copy(io.Discard, h2r); h2Done <- time.Now() }()

	env := []string{"DATABASE_URL=" + dsn, "REDIS_URL=" + r.URL()}
	start := time.Now()
	out, _ := runRevoke(t, env, "--token-id", "fan-t", "--reason", "fan-out test")
	returned := time.Now()
	if !strings.Contains(out, "published on Redis to 3 node(s)") {
		t.Errorf("revoke output: %q", out)
	}
	var closed [2]time.Time
	for i, done := range []chan time.Time{h1Done, h2Done} {
		select {
		case closed[i] = <-done:
		case <-time.After(20 * time.Second):
			t.Fatalf("tunnel %d still open 20s after pinaka revoke, with REVOCATION_INTERVAL=1h", i+1)
		}
	}
	last := max(closed[0].Sub(start), closed[1].Sub(start))
	t.Logf("fan-out: pinaka revoke ran %v (process start, DB commit, publish); both tunnels closed %v after it started, %v after it returned",
		returned.Sub(start).Round(time.Millisecond), last.Round(time.Millisecond), (last - returned.Sub(start)).Round(time.Millisecond))

	for i, n := range nodes {
		if status, body := connectAnswer(t, n.Addr, origin, tok); status != http.StatusProxyAuthRequired || strings.TrimSpace(body) != "token revoked" {
			t.Errorf("node %d: CONNECT with the revoked token: %d %q", i, status, body)
		}
		if status, _ := connectAnswer(t, n.Addr, origin, other); status != 200 {
			t.Errorf("node %d: CONNECT with another token: %d", i, status)
		}
		m := scrape(t, n.admin)
		if m["pinaka_revocation_pushed"] != 1 || m["pinaka_revoked_tokens"] != 1 {
			t.Errorf("node %d: pushed %v revoked %v, want 1 and 1", i, m["pinaka_revocation_pushed"], m["pinaka_revoked_tokens"])
		}
		if want := map[int]float64{0: 1, 1: 1, 2: 0}[i]; m[`pinaka_revocation_closed_total{kind="tunnel"}`] != want {
			t.Errorf("node %d: closed tunnels %v, want %v", i, m[`pinaka_revocation_closed_total{kind="tunnel"}`], want)
		}
	}
	echoOnce(t, c3, br3, "other after")

	// The records of both tunnels reach PostgreSQL saying token_revoked.
	waitFor(t, "token_revoked records of both tunnels", func() bool {
		var n int
		pool.QueryRow(ctx, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id = 'fan-t'
			AND method = 'CONNECT' AND status_code = 200 AND error = 'token_revoked'
			AND probe_node IN ('node-0', 'node-1')`).Scan(&n)
		return n == 2
	})

	// Withdrawn: every node lets the token in again without a poll.
	out, _ = runRevoke(t, env, "--remove", "fan-t")
	if !strings.Contains(out, "published on Redis to 3 node(s)") {
		t.Errorf("revoke --remove output: %q", out)
	}
	for i, n := range nodes {
		waitFor(t, fmt.Sprint("node ", i, " accepting the token again"), func() bool {
			status, _ := connectAnswer(t, n.Addr, origin, tok)
			return status == 200
		})
	}
}

// A node with REDIS_URL and no REVOCATION_URL still has a revocation list,
// fed by Redis alone (and says so at start): --until and --remove apply.
// `pinaka revoke` with an unreachable Redis stores the revocation and only
// warns.
func TestRevocationThroughRedisWithoutPolling(t *testing.T) {
	_, dsn := pgtest.NewDB(t)
	r := testutil.StartRedis(t)
	n := startFleet(t, 1, r.URL())[0]
	if !strings.Contains(n.Log.String(), "REDIS_URL without REVOCATION_URL") {
		t.Errorf("no warning about Redis-only revocations:\n%s", n.Log.String())
	}
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	waitFor(t, "the subscriber", func() bool {
		return c.PubSubNumSub(context.Background(), "pinaka:revocations").Val()["pinaka:revocations"] == 1
	})
	origin := echoOrigin(t)
	tok := fleetToken(t, "solo")
	env := []string{"DATABASE_URL=" + dsn, "REDIS_URL=" + r.URL()}
	runRevoke(t, env, "--token-id", "solo", "--until", "1h")
	waitFor(t, "the token refused", func() bool {
		status, _ := connectAnswer(t, n.Addr, origin, tok)
		return status == http.StatusProxyAuthRequired
	})
	if m := scrape(t, n.admin); m["pinaka_revoked_tokens"] != 1 || m["pinaka_revocation_pushed"] != 1 {
		t.Errorf("revoked %v pushed %v", m["pinaka_revoked_tokens"], m["pinaka_revocation_pushed"])
	}
	runRevoke(t, env, "--remove", "solo")
	waitFor(t, "the token accepted again", func() bool {
		status, _ := connectAnswer(t, n.Addr, origin, tok)
		return status == 200
	})

	dead := []string{"DATABASE_URL=" + dsn, "REDIS_URL=redis://127.0.0.1:" + testutil.FreePort(t) + "/0"}
	out, errOut := runRevoke(t, dead, "--token-id", "stored-anyway")
	if !strings.Contains(out, `"stored-anyway" revoked`) || !strings.Contains(errOut, "warning: publishing on REDIS_URL failed") {
		t.Errorf("revoke with Redis down: stdout %q stderr %q", out, errOut)
	}
	out, _ = runRevoke(t, []string{"DATABASE_URL=" + dsn}, "--list")
	if !strings.Contains(out, "stored-anyway") {
		t.Errorf("the revocation was not stored:\n%s", out)
	}
}
