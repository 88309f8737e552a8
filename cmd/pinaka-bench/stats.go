package main

import (
	"math"
	"slices"
	"sync"
	"time"
)

// latencies collects per-operation durations from concurrent workers.
// The workloads run for a few seconds, so keeping every sample (a few
// hundred thousand at most) is cheaper and more exact than a histogram.
type latencies struct {
	mu      sync.Mutex
	samples []time.Duration
}

func (l *latencies) add(d []time.Duration) {
	l.mu.Lock()
	l.samples = append(l.samples, d...)
	l.mu.Unlock()
}

// percentiles returns the p50 and p99 of the samples in milliseconds.
func (l *latencies) percentiles() (p50, p99 float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	slices.Sort(l.samples)
	return ms(percentile(l.samples, 50)), ms(percentile(l.samples, 99))
}

// percentile returns the nearest-rank p-th percentile of sorted: the
// smallest sample such that at least p percent of the samples are <= it.
// It returns 0 for no samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// ratio returns v/base, or nil when there is no meaningful baseline.
func ratio(v, base float64) *float64 {
	if base <= 0 || v <= 0 {
		return nil
	}
	r := v / base
	return &r
}
