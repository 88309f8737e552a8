package fleet

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// pipelineSizes records the size of every pipeline the client sends.
type pipelineSizes struct {
	mu    sync.Mutex
	sizes []int
}

func (h *pipelineSizes) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *pipelineSizes) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return next
}
func (h *pipelineSizes) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.mu.Lock()
		h.sizes = append(h.sizes, len(cmds))
		h.mu.Unlock()
		return next(ctx, cmds)
	}
}

func (h *pipelineSizes) largest() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := 0
	for _, s := range h.sizes {
		m = max(m, s)
	}
	return m
}

func (b *batcher) state() (busy bool, queued int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.busy, len(b.queue)
}

// decide runs n Allow calls of tokenID at once and returns their answers
// on a channel, as they come.
func decide(l *Limiter, tokenID string, n int) <-chan bool {
	out := make(chan bool, n)
	for range n {
		go func() {
			ok, _ := l.Allow(tokenID)
			out <- ok
		}()
	}
	return out
}

// decideEach runs one Allow call for each of the tokens prefix0 … prefixN-1
// at once: calls of one token wait for that token's call in flight
// (Limiter.Allow), so it takes distinct tokens to fill a pipeline.
func decideEach(l *Limiter, prefix string, n int) <-chan bool {
	out := make(chan bool, n)
	for i := range n {
		go func() {
			ok, _ := l.Allow(fmt.Sprint(prefix, i))
			out <- ok
		}()
	}
	return out
}

func collect(t *testing.T, ch <-chan bool, n int) (admitted int) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for range n {
		select {
		case ok := <-ch:
			if ok {
				admitted++
			}
		case <-timeout:
			t.Fatal("a decision never returned")
		}
	}
	return admitted
}

// holdFirst pauses Redis and starts one call, which waits in flight; the
// calls started after it queue behind it. Resume Redis to let them go.
func holdFirst(t *testing.T, r *testutil.Redis, n *node, tokenID string) <-chan bool {
	t.Helper()
	r.Pause()
	t.Cleanup(r.Resume)
	first := decide(n.Limiter(), tokenID, 1)
	waitFor(t, "the first call in flight", func() bool { busy, _ := n.batch.state(); return busy })
	return first
}

// Calls made while one is in flight leave together in one pipeline, and
// each is still its own decision: of 20 tokens with a burst of 1, the 10
// that spent their unit before are refused.
func TestConcurrentDecisionsShareOnePipeline(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 1, Timeout: 30 * time.Second})
	for i := range 10 { // the script is loaded; t0…t9 spend their unit
		if got := allowed(n.Limiter(), fmt.Sprint("t", i), 1); got != 1 {
			t.Fatal("refused with Redis up")
		}
	}
	sizes := &pipelineSizes{}
	n.client.AddHook(sizes)

	first := holdFirst(t, r, n, "tok")
	rest := decideEach(n.Limiter(), "t", 20)
	waitFor(t, "20 calls queued", func() bool { _, q := n.batch.state(); return q == 20 })
	r.Resume()
	admitted := collect(t, first, 1) + collect(t, rest, 20)
	if admitted != 11 {
		t.Errorf("%d of 21 concurrent decisions admitted, want 11 (tok and t10…t19)", admitted)
	}
	if s := sizes.largest(); s != 20 {
		t.Errorf("largest pipeline %d commands, want the 20 queued calls in one", s)
	}
	if f := n.fallbacks("rate_limit"); f != 0 {
		t.Errorf("%v fallback decisions with Redis up", f)
	}
	if busy, q := n.batch.state(); busy || q != 0 {
		t.Errorf("after the calls: busy=%v queued=%d, want idle", busy, q)
	}
}

