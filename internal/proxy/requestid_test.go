package proxy

import (
	"testing"
	"time"

	"github.com/google/uuid"
)

// Request ids are UUIDv7 of the request's start (time-ordered, so they
// sort with the records), and distinct.
func TestRequestIDIsUUIDv7(t *testing.T) {
	start := time.Date(2026, 5, 6, 7, 8, 9, 123_000_000, time.UTC)
	seen := map[string]bool{}
	for range 10000 {
		s := newRequestID(start)
		id, err := uuid.Parse(s)
		if err != nil || id.Version() != 7 || id.Variant() != uuid.RFC4122 || id.String() != s {
			t.Fatalf("%q: %v, version %v, variant %v", s, err, id.Version(), id.Variant())
		}
		if sec, nsec := id.Time().UnixTime(); !time.Unix(sec, nsec).Equal(start) {
			t.Fatalf("%q carries %v, want the start %v", s, time.Unix(sec, nsec).UTC(), start)
		}
		if seen[s] {
			t.Fatalf("%q twice", s)
		}
		seen[s] = true
	}
	if a, b := newRequestID(start), newRequestID(start.Add(time.Millisecond)); a >= b {
		t.Errorf("ids do not sort by time: %s ≥ %s", a, b)
	}
}
