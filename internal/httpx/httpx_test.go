package httpx

import (
	"crypto/tls"
	"net/http/httptest"
	"testing"
)

func TestSchemeAndProtocol(t *testing.T) {
	h1 := httptest.NewRequest("GET", "http://example.test/a", nil)
	h2 := httptest.NewRequest("GET", "/a", nil)
	h2.ProtoMajor = 2
	h2tls := h2.Clone(h2.Context())
	h2tls.TLS = &tls.ConnectionState{}
	xconnect := httptest.NewRequest("CONNECT", "/chat", nil)
	xconnect.ProtoMajor = 2
	xconnect.Header.Set(":protocol", "websocket")
	// An engine that says what it knows: Info wins over every fallback
	// (the new engine sets r.TLS on every request).
	engine := h2tls.WithContext(WithInfo(h2tls.Context(), &Info{Scheme: "http", Protocol: "websocket"}))
	for _, c := range []struct {
		name           string
		scheme, proto  string
		gotSch, gotPro string
	}{
		{"HTTP/1.1 absolute-form", "http", "", Scheme(h1), Protocol(h1)},
		{"x/net HTTP/2, no TLS state: :scheme http", "http", "", Scheme(h2), Protocol(h2)},
		{"x/net HTTP/2, TLS state: :scheme https", "https", "", Scheme(h2tls), Protocol(h2tls)},
		{"x/net extended CONNECT", "http", "websocket", Scheme(xconnect), Protocol(xconnect)},
		{"engine Info", "http", "websocket", Scheme(engine), Protocol(engine)},
	} {
		if c.gotSch != c.scheme || c.gotPro != c.proto {
			t.Errorf("%s: Scheme %q Protocol %q, want %q %q", c.name, c.gotSch, c.gotPro, c.scheme, c.proto)
		}
	}
}
