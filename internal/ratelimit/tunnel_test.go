package ratelimit

import (
	"sync"
	"sync/atomic"
	"testing"
)

func (t *TunnelLimiter) mapLen() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.counts)
}

func TestTunnelLimiterCounts(t *testing.T) {
	tl := NewTunnelLimiter(2)

	r1, ok1 := tl.Acquire("a")
	r2, ok2 := tl.Acquire("a")
	if !ok1 || !ok2 {
		t.Fatal("acquiring within the limit failed")
	}
	if got := tl.Count("a"); got != 2 {
		t.Fatalf("Count(a) = %d, want 2", got)
	}
	r3, ok3 := tl.Acquire("a")
	if ok3 {
		t.Fatal("third tunnel for a allowed with limit 2")
	}
	r3() // the refusal's release is a harmless no-op
	if got := tl.Count("a"); got != 2 {
		t.Fatalf("Count(a) after refused release = %d, want 2", got)
	}

	rb, okb := tl.Acquire("b")
	if !okb {
		t.Fatal("token b refused because a is full")
	}

	r1()
	if got := tl.Count("a"); got != 1 {
		t.Fatalf("Count(a) after one release = %d, want 1", got)
	}
	if r, ok := tl.Acquire("a"); !ok {
		t.Fatal("acquire after a release failed")
	} else {
		r()
	}

	r2()
	rb()
	if got := tl.Count("a") + tl.Count("b"); got != 0 {
		t.Fatalf("counts after releasing all = %d, want 0", got)
	}
	if n := tl.mapLen(); n != 0 {
		t.Fatalf("map holds %d entries with nothing open, want 0", n)
	}
}

func TestTunnelReleaseIdempotent(t *testing.T) {
	tl := NewTunnelLimiter(2)
	r1, _ := tl.Acquire("a")
	r2, _ := tl.Acquire("a")
	r1()
	r1()
	r1()
	if got := tl.Count("a"); got != 1 {
		t.Fatalf("Count after releasing one slot three times = %d, want 1", got)
	}
	// The limit is still enforced: one free slot, not three.
	if _, ok := tl.Acquire("a"); !ok {
		t.Fatal("freed slot not available")
	}
	if _, ok := tl.Acquire("a"); ok {
		t.Fatal("repeated release freed more than one slot")
	}
	r2()
}

func TestTunnelLimiterConcurrent(t *testing.T) {
	const limit, workers, rounds = 3, 8, 200
	tl := NewTunnelLimiter(limit)
	var held, peak atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range rounds {
				release, ok := tl.Acquire("tok")
				if !ok {
					continue
				}
				n := held.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				held.Add(-1)
				release()
				release()
			}
		})
	}
	wg.Wait()
	if p := peak.Load(); p > limit || p < 1 {
		t.Fatalf("peak concurrent tunnels = %d, want 1..%d", p, limit)
	}
	if got := tl.Count("tok"); got != 0 {
		t.Fatalf("Count after all released = %d, want 0", got)
	}
	if n := tl.mapLen(); n != 0 {
		t.Fatalf("map holds %d entries after all released, want 0", n)
	}
}

func BenchmarkAcquireRelease(b *testing.B) {
	tl := NewTunnelLimiter(1 << 30)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			release, ok := tl.Acquire("tok")
			if !ok {
				b.Fatal("refused")
			}
			release()
		}
	})
}
