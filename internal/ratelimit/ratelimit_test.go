package ratelimit

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a manually advanced clock, safe for concurrent reads.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newTestLimiter(rpm, burst, maxTokens int) (*Limiter, *fakeClock) {
	clk := newFakeClock()
	l := New(rpm, burst, maxTokens)
	l.now = clk.Now
	return l, clk
}

// approx reports whether got is within 1µs of want; the limiter works in
// float64 tokens, so exact Duration equality is not guaranteed.
func approx(got, want time.Duration) bool {
	diff := got - want
	return diff > -time.Microsecond && diff < time.Microsecond
}

func TestAllowBurstThenRefuse(t *testing.T) {
	const rpm, burst = 600, 5 // one unit per 100ms
	l, _ := newTestLimiter(rpm, burst, 10)

	for i := range burst {
		if ok, ra := l.Allow("tok"); !ok || ra != 0 {
			t.Fatalf("request %d within burst: ok=%v retryAfter=%v, want ok", i+1, ok, ra)
		}
	}
	ok, ra := l.Allow("tok")
	if ok {
		t.Fatal("request beyond burst was allowed")
	}
	if want := time.Minute / rpm; !approx(ra, want) {
		t.Errorf("retryAfter = %v, want %v (60s/rpm)", ra, want)
	}
}

func TestAllowDefaultsRetryAfter(t *testing.T) {
	// The SPEC defaults: 10000/min, burst 500 — a refused client waits 6ms,
	// which the proxy rounds up to Retry-After: 1.
	l, _ := newTestLimiter(10000, 500, 10000)
	for range 500 {
		if ok, _ := l.Allow("tok"); !ok {
			t.Fatal("refused within burst")
		}
	}
	ok, ra := l.Allow("tok")
	if ok || !approx(ra, 6*time.Millisecond) {
		t.Fatalf("Allow after burst = %v, %v; want false, 6ms", ok, ra)
	}
}

func TestAllowOtherTokenUnaffected(t *testing.T) {
	l, _ := newTestLimiter(60, 2, 10)
	l.Allow("a")
	l.Allow("a")
	if ok, _ := l.Allow("a"); ok {
		t.Fatal("token a allowed beyond its burst")
	}
	for i := range 2 {
		if ok, _ := l.Allow("b"); !ok {
			t.Fatalf("token b request %d refused after a was exhausted", i+1)
		}
	}
	if ok, _ := l.Allow("b"); ok {
		t.Fatal("token b allowed beyond its burst")
	}
}

func TestRefusalDoesNotConsume(t *testing.T) {
	const rpm = 60 // one unit per second
	l, clk := newTestLimiter(rpm, 1, 10)
	if ok, _ := l.Allow("tok"); !ok {
		t.Fatal("first request refused")
	}
	// Many refusals while empty. If they consumed (went into debt), the
	// bucket would need far longer than one interval to recover.
	for range 100 {
		if ok, _ := l.Allow("tok"); ok {
			t.Fatal("allowed while empty")
		}
	}
	clk.Advance(time.Second)
	if ok, ra := l.Allow("tok"); !ok {
		t.Fatalf("refused after one refill interval (retryAfter %v): refusals consumed units", ra)
	}
	if ok, _ := l.Allow("tok"); ok {
		t.Fatal("second request after one interval allowed: refill too fast")
	}
}

func TestRetryAfterPartialRefill(t *testing.T) {
	l, clk := newTestLimiter(60, 1, 10)
	l.Allow("tok")
	clk.Advance(250 * time.Millisecond)
	ok, ra := l.Allow("tok")
	if ok || !approx(ra, 750*time.Millisecond) {
		t.Fatalf("Allow 250ms into a 1s interval = %v, %v; want false, 750ms", ok, ra)
	}
	clk.Advance(ra)
	if ok, _ := l.Allow("tok"); !ok {
		t.Fatal("refused once retryAfter had elapsed")
	}
}

func TestRefillCapsAtBurst(t *testing.T) {
	const burst = 3
	l, clk := newTestLimiter(60, burst, 10)
	for range burst {
		l.Allow("tok")
	}
	clk.Advance(time.Hour) // far more than burst units' worth
	for i := range burst {
		if ok, _ := l.Allow("tok"); !ok {
			t.Fatalf("request %d after refill refused", i+1)
		}
	}
	if ok, _ := l.Allow("tok"); ok {
		t.Fatal("bucket refilled beyond its capacity")
	}
}

func TestLRUEvictionBoundsLen(t *testing.T) {
	l, _ := newTestLimiter(60, 1, 3)
	for _, tok := range []string{"a", "b", "c"} {
		l.Allow(tok)
	}
	if got := l.Len(); got != 3 {
		t.Fatalf("Len = %d, want 3", got)
	}
	// Touch a so that b is the least recently used, then add d.
	if ok, _ := l.Allow("a"); ok {
		t.Fatal("a allowed beyond burst")
	}
	l.Allow("d")
	if got := l.Len(); got != 3 {
		t.Fatalf("Len after a 4th token = %d, want 3", got)
	}
	// a was kept (still empty); b was evicted, so it comes back full.
	if ok, _ := l.Allow("a"); ok {
		t.Error("recently used token a was evicted")
	}
	if ok, _ := l.Allow("b"); !ok {
		t.Error("least recently used token b was not evicted")
	}
	for i := range 100 {
		l.Allow(fmt.Sprintf("t%d", i))
	}
	if got := l.Len(); got != 3 {
		t.Fatalf("Len after 100 more tokens = %d, want 3", got)
	}
}

func TestAllowConcurrentExactBurst(t *testing.T) {
	// With the clock frozen, exactly burst requests may pass however many
	// goroutines race, including on the first (bucket-creating) request.
	const burst, workers, perWorker = 50, 8, 40
	l, _ := newTestLimiter(60, burst, 100)
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				if ok, _ := l.Allow("shared"); ok {
					allowed.Add(1)
				}
				// Churn other tokens through the LRU meanwhile.
				l.Allow(fmt.Sprintf("w%d-%d", w, i))
			}
		})
	}
	wg.Wait()
	if got := allowed.Load(); got != burst {
		t.Fatalf("%d requests allowed concurrently, want exactly %d", got, burst)
	}
}

func TestAllowDoesNotAllocate(t *testing.T) {
	l := New(10000, 500, 100)
	l.Allow("tok")
	allocs := testing.AllocsPerRun(1000, func() { l.Allow("tok") })
	if allocs != 0 {
		t.Fatalf("Allow on an existing token allocates %v times per call, want 0", allocs)
	}
}

func TestNewRejectsNonPositive(t *testing.T) {
	for _, args := range [][3]int{{0, 1, 1}, {1, 0, 1}, {1, 1, 0}, {-1, 1, 1}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("New%v did not panic", args)
				}
			}()
			New(args[0], args[1], args[2])
		}()
	}
}

func BenchmarkAllow(b *testing.B) {
	// A limit high enough that the benchmark measures the allowed path.
	l := New(1<<30, 1<<30, 10000)
	l.Allow("tok")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			l.Allow("tok")
		}
	})
}

func BenchmarkAllowManyTokens(b *testing.B) {
	l := New(1<<30, 1<<30, 10000)
	ids := make([]string, 1000)
	for i := range ids {
		ids[i] = fmt.Sprintf("token-%d", i)
		l.Allow(ids[i])
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			l.Allow(ids[i%len(ids)])
			i++
		}
	})
}
