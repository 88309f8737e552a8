package ratelimit

import "testing"

// AcquireUpTo counts the same tunnels as Acquire against a lower cap (a
// fleet node's share while Redis is away), and never above the limiter's.
func TestTunnelAcquireUpTo(t *testing.T) {
	l := NewTunnelLimiter(4)
	r1, ok1 := l.Acquire("t")
	_, ok2 := l.AcquireUpTo("t", 2)
	if !ok1 || !ok2 {
		t.Fatal("refused under the cap")
	}
	if _, ok := l.AcquireUpTo("t", 2); ok {
		t.Fatal("AcquireUpTo(2) admitted a third tunnel")
	}
	if _, ok := l.Acquire("t"); !ok {
		t.Fatal("Acquire refused under the full cap")
	}
	r1()
	for i := 0; i < 2; i++ { // 2 held after the release; the cap is 4
		if _, ok := l.AcquireUpTo("t", 100); !ok {
			t.Fatal("refused under the limiter's cap")
		}
	}
	if _, ok := l.AcquireUpTo("t", 100); ok {
		t.Fatal("AcquireUpTo above the limiter's own cap")
	}
	if n := l.Count("t"); n != 4 {
		t.Errorf("count %d, want 4", n)
	}
}