// Concurrent requests of one token wait for its call in flight instead of
// each sending one, and still take exactly the burst.
func TestOneTokensDecisionsWaitForItsCall(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 10, Timeout: 30 * time.Second})
	if got := allowed(n.Limiter(), "warm", 1); got != 1 {
		t.Fatal("refused with Redis up")
	}
	first := holdFirst(t, r, n, "tok")
	rest := decide(n.Limiter(), "tok", 20)
	time.Sleep(50 * time.Millisecond) // let them reach the wait
	if _, q := n.batch.state(); q != 0 {
		t.Errorf("%d calls of one token queued behind its call in flight, want 0", q)
	}
	r.Resume()
	if admitted := collect(t, first, 1) + collect(t, rest, 20); admitted != 10 {
		t.Errorf("%d of 21 admitted with a burst of 10, want 10", admitted)
	}
	if f := n.fallbacks("rate_limit"); f != 0 {
		t.Errorf("%v fallback decisions with Redis up", f)
	}
}

// A Redis that never answers: every call returns, in flight or queued,
// with a local decision (none waits longer than REDIS_TIMEOUT for its
// batch), counted as fallbacks.
func TestQueuedCallsFallBackWhenRedisHangs(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 10, Timeout: 200 * time.Millisecond, ProbeInterval: time.Hour})
	if got := allowed(n.Limiter(), "warm", 1); got != 1 {
		t.Fatal("refused with Redis up")
	}
	r.Pause()
	defer r.Resume()
	if got := collect(t, decide(n.Limiter(), "tok", 21), 21); got != 10 {
		t.Errorf("%d of 21 admitted on local state, want 10 (burst 10, FLEET_SIZE 1)", got)
	}
	if f := n.fallbacks("rate_limit"); f != 21 {
		t.Errorf("fallback_total %v, want 21", f)
	}
	if n.Up() {
		t.Error("still up with Redis hung")
	}
}

// The queue is bounded: with one call stuck in flight, at most maxQueued
// wait; the calls beyond decide locally at once.
func TestQueueIsBounded(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 1000, MaxTokens: 2 * maxQueued, Timeout: 30 * time.Second, ProbeInterval: time.Hour})
	if got := allowed(n.Limiter(), "warm", 1); got != 1 {
		t.Fatal("refused with Redis up")
	}
	first := holdFirst(t, r, n, "tok")
	queued := decideEach(n.Limiter(), "q", maxQueued)
	waitFor(t, "the queue full", func() bool { _, q := n.batch.state(); return q == maxQueued })
	over := decideEach(n.Limiter(), "over", 5)
	// Redis is still paused: these can only return by deciding locally.
	if got := collect(t, over, 5); got != 5 {
		t.Errorf("%d of 5 calls beyond the queue admitted locally, want 5", got)
	}
	if _, q := n.batch.state(); q != maxQueued {
		t.Errorf("queue %d, want %d", q, maxQueued)
	}
	if f := n.fallbacks("rate_limit"); f != 5 {
		t.Errorf("fallback_total %v while the queue is full, want 5", f)
	}
	r.Resume()
	collect(t, first, 1)
	collect(t, queued, maxQueued)
	if busy, q := n.batch.state(); busy || q != 0 {
		t.Errorf("after the calls: busy=%v queued=%d, want idle", busy, q)
	}
}

// Redis forgot the scripts (a restart, SCRIPT FLUSH): a pipeline of
// EVALSHA comes back NOSCRIPT and is sent again as EVAL, still decided by
// Redis.
func TestPipelineReloadsScripts(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 1, Timeout: 30 * time.Second})
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	for _, tok := range []string{"warm", "a0"} { // a0 spends its unit
		if got := allowed(n.Limiter(), tok, 1); got != 1 {
			t.Fatal("refused with Redis up")
		}
	}
	c.ScriptFlush(context.Background())
	first := holdFirst(t, r, n, "tok")
	rest := decideEach(n.Limiter(), "a", 5)
	waitFor(t, "5 calls queued", func() bool { _, q := n.batch.state(); return q == 5 })
	r.Resume()
	if got := collect(t, first, 1) + collect(t, rest, 5); got != 5 {
		t.Errorf("%d of 6 admitted with a burst of 1 (a0 spent), want 5", got)
	}
	if f := n.fallbacks("rate_limit"); f != 0 {
		t.Errorf("%v fallback decisions: NOSCRIPT was not retried as EVAL", f)
	}
}

