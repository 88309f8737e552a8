package proxy

import (
	"net/http"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// authenticate finds the request's credentials. A Proxy-Authorization
// header wins over the connection's client certificate: it is chosen per
// request, so a client holding a device certificate can still act for a
// particular user's token, and a request that sends a token is judged by
// it (a bad token is a 407, never a silent fall back to the certificate,
// which would file the request under another identity). Without the
// header, a certificate the listener verified is the credential
// (CLIENT_CERT_MODE optional or require); without either, ErrMissing.
func (p *Proxy) authenticate(r *http.Request) (*auth.Identity, error) {
	if h := r.Header.Get("Proxy-Authorization"); h != "" || r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return p.opt.Auth.Authenticate(h)
	}
	return p.opt.Auth.AuthenticateTLS(r.TLS)
}
