package fleet

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// untilRefused calls Allow on l until it refuses and returns the number
// admitted.
func untilRefused(t *testing.T, l *Limiter, tokenID string) int {
	t.Helper()
	for n := 0; ; n++ {
		if ok, _ := l.Allow(tokenID); !ok {
			return n
		}
		if n > 100000 {
			t.Fatal("never refused")
		}
	}
}

// reserveSome makes n's requests of tokenID until it holds at least 16
// reserved units, and returns how many it admitted and holds.
func reserveSome(t *testing.T, n *node, tokenID string) (admitted, left int) {
	t.Helper()
	for left < 16 && admitted < 200 {
		if ok, _ := n.Limiter().Allow(tokenID); !ok {
			t.Fatal("refused under the burst")
		}
		admitted++
		a, _ := n.limiter.reserved.Peek(tokenID)
		a.mu.Lock()
		left = a.units
		a.mu.Unlock()
	}
	if left < 16 {
		t.Fatalf("the node holds %d units, want at least 16 for this test", left)
	}
	return admitted, left
}

// Units a node reserved and did not use go back with its next call if no
// other call changed the bucket since. Given back after the bucket has
// refilled (time paid for them) and another node has emptied it, they
// would be units the bucket never had: from a full bucket the fleet
// admits at most the burst plus what refills meanwhile.
func TestRefunds(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()

	// One node, no refill: its unused units come back, the token gets
	// exactly its burst.
	one := newNode(t, r.URL(), Options{Node: "one", Burst: 200, Prefix: "one:"})
	admitted, _ := reserveSome(t, one, "tok")
	time.Sleep(reserveFor)
	if admitted += untilRefused(t, one.Limiter(), "tok"); admitted != 200 {
		t.Errorf("one node admitted %d, want exactly the burst 200 (its unused units refunded)", admitted)
	}

	const burst, rpm = 200, 6000 // a unit every 10 ms
	interval := time.Minute / rpm
	o := Options{Burst: burst, RequestsPerMinute: rpm, FleetSize: 2}
	o.Node = "a"
	a := newNode(t, r.URL(), o)
	o.Node = "b"
	b := newNode(t, r.URL(), o)
	_, left := reserveSome(t, a, "tok")
	// The key expires when the bucket is full again: everything taken so
	// far, a's unused units included, is paid for by time.
	waitFor(t, "the bucket to refill", func() bool { return c.Exists(context.Background(), "pinaka:rl:tok").Val() == 0 })
	time.Sleep(reserveFor) // a's units are no longer a's to use

	start := time.Now()
	admitted = untilRefused(t, b.Limiter(), "tok")
	admitted += untilRefused(t, a.Limiter(), "tok") // a's call gives its units back
	limit := burst + int(time.Since(start)/interval) + 1
	if admitted > limit {
		t.Errorf("from a full bucket, %d admitted, at most %d allowed (burst %d + refill); a held %d units", admitted, limit, burst, left)
	}
}

// panicOnce makes the client panic on its next EVALSHA once armed: a bug
// in the Redis client must not leave the token's later requests waiting
// for a call that will never end, nor a lease renewed with no tunnel.
type panicOnce struct{ armed atomic.Bool }

func (h *panicOnce) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *panicOnce) check(cmds ...redis.Cmder) {
	for _, c := range cmds {
		if c.Name() == "evalsha" && h.armed.CompareAndSwap(true, false) {
			panic("client bug")
		}
	}
}
func (h *panicOnce) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.check(cmd); return next(ctx, cmd) }
}
func (h *panicOnce) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.check(cmds...); return next(ctx, cmds) }
}

// recovered runs f and reports whether it panicked.
func recovered(f func()) (panicked bool) {
	defer func() { panicked = recover() != nil }()
	f()
	return false
}

func TestClientPanicLeavesNothingWaiting(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 100, MaxTunnelsPerToken: 100})
	h := &panicOnce{}
	n.client.AddHook(h)

	h.armed.Store(true)
	if !recovered(func() { n.Limiter().Allow("tok") }) {
		t.Fatal("the hook did not panic")
	}
	if admitted := collect(t, decide(n.Limiter(), "tok", 1), 1); admitted != 1 {
		t.Error("the request after the panic was refused")
	}

	// A CONNECT on a spare lease whose rate-limit call panics gives the
	// lease back.
	ok, _, release, slotOK := n.AdmitTunnel("conn")
	if !ok || !slotOK {
		t.Fatal("CONNECT refused")
	}
	release() // kept as a spare
	h.armed.Store(true)
	if !recovered(func() { n.AdmitTunnel("conn") }) {
		t.Fatal("the hook did not panic")
	}
	n.tunnels.mu.Lock()
	live := len(n.tunnels.live)
	n.tunnels.mu.Unlock()
	if live != 0 {
		t.Errorf("%d leases held (renewed) with no tunnel open and no spare, want 0", live)
	}
}

