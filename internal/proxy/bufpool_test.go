package proxy

import "testing"

// A capped pool hands out at most limit buffers at once, and one more once
// one comes back: huge relay buffers cannot add up past their budget.
func TestBufPoolLimit(t *testing.T) {
	p := bufPool{size: 1024, limit: 3}
	var out []*[]byte
	for range 3 {
		b := p.get()
		if b == nil || len(*b) != 1024 {
			t.Fatalf("get %d of the limit: %v", len(out)+1, b)
		}
		out = append(out, b)
	}
	if b := p.get(); b != nil {
		t.Fatal("get beyond the limit returned a buffer")
	}
	p.put(out[0])
	if b := p.get(); b == nil {
		t.Fatal("get after a put returned nil")
	}
	if got := p.out.Load(); got != 3 {
		t.Errorf("out = %d, want 3", got)
	}
	// Without a limit nothing is counted or refused.
	u := bufPool{size: 8}
	for range 10 {
		if u.get() == nil {
			t.Fatal("an uncapped pool refused")
		}
	}
}
