package revocation_test

import (
	"fmt"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// BenchmarkRevoked is the per-request cost of the check: one atomic load
// and one map read, whatever the list's size.
func BenchmarkRevoked(b *testing.B) {
	for _, n := range []int{0, 1000, 100_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			l := revocation.NewList()
			ids := make([]string, n)
			for i := range ids {
				ids[i] = fmt.Sprintf("session_%d", i)
			}
			l.Apply(ids)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if l.Revoked("session_not_revoked") {
						b.Fatal("revoked")
					}
				}
			})
		})
	}
}

// BenchmarkApply100k is replacing a list of 100,000 ids with one more.
func BenchmarkApply100k(b *testing.B) {
	ids := make([]string, 100_000)
	for i := range ids {
		ids[i] = fmt.Sprintf("session_%d", i)
	}
	l := revocation.NewList()
	l.Apply(ids)
	next := append(ids[:len(ids):len(ids)], "one-more")
	b.ReportAllocs()
	for b.Loop() {
		l.Apply(next)
	}
}
