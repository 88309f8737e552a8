package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// node is one Fleet as a proxy node would hold it, with its own registry
// and log.
type node struct {
	*Fleet
	reg  *prometheus.Registry
	log  *testutil.SyncBuffer
	stop func()
}

func newNode(t *testing.T, url string, o Options) *node {
	t.Helper()
	n := &node{reg: prometheus.NewRegistry(), log: &testutil.SyncBuffer{}}
	o.URL = url
	o.Registry = n.reg
	o.Log = slog.New(slog.NewJSONHandler(n.log, nil))
	if o.Node == "" {
		o.Node = "node"
	}
	if o.RequestsPerMinute == 0 {
		o.RequestsPerMinute = 1 // no refill within a test
	}
	if o.Burst == 0 {
		o.Burst = 10
	}
	if o.MaxTokens == 0 {
		o.MaxTokens = 100
	}
	if o.MaxTunnelsPerToken == 0 {
		o.MaxTunnelsPerToken = 3
	}
	if o.ProbeInterval == 0 {
		o.ProbeInterval = 100 * time.Millisecond
	}
	if o.Timeout == 0 {
		// Generous: the tests stop Redis (refused connections fail at
		// once); a loaded test machine must not look like a slow Redis.
		o.Timeout = 2 * time.Second
	}
	f, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	n.Fleet = f
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx, nil) }()
	var once sync.Once
	n.stop = func() { once.Do(func() { cancel(); <-done; f.Close() }) }
	t.Cleanup(n.stop)
	return n
}

func (n *node) fallbacks(op string) float64 {
	return promtest.ToFloat64(n.m.fallback.WithLabelValues(op))
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func allowed(l interface {
	Allow(string) (bool, time.Duration)
}, tokenID string, n int) int {
	ok := 0
	for i := 0; i < n; i++ {
		if a, _ := l.Allow(tokenID); a {
			ok++
		}
	}
	return ok
}

// Three nodes on one Redis admit one burst between them, where three
// local limiters admit three.
func TestSharedBucketAdmitsOneBurstAcrossThreeNodes(t *testing.T) {
	r := testutil.StartRedis(t)
	nodes := []*node{}
	for i := 0; i < 3; i++ {
		nodes = append(nodes, newNode(t, r.URL(), Options{Node: fmt.Sprint("n", i), Burst: 10, FleetSize: 3}))
	}
	got := 0
	for i := 0; i < 30; i++ {
		if ok, _ := nodes[i%3].Limiter().Allow("tok"); ok {
			got++
		}
	}
	if got != 10 {
		t.Errorf("three nodes sharing a burst of 10 admitted %d of 30", got)
	}
	local := 0
	for i := 0; i < 3; i++ {
		local += allowed(ratelimit.New(1, 10, 100), "tok", 10)
	}
	if local != 30 {
		t.Fatalf("three local limiters admitted %d, want 30 (the comparison is broken)", local)
	}
	// Buckets are per token: another token has its own.
	if ok, _ := nodes[1].Limiter().Allow("other"); !ok {
		t.Error("a second token was refused")
	}
	for _, n := range nodes {
		if f := n.fallbacks("rate_limit"); f != 0 {
			t.Errorf("%v fallback decisions with Redis up", f)
		}
	}
	// The bucket's key expires by itself.
	ttl := redis.NewClient(&redis.Options{Addr: r.Addr}).PTTL(context.Background(), "pinaka:rl:tok").Val()
	if ttl <= 0 {
		t.Errorf("bucket key TTL %v, want a positive expiry", ttl)
	}
}

// A refusal says when to come back, from Redis's clock.
func TestSharedBucketRetryAfter(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{RequestsPerMinute: 60, Burst: 2})
	for i := 0; i < 2; i++ {
		if ok, _ := n.Limiter().Allow("t"); !ok {
			t.Fatalf("request %d refused", i)
		}
	}
	ok, wait := n.Limiter().Allow("t")
	if ok || wait <= 0 || wait > time.Second {
		t.Errorf("third request: ok=%v wait=%v, want refused with 0 < wait <= 1s (one unit a second)", ok, wait)
	}
}

