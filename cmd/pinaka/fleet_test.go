package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// fleetNode is one `pinaka serve` of a fleet, with its admin address.
type fleetNode struct {
	*testutil.Pinaka
	admin string
}

// startFleet runs n proxies sharing the test-owned Redis at redisURL.
func startFleet(t *testing.T, n int, redisURL string, extra ...string) []*fleetNode {
	t.Helper()
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	var nodes []*fleetNode
	for i := 0; i < n; i++ {
		admin := "127.0.0.1:" + testutil.FreePort(t)
		// REDIS_TIMEOUT is generous: the claims here are about a dead
		// Redis, and a busy test machine must not look like a slow one.
		env := append([]string{"REDIS_URL=" + redisURL, "ADMIN_ADDR=" + admin, "REDIS_TIMEOUT=2s",
			fmt.Sprintf("PROBE_NODE_NAME=node-%d", i), fmt.Sprintf("FLEET_SIZE=%d", n)}, extra...)
		nodes = append(nodes, &fleetNode{Pinaka: startBinary(t, certPath, keyPath, env...), admin: admin})
	}
	return nodes
}

func fleetToken(t *testing.T, tokenID string) string {
	t.Helper()
	tok, err := auth.Mint([]byte(lifecycleSecret), auth.MintOptions{UserID: "u", TokenID: tokenID, Regions: []string{"test"}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// roundRobin sends n forwards of tokenID spread over the nodes and counts
// the statuses. forward fails the test on any transport error.
func roundRobin(t *testing.T, nodes []*fleetNode, o, tokenID string, n int) map[int]int {
	t.Helper()
	auth := "Bearer " + fleetToken(t, tokenID)
	got := map[int]int{}
	for i := 0; i < n; i++ {
		got[forward(t, nodes[i%len(nodes)].Addr, fmt.Sprintf("%s/%s/%d", o, tokenID, i), auth)]++
	}
	return got
}

// Three proxies on one Redis: one shared burst, not three; Redis killed →
// every request still answered, on local state (burst / FLEET_SIZE per
// node), fallback counted; Redis back → shared again; a revocation
// published on the channel reaches every node.
func TestFleetSharesLimitsAndSurvivesRedis(t *testing.T) {
	r := testutil.StartRedis(t)
	nodes := startFleet(t, 3, r.URL(), "RATE_LIMIT_BURST_SIZE=12", "RATE_LIMIT_REQUESTS_PER_MINUTE=1")
	o := origin(t)

	got := roundRobin(t, nodes, o, "shared", 36)
	if got[200] != 12 || got[429] != 24 {
		t.Errorf("three nodes sharing a burst of 12: %v, want 12×200 and 24×429", got)
	}

	r.Kill()
	got = roundRobin(t, nodes, o, "outage", 36)
	// Each node decides alone on a fresh local bucket of 12/3 = 4.
	if got[200] != 12 || got[429] != 24 || len(got) != 2 {
		t.Errorf("during the outage: %v, want 4×200 per node (12) and the rest 429, nothing else", got)
	}
	for i, n := range nodes {
		m := scrape(t, n.admin)
		if m[`pinaka_redis_fallback_total{op="rate_limit"}`] != 12 || m["pinaka_redis_up"] != 0 {
			t.Errorf("node %d: fallback %v up %v, want 12 and 0", i,
				m[`pinaka_redis_fallback_total{op="rate_limit"}`], m["pinaka_redis_up"])
		}
		if c := strings.Count(n.Log.String(), "deciding limits on this node alone"); c != 1 {
			t.Errorf("node %d logged the outage %d times, want once", i, c)
		}
	}

	r.Restart()
	for i, n := range nodes {
		waitFor(t, fmt.Sprint("node ", i, " back on Redis"), func() bool { return scrape(t, n.admin)["pinaka_redis_up"] == 1 })
	}
	got = roundRobin(t, nodes, o, "back", 36)
	if got[200] != 12 || got[429] != 24 {
		t.Errorf("after Redis came back: %v, want one shared burst of 12", got)
	}
	for i, n := range nodes {
		if f := scrape(t, n.admin)[`pinaka_redis_fallback_total{op="rate_limit"}`]; f != 12 {
			t.Errorf("node %d: fallback_total %v after recovery, want still 12", i, f)
		}
	}

	// Revocation fan-out: every node subscribes to the channel.
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	waitFor(t, "three subscribers", func() bool {
		return c.PubSubNumSub(ctx, "pinaka:revocations").Val()["pinaka:revocations"] == 3
	})
	if n := c.Publish(ctx, "pinaka:revocations", "session_7").Val(); n != 3 {
		t.Fatalf("revocation reached %d nodes, want 3", n)
	}
	for i, n := range nodes {
		waitFor(t, fmt.Sprint("revocation on node ", i), func() bool {
			return scrape(t, n.admin)[`pinaka_redis_revocations_received_total{result="accepted"}`] == 1
		})
		if !strings.Contains(n.Log.String(), `"token_ids":["session_7"]`) {
			t.Errorf("node %d did not log the revoked id", i)
		}
	}
}

// openTunnel opens an HTTP/1.1 CONNECT and returns the status, keeping
// the connection open when it is 200.
func openTunnel(t *testing.T, addr, target, tok string) (int, net.Conn) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n", target, target, tok)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		c.Close()
		return resp.StatusCode, nil
	}
	t.Cleanup(func() { c.Close() })
	return resp.StatusCode, c
}

// MAX_TUNNELS_PER_TOKEN across the fleet; a node killed with SIGKILL
// leaves leases that expire within TUNNEL_LEASE_TTL, and the token can
// open tunnels on the other nodes again.
func TestFleetTunnelCapAndDeadNodeLeases(t *testing.T) {
	r := testutil.StartRedis(t)
	nodes := startFleet(t, 3, r.URL(), "MAX_TUNNELS_PER_TOKEN=2", "TUNNEL_LEASE_TTL=3s")
	echo := echoOrigin(t)
	tok := fleetToken(t, "tun")
	for i := 0; i < 2; i++ {
		if s, _ := openTunnel(t, nodes[i].Addr, echo, tok); s != 200 {
			t.Fatalf("tunnel %d on node %d: %d", i+1, i, s)
		}
	}
	if s, _ := openTunnel(t, nodes[2].Addr, echo, tok); s != 429 {
		t.Fatalf("third tunnel with a fleet cap of 2: %d, want 429", s)
	}
	// A second token is not affected.
	if s, _ := openTunnel(t, nodes[2].Addr, echo, fleetToken(t, "other")); s != 200 {
		t.Fatalf("another token: %d", s)
	}

	nodes[0].Signal(syscall.SIGKILL)
	<-nodes[0].Exited()
	// Its lease outlives it for up to a TTL; then the slot is free.
	waitFor(t, "the dead node's lease to expire", func() bool {
		s, _ := openTunnel(t, nodes[2].Addr, echo, tok)
		return s == 200
	})
	if s, _ := openTunnel(t, nodes[1].Addr, echo, tok); s != 429 {
		t.Errorf("after the dead node's lease expired, a third live tunnel got %d, want 429", s)
	}
	for i, n := range nodes[1:] {
		if f := scrape(t, n.admin)[`pinaka_redis_fallback_total{op="tunnel"}`]; f != 0 {
			t.Errorf("node %d: %v tunnel fallbacks with Redis up", i+1, f)
		}
	}
}

// redisCalls is how many times Redis ran cmd since its stats were reset.
func redisCalls(t *testing.T, c *redis.Client, cmd string) int {
	t.Helper()
	for _, l := range strings.Split(c.Info(context.Background(), "commandstats").Val(), "\r\n") {
		if v, ok := strings.CutPrefix(l, "cmdstat_"+cmd+":calls="); ok {
			n, err := strconv.Atoi(strings.SplitN(v, ",", 2)[0])
			if err != nil {
				t.Fatalf("commandstats line %q: %v", l, err)
			}
			return n
		}
	}
	return 0
}

// A CONNECT costs one Redis script call (its rate limit and tunnel lease
// together) and one ZREM when it ends; a CONNECT refused after that call
// (a denied target) gives its lease back.
func TestFleetConnectIsOneRedisCall(t *testing.T) {
	r := testutil.StartRedis(t)
	node := startFleet(t, 1, r.URL(), "MAX_TUNNELS_PER_TOKEN=1")[0]
	echo := echoOrigin(t)
	tok := fleetToken(t, "one")
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	leases := func() int64 { return c.ZCard(ctx, "pinaka:tunnels:one").Val() }
	calls := func(cmd string) int { return redisCalls(t, c, cmd) }

	// The first CONNECT loads the script; the figures are the next one's.
	s, conn := openTunnel(t, node.Addr, echo, tok)
	if s != 200 {
		t.Fatalf("CONNECT: %d", s)
	}
	conn.Close()
	waitFor(t, "the lease released", func() bool { return leases() == 0 })
	c.ConfigResetStat(ctx)
	if s, conn = openTunnel(t, node.Addr, echo, tok); s != 200 {
		t.Fatalf("CONNECT: %d", s)
	}
	if n, e := calls("evalsha"), calls("eval"); n != 1 || e != 0 {
		t.Errorf("one CONNECT made %d EVALSHA and %d EVAL, want one call", n, e)
	}
	if leases() != 1 {
		t.Errorf("%d leases with one tunnel open", leases())
	}
	conn.Close()
	waitFor(t, "the lease released", func() bool { return leases() == 0 })
	if n := calls("zrem"); n != 1 {
		t.Errorf("closing the tunnel made %d ZREM, want 1", n)
	}

	// A denied target is refused after the lease was taken: the lease is
	// given back, so the token's one slot is free for the next tunnel.
	if s, _ := openTunnel(t, node.Addr, "10.1.2.3:443", tok); s != 403 {
		t.Fatalf("CONNECT to a private address: %d, want 403", s)
	}
	waitFor(t, "the refused CONNECT's lease released", func() bool { return leases() == 0 })
	if s, _ := openTunnel(t, node.Addr, echo, tok); s != 200 {
		t.Errorf("the slot was not freed by the refused CONNECT: %d", s)
	}
	if f := scrape(t, node.admin)[`pinaka_redis_fallback_total{op="tunnel"}`]; f != 0 {
		t.Errorf("%v tunnel fallbacks with Redis up", f)
	}
}

// runServe runs `pinaka serve` with env until it logs that it listens (then
// stops it and returns -1) or exits (its exit code), with its output.
func runServe(t *testing.T, env ...string) (code int, out string) {
	t.Helper()
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	cmd := exec.Command(testutil.BuildPinaka(t), "serve")
	cmd.Dir = dir
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "JWT_SECRET=" + lifecycleSecret,
		"TLS_CERT_PATH=" + certPath, "TLS_KEY_PATH=" + keyPath, "ADMIN_ADDR=off",
		"PROXY_BIND=127.0.0.1", "PROXY_PORT=" + testutil.FreePort(t)}, env...)
	buf := &testutil.SyncBuffer{}
	cmd.Stderr = buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case <-done:
			return cmd.ProcessState.ExitCode(), buf.String()
		case <-deadline:
			cmd.Process.Kill()
			<-done
			t.Fatalf("serve neither listened nor exited:\n%s", buf.String())
		case <-time.After(20 * time.Millisecond):
			if strings.Contains(buf.String(), `"msg":"pinaka listening"`) {
				cmd.Process.Signal(syscall.SIGTERM)
				<-done
				return -1, buf.String()
			}
		}
	}
}

