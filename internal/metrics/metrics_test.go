package metrics

import "testing"

func TestLabelsComeFromFixedSets(t *testing.T) {
	for in, want := range map[string]string{
		"GET": "GET", "PATCH": "PATCH", "CONNECT": "CONNECT",
		"get": "other", "FOO": "other", "": "other", "GET\x00": "other",
	} {
		if got := MethodLabel(in); got != want {
			t.Errorf("MethodLabel(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[int]string{
		200: "200", 404: "404", 499: "499", 502: "502",
		299: "2xx", 599: "5xx", 999: "9xx", 0: "other", 1000: "other", -1: "other",
	} {
		if got := StatusLabel(in); got != want {
			t.Errorf("StatusLabel(%d) = %q, want %q", in, got, want)
		}
	}
	// However many codes an origin sends, the set stays small.
	seen := map[string]bool{}
	for code := 0; code < 2000; code++ {
		seen[StatusLabel(code)] = true
	}
	if len(seen) > 80 {
		t.Fatalf("%d distinct status labels for codes 0-1999, want a small fixed set", len(seen))
	}
}