// Redis killed: decisions go on locally (limit / FLEET_SIZE), counted and
// logged once. Redis back: decisions are shared again.
func TestRedisOutageFallsBackAndRecovers(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 9, FleetSize: 3})
	if got := allowed(n.Limiter(), "a", 1); got != 1 {
		t.Fatal("first request refused")
	}
	r.Kill()
	// Local share: 9/3 = 3 units for a token that is new to this node.
	if got := allowed(n.Limiter(), "b", 50); got != 3 {
		t.Errorf("during the outage token b got %d of 50, want 3 (burst 9 / FLEET_SIZE 3)", got)
	}
	if n.Up() {
		t.Error("still up after a failed call")
	}
	if f := n.fallbacks("rate_limit"); f != 50 {
		t.Errorf("fallback_total{op=rate_limit} = %v, want 50", f)
	}
	if up := promtest.ToFloat64(n.m.up); up != 0 {
		t.Errorf("pinaka_redis_up = %v during the outage", up)
	}
	if c := strings.Count(n.log.String(), "deciding limits on this node alone"); c != 1 {
		t.Errorf("outage logged %d times, want once:\n%s", c, n.log.String())
	}

	r.Restart()
	waitFor(t, "back on Redis", n.Up)
	before := n.fallbacks("rate_limit")
	if got := allowed(n.Limiter(), "c", 15); got != 9 {
		t.Errorf("after recovery token c got %d of 15, want the full shared burst 9", got)
	}
	if f := n.fallbacks("rate_limit"); f != before {
		t.Errorf("%v fallback decisions after recovery", f-before)
	}
	if !strings.Contains(n.log.String(), "Redis answers again") {
		t.Error("recovery not logged")
	}
}

// A Redis that stops answering (SIGSTOP: connections open, no replies)
// costs one REDIS_TIMEOUT, then decisions are local until it answers.
func TestSlowRedisFallsBack(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 4, FleetSize: 2, Timeout: 50 * time.Millisecond,
		ProbeInterval: 200 * time.Millisecond})
	if got := allowed(n.Limiter(), "warm", 1); got != 1 {
		t.Fatal("refused with Redis up")
	}
	r.Pause()
	defer r.Resume()
	if got := allowed(n.Limiter(), "t", 10); got != 2 {
		t.Errorf("hung Redis: %d admitted, want 2 (burst 4 / FLEET_SIZE 2)", got)
	}
	if f := n.fallbacks("rate_limit"); f != 10 {
		t.Errorf("fallback_total %v, want 10", f)
	}
	// One call waited for the deadline; the rest did not try Redis.
	if e := promtest.ToFloat64(n.m.errors.WithLabelValues("rate_limit")); e != 1 {
		t.Errorf("%v rate_limit calls failed, want 1 (the rest skip Redis while it is down)", e)
	}
	r.Resume()
	waitFor(t, "back on Redis after it resumed", n.Up)
}

// Unreachable at start: a warning, local decisions, and Redis used once it
// appears.
func TestUnreachableAtStartWarnsAndRecovers(t *testing.T) {
	r := testutil.StartRedis(t)
	r.Kill()
	n := newNode(t, r.URL(), Options{Burst: 4, FleetSize: 2})
	if n.Up() {
		t.Fatal("up without a Redis")
	}
	if !strings.Contains(n.log.String(), "REDIS_URL unreachable at start") {
		t.Errorf("no start-up warning:\n%s", n.log.String())
	}
	if got := allowed(n.Limiter(), "t", 10); got != 2 {
		t.Errorf("got %d, want 2 (burst 4 / FLEET_SIZE 2)", got)
	}
	// Its revocation subscriber connects once Redis appears too.
	got := make(chan []RevocationMessage, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Revocations().Run(ctx, func(ms []RevocationMessage) { got <- ms }) }()
	defer func() { cancel(); <-done }()

	r.Restart()
	waitFor(t, "Redis used once it appears", n.Up)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	waitFor(t, "the subscriber connected", func() bool {
		return c.PubSubNumSub(context.Background(), "pinaka:revocations").Val()["pinaka:revocations"] == 1
	})
	c.Publish(context.Background(), "pinaka:revocations", "late")
	if ms := <-got; len(ms) != 1 || ms[0] != (RevocationMessage{TokenID: "late"}) {
		t.Errorf("got %+v", ms)
	}
}

func TestMalformedURL(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:6379", "redis://:s3cret@127.0.0.1:6379/notadb", "redis://:s3cret@[::1"} {
		_, err := New(Options{URL: u, RequestsPerMinute: 1, Burst: 1, MaxTokens: 1, MaxTunnelsPerToken: 1})
		if err == nil || !strings.Contains(err.Error(), "REDIS_URL") {
			t.Errorf("%q: %v, want an error naming REDIS_URL", u, err)
		} else if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%q: the error shows the password: %v", u, err)
		}
	}
}