func TestFleetRedisURLAtStart(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:6379", "redis://:s3cret@127.0.0.1:6379/x", "redis://:s3cret@127.0.0.1:0"} {
		code, out := runServe(t, "REDIS_URL="+u)
		if code != 1 || !strings.Contains(out, "REDIS_URL") {
			t.Errorf("malformed REDIS_URL %q: exit %d, want 1 naming REDIS_URL:\n%s", u, code, out)
		}
		if strings.Contains(out, "s3cret") {
			t.Errorf("the refusal shows the password:\n%s", out)
		}
	}
	// Nothing listens there: a warning, and the node serves on local state.
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := startBinary(t, certPath, keyPath, "ADMIN_ADDR="+admin,
		"REDIS_URL=redis://:s3cret@127.0.0.1:"+testutil.FreePort(t)+"/0")
	if s := forward(t, p.Addr, origin(t)+"/x", "Bearer "+testToken(t)); s != 200 {
		t.Errorf("request without Redis: %d", s)
	}
	m := scrape(t, admin)
	if m["pinaka_redis_up"] != 0 || m[`pinaka_redis_fallback_total{op="rate_limit"}`] != 1 {
		t.Errorf("up %v fallback %v, want 0 and 1", m["pinaka_redis_up"], m[`pinaka_redis_fallback_total{op="rate_limit"}`])
	}
	out := p.Log.String()
	if !strings.Contains(out, "REDIS_URL unreachable at start") || strings.Contains(out, "s3cret") {
		t.Errorf("want a warning without the password:\n%s", out)
	}
}

