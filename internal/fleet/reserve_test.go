package fleet

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// scriptCalls is how many EVALSHA Redis ran since its stats were reset.
func scriptCalls(t *testing.T, c *redis.Client) int {
	t.Helper()
	for _, l := range strings.Split(c.Info(context.Background(), "commandstats").Val(), "\r\n") {
		if v, ok := strings.CutPrefix(l, "cmdstat_evalsha:calls="); ok {
			var n int
			fmt.Sscanf(v, "%d", &n)
			return n
		}
	}
	return 0
}

// Busy tokens take their units several at a time, and the fleet still
// admits the bucket: never more (every unit comes from the shared
// bucket), and no fewer than the bucket less the units nodes reserved and
// did not use (those go back only to a bucket no other call changed
// since: TestRefunds).
func TestReservedUnitsAdmitExactlyTheBucket(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	const burst = 600
	var nodes []*node
	for i := range 3 {
		nodes = append(nodes, newNode(t, r.URL(), Options{Node: fmt.Sprint("n", i), Burst: burst, FleetSize: 3}))
	}
	c.ConfigResetStat(context.Background())

	// Phase 1: 450 requests, each node taking bursts of ten in a row, as
	// one client's connection to one node would.
	admitted := 0
	for i := range 450 {
		if ok, _ := nodes[(i/10)%3].Limiter().Allow("busy"); ok {
			admitted++
		}
	}
	if admitted != 450 {
		t.Fatalf("admitted %d of 450 with a shared burst of %d", admitted, burst)
	}
	calls := scriptCalls(t, c)
	if calls >= 450/3 {
		t.Errorf("%d script calls for 450 requests, want far fewer (units reserved ahead)", calls)
	}
	left := 0
	for _, n := range nodes {
		if a, ok := n.limiter.reserved.Peek("busy"); ok {
			a.mu.Lock()
			left += a.units
			a.mu.Unlock()
		}
	}
	if left == 0 {
		t.Error("no node holds reserved units after phase 1: the refund below is not tested")
	}
	var reserved float64
	for _, n := range nodes {
		reserved += promtest.ToFloat64(n.m.reserved.WithLabelValues("rate_limit"))
	}
	if reserved == 0 {
		t.Error("pinaka_redis_reserved_total{op=rate_limit} = 0")
	}
	t.Logf("phase 1: %d script calls for 450 requests, %v decisions from reserved units, %d units left reserved", calls, reserved, left)

	// Phase 2: once the reservations' time is over, requests go on until
	// every node is refused in turn (none holds a unit then).
	time.Sleep(reserveFor + 50*time.Millisecond)
	refusedInARow := 0
	for i := 0; refusedInARow < 3 && i < 2000; i++ {
		if ok, _ := nodes[i%3].Limiter().Allow("busy"); ok {
			admitted++
			refusedInARow = 0
		} else {
			refusedInARow++
		}
	}
	if admitted > burst || admitted < burst-left {
		t.Errorf("admitted %d in all, want the shared burst %d less at most the %d units left reserved", admitted, burst, left)
	}
	// A refusal holds on its node until the bucket's next unit (a minute
	// here): a client hammering while limited costs no round trips.
	c.ConfigResetStat(context.Background())
	for i := range 300 {
		if ok, _ := nodes[i%3].Limiter().Allow("busy"); ok {
			t.Fatal("admitted past the burst")
		}
	}
	if calls := scriptCalls(t, c); calls != 0 {
		t.Errorf("%d script calls for 300 requests refused within the announced wait, want 0", calls)
	}
	for _, n := range nodes {
		if f := n.fallbacks("rate_limit"); f != 0 {
			t.Errorf("%v fallback decisions with Redis up", f)
		}
	}
}

// A closed tunnel's lease stays with its node for the token's next tunnel
// (no round trip), goes back to Redis after spareFor unused and when the
// node stops; near the cap no lease is kept.
func TestSpareLeases(t *testing.T) {
	r := testutil.StartRedis(t)
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	defer c.Close()
	ctx := context.Background()
	n := newNode(t, r.URL(), Options{MaxTunnelsPerToken: 100, Burst: 1000})
	leases := func(tok string) int64 { return c.ZCard(ctx, "pinaka:tunnels:"+tok).Val() }

	release, ok := n.Tunnels().Acquire("tok")
	if !ok {
		t.Fatal("refused with Redis up")
	}
	release()
	if got := leases("tok"); got != 1 {
		t.Fatalf("%d leases after the tunnel closed, want 1 kept as a spare", got)
	}
	c.ConfigResetStat(ctx)
	for range 5 {
		ok, _, release, slotOK := n.AdmitTunnel("tok")
		if !ok || !slotOK {
			t.Fatal("CONNECT refused with a spare lease")
		}
		if got := n.Tunnels().Count("tok"); got != 1 {
			t.Errorf("%d tunnels counted on the node, want 1", got)
		}
		release()
	}
	if got := promtest.ToFloat64(n.m.reserved.WithLabelValues("tunnel")); got != 5 {
		t.Errorf("reserved_total{op=tunnel} %v, want 5", got)
	}
	// The five CONNECTs' rate-limit units: one call at first, then
	// reserved units.
	if calls := scriptCalls(t, c); calls > 3 {
		t.Errorf("%d script calls for 5 CONNECTs on a spare lease, want at most 3", calls)
	}
	if got := leases("tok"); got != 1 {
		t.Errorf("%d leases, want the one spare", got)
	}
	waitFor(t, "the spare to go back", func() bool { return leases("tok") == 0 })

	// Near the cap nothing is kept: 4 × FLEET_SIZE × 1 spare > 4 - 1 free.
	small := newNode(t, r.URL(), Options{Node: "small", MaxTunnelsPerToken: 4, Prefix: "small:"})
	release, ok = small.Tunnels().Acquire("tok")
	if !ok {
		t.Fatal("refused with Redis up")
	}
	release()
	if got := c.ZCard(ctx, "small:tunnels:tok").Val(); got != 0 {
		t.Errorf("%d leases after the tunnel closed near the cap, want 0", got)
	}

	// A stopping node gives its spares back at once.
	release, _ = n.Tunnels().Acquire("other")
	release()
	if got := leases("other"); got != 1 {
		t.Fatalf("%d leases, want 1 spare", got)
	}
	n.stop()
	if got := leases("other"); got != 0 {
		t.Errorf("%d leases after the node stopped, want 0", got)
	}
}

// A token whose requests come further apart than half a reservation's
// time reserves nothing ahead: one unit per call, none left to refund.
func TestQuietTokenReservesNothingAhead(t *testing.T) {
	r := testutil.StartRedis(t)
	n := newNode(t, r.URL(), Options{Burst: 1000})
	for i := range 4 {
		if i > 0 {
			time.Sleep(reserveFor/2 + 20*time.Millisecond)
		}
		if ok, _ := n.Limiter().Allow("quiet"); !ok {
			t.Fatalf("request %d refused", i)
		}
		a, _ := n.limiter.reserved.Peek("quiet")
		a.mu.Lock()
		units, want := a.units, a.want
		a.mu.Unlock()
		if units != 0 || want != 1 {
			t.Errorf("request %d: %d units reserved, next ask %d; want 0 and 1", i, units, want)
		}
	}
}
