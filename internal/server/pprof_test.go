package server

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// A profile longer than maxProfileSeconds is refused before it starts: it
// would hold the (single) CPU profiler and a goroutine for as long as asked.
func TestProfileSecondsCapped(t *testing.T) {
	ran := 0
	h := capSeconds(func(w http.ResponseWriter, r *http.Request) { ran++ })
	for q, want := range map[string]int{
		"":                 http.StatusOK,
		"?seconds=1":       http.StatusOK,
		"?seconds=60":      http.StatusOK,
		"?seconds=61":      http.StatusBadRequest,
		"?seconds=1e9":     http.StatusBadRequest,
		"?seconds=-1":      http.StatusBadRequest,
		"?seconds=NaN":     http.StatusBadRequest,
		"?seconds=forever": http.StatusBadRequest,
	} {
		w := httptest.NewRecorder()
		h(w, httptest.NewRequest("GET", "/debug/pprof/profile"+q, nil))
		if w.Code != want {
			t.Errorf("%q: status %d, want %d", q, w.Code, want)
		}
	}
	if ran != 3 {
		t.Errorf("the profile ran %d times, want 3", ran)
	}
}