// MAX_TUNNELS_PER_TOKEN holds across nodes; a released slot is free for
// any node.
func TestTunnelCapAcrossNodes(t *testing.T) {
	r := testutil.StartRedis(t)
	a := newNode(t, r.URL(), Options{Node: "a", MaxTunnelsPerToken: 3})
	b := newNode(t, r.URL(), Options{Node: "b", MaxTunnelsPerToken: 3})
	relA1, ok1 := a.Tunnels().Acquire("t")
	_, ok2 := a.Tunnels().Acquire("t")
	_, ok3 := b.Tunnels().Acquire("t")
	if !ok1 || !ok2 || !ok3 {
		t.Fatal("a tunnel under the cap was refused")
	}
	if _, ok := b.Tunnels().Acquire("t"); ok {
		t.Fatal("fourth tunnel across two nodes admitted with a cap of 3")
	}
	if _, ok := a.Tunnels().Acquire("t"); ok {
		t.Fatal("fourth tunnel admitted on the other node")
	}
	if _, ok := b.Tunnels().Acquire("other"); !ok {
		t.Fatal("another token refused")
	}
	relA1()
	relA1() // twice releases once
	if _, ok := b.Tunnels().Acquire("t"); !ok {
		t.Fatal("slot released on a not reusable on b")
	}
	if _, ok := b.Tunnels().Acquire("t"); ok {
		t.Fatal("double release freed two slots")
	}
	if f := a.fallbacks("tunnel") + b.fallbacks("tunnel"); f != 0 {
		t.Errorf("%v tunnel fallbacks with Redis up", f)
	}
}

// Leases outlive their TTL while their node renews them, and expire when
// it stops (a dead node).
func TestTunnelLeasesRenewedThenExpire(t *testing.T) {
	r := testutil.StartRedis(t)
	ttl := 3 * time.Second
	a := newNode(t, r.URL(), Options{Node: "a", MaxTunnelsPerToken: 2, LeaseTTL: ttl})
	b := newNode(t, r.URL(), Options{Node: "b", MaxTunnelsPerToken: 2, LeaseTTL: ttl})
	for i := 0; i < 2; i++ {
		if _, ok := a.Tunnels().Acquire("t"); !ok {
			t.Fatal("refused under the cap")
		}
	}
	time.Sleep(ttl + ttl/2) // longer than a lease: only renewal keeps them
	if _, ok := b.Tunnels().Acquire("t"); ok {
		t.Fatal("a's renewed leases were lost after one TTL")
	}
	a.stop() // a dies without releasing: its leases are no longer renewed
	if _, ok := b.Tunnels().Acquire("t"); ok {
		t.Fatal("a's leases vanished before expiring")
	}
	waitFor(t, "a's leases to expire", func() bool {
		rel, ok := b.Tunnels().Acquire("t")
		if ok {
			rel()
		}
		return ok
	})
	// The key itself expires too once no lease is live.
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	if ttl := c.PTTL(context.Background(), "pinaka:tunnels:t").Val(); ttl <= 0 && ttl != -2*time.Nanosecond {
		t.Errorf("lease key PTTL %v, want an expiry or no key", ttl)
	}
}

// Redis away: the tunnel cap is decided on the node's own tunnels against
// its share; tunnels opened meanwhile join the shared count when Redis is
// back.
func TestTunnelFallbackAndRejoin(t *testing.T) {
	r := testutil.StartRedis(t)
	a := newNode(t, r.URL(), Options{Node: "a", MaxTunnelsPerToken: 4, FleetSize: 2})
	b := newNode(t, r.URL(), Options{Node: "b", MaxTunnelsPerToken: 4, FleetSize: 2})
	r.Kill()
	got := 0
	for i := 0; i < 5; i++ {
		if _, ok := a.Tunnels().Acquire("t"); ok {
			got++
		}
	}
	if got != 2 {
		t.Errorf("during the outage a admitted %d tunnels, want 2 (4 / FLEET_SIZE 2)", got)
	}
	if f := a.fallbacks("tunnel"); f != 5 {
		t.Errorf("fallback_total{op=tunnel} = %v, want 5", f)
	}
	r.Restart()
	waitFor(t, "a back on Redis", a.Up)
	// a's two tunnels are renewed into the empty Redis: b may open two more, not four.
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	waitFor(t, "a's tunnels counted in Redis", func() bool {
		return c.ZCard(context.Background(), "pinaka:tunnels:t").Val() == 2
	})
	got = 0
	for i := 0; i < 4; i++ {
		if _, ok := b.Tunnels().Acquire("t"); ok {
			got++
		}
	}
	if got != 2 {
		t.Errorf("after recovery b admitted %d, want 2 (cap 4, a holds 2)", got)
	}
}