// Several nodes open and close tunnels of one token at once, CONNECTs and
// upgrades, some refused by the rate limit: the open tunnels never exceed
// the cap, the leases in Redis never exceed it, and once the nodes stop
// no lease is left.
func TestSparesUnderConcurrentChurn(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	const limit = 40
	var nodes []*node
	for i := range 3 {
		nodes = append(nodes, newNode(t, r.URL(), Options{Node: fmt.Sprint("n", i), FleetSize: 3,
			MaxTunnelsPerToken: limit, Burst: 3000, RequestsPerMinute: 600000}))
	}
	var open, most atomic.Int64
	stop := make(chan struct{})
	var maxLeases atomic.Int64
	var watch sync.WaitGroup
	watch.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			storeMax(&maxLeases, c.ZCard(ctx, "pinaka:tunnels:tok").Val())
		}
	})
	churn(nodes, &open, &most)
	close(stop)
	watch.Wait()
	if m := most.Load(); m > limit {
		t.Errorf("%d tunnels open at once, cap %d", m, limit)
	}
	if m := maxLeases.Load(); m > limit {
		t.Errorf("%d leases in Redis at once, cap %d", m, limit)
	}
	var reserved float64
	for _, n := range nodes {
		reserved += promtest.ToFloat64(n.m.reserved.WithLabelValues("tunnel"))
	}
	if reserved == 0 {
		t.Error("no tunnel opened on a spare lease: spares are not tested")
	}
	for _, n := range nodes {
		n.stop()
	}
	if got := c.ZCard(ctx, "pinaka:tunnels:tok").Val(); got != 0 {
		t.Errorf("%d leases left after every tunnel closed and every node stopped", got)
	}
}

// churn opens and closes tunnels of one token from 12 goroutines spread
// over nodes, CONNECTs (Admit) and upgrades (Acquire) in turn, keeping a
// few open each; open counts the tunnels open, most the most at once.
func churn(nodes []*node, open, most *atomic.Int64) {
	var wg sync.WaitGroup
	for g := range 12 {
		wg.Go(func() {
			n := nodes[g%3]
			var held []func()
			for i := range 300 {
				var rel func()
				var ok bool
				if (g+i)%2 == 0 {
					var admitted bool
					admitted, _, rel, ok = n.AdmitTunnel("tok")
					ok = ok && admitted
				} else {
					rel, ok = n.Tunnels().Acquire("tok")
				}
				if ok {
					storeMax(most, open.Add(1))
					held = append(held, rel)
				}
				if len(held) > 3 || (i%7 == 0 && len(held) > 0) {
					open.Add(-1)
					held[0]()
					held = held[1:]
				}
			}
			for _, rel := range held {
				open.Add(-1)
				rel()
			}
		})
	}
	wg.Wait()
}

// Redis dies and comes back, empty, while tunnels open and close: once
// they are all closed, every lease goes (given back, swept, or expired
// within its TTL), none is renewed forever.
func TestSparesLeaveNothingAfterAnOutage(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	var nodes []*node
	for i := range 3 {
		nodes = append(nodes, newNode(t, r.URL(), Options{Node: fmt.Sprint("n", i), FleetSize: 3,
			MaxTunnelsPerToken: 40, Burst: 3000, RequestsPerMinute: 600000, LeaseTTL: 1500 * time.Millisecond}))
	}
	var open, most atomic.Int64
	var stop atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			churn(nodes, &open, &most)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	r.Kill()
	time.Sleep(300 * time.Millisecond)
	r.Restart()
	waitFor(t, "the nodes to use Redis again", func() bool { return nodes[0].Up() && nodes[1].Up() && nodes[2].Up() })
	time.Sleep(200 * time.Millisecond)
	stop.Store(true)
	<-done
	if open.Load() != 0 {
		t.Fatal("tunnels left open")
	}
	var local, spare float64
	for _, n := range nodes {
		local += n.fallbacks("tunnel")
		spare += promtest.ToFloat64(n.m.reserved.WithLabelValues("tunnel"))
	}
	if local == 0 || spare == 0 {
		t.Fatalf("%v tunnels decided locally, %v on spares: the outage or the spares are not tested", local, spare)
	}
	waitFor(t, "every lease to go", func() bool {
		for _, n := range nodes {
			n.tunnels.mu.Lock()
			live := len(n.tunnels.live)
			n.tunnels.mu.Unlock()
			if live != 0 || !n.Up() {
				return false
			}
		}
		return c.Exists(context.Background(), "pinaka:tunnels:tok").Val() == 0
	})
}

