package httpx

import (
	"crypto/tls"
	"net/http/httptest"
	"testing"
)

func TestSchemeAndProtocol(t *testing.T) {
	h1 := httptest.NewRequest("GET", "http://example.test/a", nil)
	h1origin := httptest.NewRequest("GET", "/a", nil)
	h2 := httptest.NewRequest("CONNECT", "/chat", nil)
	h2.ProtoMajor = 2
	h2.TLS = &tls.ConnectionState{} // the engine sets r.TLS on every request: not a scheme signal
	engine := h2.WithContext(WithInfo(h2.Context(), &Info{Scheme: "http", Protocol: "websocket"}))
	for _, c := range []struct {
		name           string
		scheme, proto  string
		gotSch, gotPro string
	}{
		{"HTTP/1.1 absolute-form", "http", "", Scheme(h1), Protocol(h1)},
		{"HTTP/1.1 origin-form", "", "", Scheme(h1origin), Protocol(h1origin)},
		{"HTTP/2 without Info", "", "", Scheme(h2), Protocol(h2)},
		{"engine Info", "http", "websocket", Scheme(engine), Protocol(engine)},
	} {
		if c.gotSch != c.scheme || c.gotPro != c.proto {
			t.Errorf("%s: Scheme %q Protocol %q, want %q %q", c.name, c.gotSch, c.gotPro, c.scheme, c.proto)
		}
	}
}