// A CONNECT's rate limit and tunnel lease are one script call: the
// outcomes of Allow then Acquire, in one round trip.
func TestAdmitTunnelOneCall(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 4, MaxTunnelsPerToken: 2})
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	if ok, _, rel, slot := n.AdmitTunnel("warm"); !ok || !slot {
		t.Fatal("refused with Redis up")
	} else {
		rel()
	}
	c.ConfigResetStat(ctx)

	var releases []func()
	for i := range 2 {
		ok, _, rel, slot := n.AdmitTunnel("tok")
		if !ok || !slot {
			t.Fatalf("tunnel %d under both limits: ok=%v slot=%v", i+1, ok, slot)
		}
		releases = append(releases, rel)
	}
	// At the cap: admitted by the rate limit (its unit is spent), no slot.
	for i := range 2 {
		if ok, _, _, slot := n.AdmitTunnel("tok"); !ok || slot {
			t.Fatalf("tunnel %d over the cap: ok=%v slot=%v, want ok without a slot", i+3, ok, slot)
		}
	}
	// Four units spent: rate-limited, with a time to come back, no lease.
	if ok, wait, _, _ := n.AdmitTunnel("tok"); ok || wait <= 0 {
		t.Fatalf("fifth CONNECT with a burst of 4: ok=%v wait=%v, want refused with a wait", ok, wait)
	}
	if got := c.ZCard(ctx, "pinaka:tunnels:tok").Val(); got != 2 {
		t.Errorf("%d leases, want 2", got)
	}
	if got := n.Tunnels().Count("tok"); got != 2 {
		t.Errorf("%d tunnels counted on the node, want 2", got)
	}
	stats := c.Info(ctx, "commandstats").Val()
	if !strings.Contains(stats, "cmdstat_evalsha:calls=5,") {
		t.Errorf("want one EVALSHA per CONNECT (5), commandstats:\n%s", stats)
	}
	releases[0]()
	if got := c.ZCard(ctx, "pinaka:tunnels:tok").Val(); got != 1 {
		t.Errorf("%d leases after a release, want 1", got)
	}
	if f := n.fallbacks("rate_limit") + n.fallbacks("tunnel"); f != 0 {
		t.Errorf("%v fallback decisions with Redis up", f)
	}

	// Redis gone: both decisions on local state, both counted.
	r.Kill()
	if ok, _, _, slot := n.AdmitTunnel("new"); !ok || !slot {
		t.Errorf("local decision: ok=%v slot=%v, want a tunnel", ok, slot)
	}
	if f1, f2 := n.fallbacks("rate_limit"), n.fallbacks("tunnel"); f1 != 1 || f2 != 1 {
		t.Errorf("fallbacks rate_limit=%v tunnel=%v, want 1 and 1", f1, f2)
	}
}

// The client speaks RESP2 unless the URL asks for a protocol.
func TestClientProtocol(t *testing.T) {
	for u, want := range map[string]int{"redis://127.0.0.1:1/0": 2, "redis://127.0.0.1:1/0?protocol=3": 3} {
		c, err := NewClient(u)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Options().Protocol; got != want {
			t.Errorf("%s: protocol %d, want %d", u, got, want)
		}
		c.Close()
	}
}

// A tunnel's release in flight does not hold up the next decision: they
// go in separate lanes, each sent at once.
func TestReleaseDoesNotHoldUpDecisions(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Timeout: 30 * time.Second})
	release, ok := n.Tunnels().Acquire("tok")
	if !ok {
		t.Fatal("refused with Redis up")
	}
	r.Pause()
	t.Cleanup(r.Resume)
	released := make(chan struct{})
	go func() { release(); close(released) }()
	waitFor(t, "the release in flight", func() bool { busy, _ := n.releases.state(); return busy })
	decided := decide(n.Limiter(), "tok", 1)
	waitFor(t, "the decision in flight", func() bool { busy, _ := n.batch.state(); return busy })
	if _, q := n.batch.state(); q != 0 {
		t.Errorf("the decision queued behind the release")
	}
	r.Resume()
	<-released
	if collect(t, decided, 1) != 1 {
		t.Error("refused")
	}
}