func storeMax(m *atomic.Int64, v int64) {
	for {
		old := m.Load()
		if v <= old || m.CompareAndSwap(old, v) {
			return
		}
	}
}

// The scripts' arithmetic at the edges of the configuration: the smallest
// bucket and rate, the largest limits RATE_LIMIT_* accept, the largest
// FLEET_SIZE. Two nodes share each bucket; requests and CONNECTs alternate.
func TestBucketEdges(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	for i, tc := range []struct{ burst, rpm, fleet, requests, want int }{
		{1, 1, 1, 6, 1},
		{1, 1, 10000, 6, 1},
		{3, 1, 2, 12, 3},
		{100, 1, 1, 300, 100},
		{100, 1, 10000, 300, 100},
		{1 << 30, 1, 10000, 2000, 2000},
		{1 << 30, 1 << 30, 3, 2000, 2000},
		{1, 1 << 30, 1, 2000, 2000}, // refills faster than any request
	} {
		o := Options{Burst: tc.burst, RequestsPerMinute: tc.rpm, FleetSize: tc.fleet,
			MaxTunnelsPerToken: 1 << 30, Prefix: fmt.Sprint("e", i, ":")}
		o.Node = "a"
		a := newNode(t, r.URL(), o)
		o.Node = "b"
		b := newNode(t, r.URL(), o)
		admitted := 0
		for j := range tc.requests {
			n := []*node{a, b}[j/5%2]
			ok, wait := false, time.Duration(0)
			if j%3 == 2 {
				var rel func()
				ok, wait, rel, _ = n.AdmitTunnel("tok")
				rel()
			} else {
				ok, wait = n.Limiter().Allow("tok")
			}
			if ok {
				admitted++
			} else if wait <= 0 || wait > time.Duration(60e9/float64(tc.rpm))+time.Second {
				t.Errorf("%+v: refused with Retry-After %v", tc, wait)
			}
		}
		if admitted != tc.want {
			t.Errorf("%+v: admitted %d, want %d", tc, admitted, tc.want)
		}
		if f := a.fallbacks("rate_limit") + b.fallbacks("rate_limit"); f != 0 {
			t.Errorf("%+v: %v fallback decisions (a script failed)", tc, f)
		}
		if ttl := c.PTTL(context.Background(), o.Prefix+"rl:tok").Val(); ttl == -1 {
			t.Errorf("%+v: bucket key without expiry", tc)
		}
		a.stop()
		b.stop()
	}
}

// Requests and CONNECTs of one token on three nodes at once, with other
// tokens evicting its units from the nodes' LRUs and a pause that sends
// every reservation's leftovers back: the fleet never admits more than
// the burst (no refill within the test), and every request returns.
func TestConcurrentNodesNeverExceedTheBucket(t *testing.T) {
	r := testutil.StartRedis(t)
	const burst = 300
	var nodes []*node
	for i := range 3 {
		nodes = append(nodes, newNode(t, r.URL(), Options{Node: fmt.Sprint("n", i), FleetSize: 3,
			Burst: burst, MaxTokens: 2, MaxTunnelsPerToken: 1 << 20}))
	}
	var admitted atomic.Int64
	hammer := func(phase int) {
		var wg sync.WaitGroup
		for g := range 12 {
			wg.Go(func() {
				n := nodes[g%3]
				for i := range 150 {
					if i%4 == 3 { // another token: may evict tok's units
						n.Limiter().Allow(fmt.Sprint("x", phase, g, i))
						continue
					}
					ok := false
					if (g+i)%3 == 0 {
						var rel func()
						ok, _, rel, _ = n.AdmitTunnel("tok")
						rel()
					} else {
						ok, _ = n.Limiter().Allow("tok")
					}
					if ok {
						admitted.Add(1)
					}
				}
			})
		}
		wg.Wait()
	}
	hammer(0)
	time.Sleep(reserveFor) // leftovers go back with the next calls
	hammer(1)
	if got := admitted.Load(); got > burst {
		t.Errorf("%d admitted by three nodes with a shared burst of %d", got, burst)
	}
	for _, n := range nodes {
		if f := n.fallbacks("rate_limit"); f != 0 {
			t.Errorf("%v fallback decisions with Redis up", f)
		}
	}
}