func TestCheckConfigShowsFleetWithoutRedisPassword(t *testing.T) {
	clearEnv(t)
	setEnv(t, goodConfig(t))
	t.Setenv("REDIS_URL", "rediss://:redis-password-value@10.0.0.7:6380/2")
	t.Setenv("FLEET_SIZE", "4")
	r := runCLI("check-config", "--env-file", emptyEnvFile(t))
	if r.code != 0 {
		t.Fatalf("check-config: %v", r)
	}
	if strings.Contains(r.stdout, "redis-password-value") {
		t.Errorf("REDIS_URL password printed:\n%s", r.stdout)
	}
	s := settings(r.stdout)
	if s["REDIS_URL"] != "rediss://:xxxxx@10.0.0.7:6380/2" || s["FLEET_SIZE"] != "4" || s["REDIS_TIMEOUT"] != "50ms" {
		t.Errorf("fleet rows: REDIS_URL=%q FLEET_SIZE=%q REDIS_TIMEOUT=%q", s["REDIS_URL"], s["FLEET_SIZE"], s["REDIS_TIMEOUT"])
	}
}

// A token far below its limits reuses what its node reserved: a closed
// tunnel's lease and units of the bucket taken ahead, so CONNECTs in a row
// cost no Redis round trip each; the lease goes back within a second or
// two of the last tunnel.
func TestFleetConnectsReuseReservations(t *testing.T) {
	r := testutil.StartRedis(t)
	node := startFleet(t, 1, r.URL())[0]
	echo := echoOrigin(t)
	tok := fleetToken(t, "warm")
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	leases := func() int64 { return c.ZCard(ctx, "pinaka:tunnels:warm").Val() }
	calls := func(cmd string) int { return redisCalls(t, c, cmd) }
	s, conn := openTunnel(t, node.Addr, echo, tok)
	if s != 200 {
		t.Fatalf("CONNECT: %d", s)
	}
	conn.Close()
	c.ConfigResetStat(ctx)
	for i := range 10 {
		s, conn := openTunnel(t, node.Addr, echo, tok)
		if s != 200 {
			t.Fatalf("CONNECT %d: %d", i, s)
		}
		conn.Close()
		// The next one starts once this one has ended on the node, so
		// that its lease is there to be reused.
		waitFor(t, "the tunnel closed", func() bool { return scrape(t, node.admin)["pinaka_active_tunnels"] == 0 })
	}
	// The first asks for one unit, each next one for twice as many while
	// they are used quickly: 1, 2, 4, 8 units.
	if n := calls("evalsha") + calls("eval"); n > 6 {
		t.Errorf("10 CONNECTs made %d script calls, want at most 6 (units reserved ahead)", n)
	}
	if n := calls("zrem"); n > 1 {
		t.Errorf("10 closed tunnels made %d ZREM, want their lease kept for the next", n)
	}
	m := scrape(t, node.admin)
	if m[`pinaka_redis_reserved_total{op="tunnel"}`] < 9 || m[`pinaka_redis_reserved_total{op="rate_limit"}`] < 6 {
		t.Errorf("reserved_total: tunnel %v, rate_limit %v; want most CONNECTs decided on reservations",
			m[`pinaka_redis_reserved_total{op="tunnel"}`], m[`pinaka_redis_reserved_total{op="rate_limit"}`])
	}
	waitFor(t, "the spare lease to go back", func() bool { return leases() == 0 })
}
