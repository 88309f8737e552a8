package proxy

import (
	"net/http"
	"net/textproto"
	"strings"
	"testing"
)

func TestRemoveHopByHop(t *testing.T) {
	h := http.Header{
		"Connection":          {"X-Private, keep-alive", "Upgrade"},
		"X-Private":           {"secret"},
		"Keep-Alive":          {"timeout=5"},
		"Proxy-Authorization": {"Bearer x"},
		"Proxy-Authenticate":  {"Basic"},
		"Proxy-Connection":    {"keep-alive"},
		"Te":                  {"gzip, trailers"},
		"Trailer":             {"X-Sum"},
		"Transfer-Encoding":   {"chunked"},
		"Upgrade":             {"websocket"},
		":protocol":           {"websocket"},
		"User-Agent":          {"ua"},
		"Cookie":              {"a=b"},
		"X-Custom":            {"kept"},
	}
	removeHopByHop(h)
	want := http.Header{"Te": {"trailers"}, "User-Agent": {"ua"}, "Cookie": {"a=b"}, "X-Custom": {"kept"}}
	if len(h) != len(want) {
		t.Fatalf("got %v, want %v", h, want)
	}
	for k, v := range want {
		if h.Get(k) != v[0] {
			t.Errorf("%s = %q, want %q", k, h.Get(k), v[0])
		}
	}
}

// FuzzRemoveHopByHop: after filtering, no hop-by-hop header, no header
// named by Connection, no pseudo-header and no proxy credential remains,
// and every other header is untouched.
func FuzzRemoveHopByHop(f *testing.F) {
	f.Add("X-A, X-B", "X-A", "v", "trailers")
	f.Add("close", "Proxy-Authorization", "Bearer t", "gzip")
	f.Add(" , ,keep-alive,,", "Keep-Alive", "1", "")
	f.Add("proxy-authorization", "X-Forwarded-For", "1.2.3.4", "TRAILERS, deflate")
	f.Add("Cookie", "Cookie", "a=b", "")
	f.Fuzz(func(t *testing.T, connection, name, value, te string) {
		h := http.Header{}
		h.Set("Connection", connection)
		h.Set("Te", te)
		h.Set("Proxy-Authorization", "Bearer secret")
		h.Set("X-Always", "kept")
		if n := textproto.CanonicalMIMEHeaderKey(name); n != "" {
			h[n] = append(h[n], value)
		}
		before := h.Clone()
		removeHopByHop(h)

		named := map[string]bool{}
		for _, f := range strings.Split(connection, ",") {
			if f = textproto.TrimString(f); f != "" {
				named[textproto.CanonicalMIMEHeaderKey(f)] = true
			}
		}
		for k := range h {
			if named[k] {
				t.Fatalf("%s named by Connection survived", k)
			}
			if strings.HasPrefix(k, ":") {
				t.Fatalf("pseudo-header %s survived", k)
			}
			for _, hop := range hopHeaders {
				if k == hop && k != "Te" {
					t.Fatalf("hop-by-hop %s survived", k)
				}
			}
		}
		if v := h.Get("Te"); v != "" && v != "trailers" {
			t.Fatalf("TE %q survived", v)
		}
		for k, v := range before {
			if named[k] || strings.HasPrefix(k, ":") || isHop(k) {
				continue
			}
			if got := h[k]; strings.Join(got, "\x00") != strings.Join(v, "\x00") {
				t.Fatalf("end-to-end %s changed: %q → %q", k, v, got)
			}
		}
	})
}

func isHop(k string) bool {
	for _, h := range hopHeaders {
		if k == h {
			return true
		}
	}
	return false
}

func BenchmarkRemoveHopByHop(b *testing.B) {
	base := http.Header{
		"Connection": {"keep-alive"}, "Keep-Alive": {"timeout=5"}, "Proxy-Authorization": {"Bearer x"},
		"User-Agent": {"ua"}, "Accept": {"*/*"}, "Cookie": {"a=b"},
	}
	b.ReportAllocs()
	for b.Loop() {
		h := make(http.Header, len(base))
		for k, v := range base {
			h[k] = v
		}
		removeHopByHop(h)
	}
}

// A full relay buffer is a whole number of DATA frames that each fill one
// TLS record.
func TestRelayBufferIsWholeFrames(t *testing.T) {
	if h2DataChunk+9 != 16384 || largeBufSize%h2DataChunk != 0 {
		t.Fatal("frame with header must be exactly one TLS record")
	}
}