// A revocation published on one node reaches the subscribers on two
// others, in order, with its end or as a withdrawal; a bare token id (what
// redis-cli sends by hand) is a revocation with no end; what is not a
// valid message is dropped and counted.
func TestRevocationFanOut(t *testing.T) {
	r := testutil.StartRedis(t)
	type got struct {
		mu sync.Mutex
		ms []RevocationMessage
	}
	subscribe := func() (*Fleet, *got) {
		f, err := New(Options{URL: r.URL(), RequestsPerMinute: 1, Burst: 1, MaxTokens: 1, MaxTunnelsPerToken: 1, Registry: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		g := &got{}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			f.Run(ctx, func(ms []RevocationMessage) { g.mu.Lock(); g.ms = append(g.ms, ms...); g.mu.Unlock() })
		}()
		t.Cleanup(func() { cancel(); <-done; f.Close() })
		return f, g
	}
	f1, g1 := subscribe()
	_, g2 := subscribe()
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	waitFor(t, "two subscribers", func() bool {
		return c.PubSubNumSub(context.Background(), "pinaka:revocations").Val()["pinaka:revocations"] == 2
	})
	pub := NewRevocations(c, "pinaka:", nil, nil)
	ctx := context.Background()
	for _, bad := range []RevocationMessage{{TokenID: "bad\x00id"}, {}, {TokenID: "a", Remove: true, Until: time.Now().Add(time.Hour)}} {
		if _, err := pub.Publish(ctx, bad); err == nil {
			t.Errorf("published an invalid message %+v", bad)
		}
	}
	// Another publisher's junk.
	for _, junk := range []string{"bad\x01id", "{not json", `{"token_id":""}`, `{"token_id":"x","until":"soon"}`,
		`{"token_id":"x","remove":true,"until":"2030-01-01T00:00:00Z"}`, strings.Repeat("x", 2000)} {
		c.Publish(ctx, "pinaka:revocations", junk)
	}
	until := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	want := []RevocationMessage{{TokenID: "session_42"}, {TokenID: "s_until", Until: until}, {TokenID: "session_42", Remove: true}, {TokenID: "plain-id"}}
	for _, m := range want[:3] {
		n, err := pub.Publish(ctx, m)
		if err != nil || n != 2 {
			t.Fatalf("publish %+v: %d receivers, %v", m, n, err)
		}
	}
	c.Publish(ctx, "pinaka:revocations", "plain-id")
	for i, g := range []*got{g1, g2} {
		waitFor(t, fmt.Sprint("delivery to subscriber ", i+1), func() bool {
			g.mu.Lock()
			defer g.mu.Unlock()
			return len(g.ms) >= len(want)
		})
		g.mu.Lock()
		if len(g.ms) != len(want) {
			t.Errorf("subscriber %d got %+v", i+1, g.ms)
		} else {
			for j := range want {
				if g.ms[j].TokenID != want[j].TokenID || !g.ms[j].Until.Equal(want[j].Until) || g.ms[j].Remove != want[j].Remove {
					t.Errorf("subscriber %d message %d: %+v, want %+v", i+1, j, g.ms[j], want[j])
				}
			}
		}
		g.mu.Unlock()
	}
	if v := promtest.ToFloat64(f1.m.revoked.WithLabelValues("invalid")); v != 6 {
		t.Errorf("invalid messages counted %v, want 6", v)
	}
}

func BenchmarkAllow(b *testing.B) {
	b.Run("local", func(b *testing.B) {
		l := ratelimit.New(1<<30, 1<<30, 1000)
		b.ReportAllocs()
		for b.Loop() {
			l.Allow("bench-token")
		}
	})
	b.Run("redis", func(b *testing.B) {
		r := testutil.StartRedis(b)
		f, err := New(Options{URL: r.URL(), RequestsPerMinute: 1 << 30, Burst: 1 << 30, MaxTokens: 1000,
			MaxTunnelsPerToken: 1, Timeout: time.Second, Registry: prometheus.NewRegistry()})
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		l := f.Limiter()
		l.Allow("bench-token") // loads the script
		b.ReportAllocs()
		cpu := startCPU(b, r)
		for b.Loop() {
			if ok, _ := l.Allow("bench-token"); !ok {
				b.Fatal("refused")
			}
		}
		cpu.report(b)
		if !f.Up() {
			b.Fatal("fell back during the benchmark")
		}
	})
	// The floor: one round trip to the same server, no script.
	b.Run("redis-ping", func(b *testing.B) {
		r := testutil.StartRedis(b)
		c, err := NewClient(r.URL())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		ctx := context.Background()
		b.ReportAllocs()
		for b.Loop() {
			if err := c.Ping(ctx).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("redis-parallel", func(b *testing.B) {
		r := testutil.StartRedis(b)
		f, err := New(Options{URL: r.URL(), RequestsPerMinute: 1 << 30, Burst: 1 << 30, MaxTokens: 1000,
			MaxTunnelsPerToken: 1, Timeout: time.Second, Registry: prometheus.NewRegistry()})
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		l := f.Limiter()
		l.Allow("bench-token")
		b.ReportAllocs()
		cpu := startCPU(b, r)
		b.SetParallelism(16) // requests in flight at once, as on a busy node
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.Allow("bench-token")
			}
		})
		cpu.report(b)
		if !f.Up() {
			b.Fatal("fell back during the benchmark")
		}
	})
}
