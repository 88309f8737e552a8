// Package httpx is the contract between Pinaka's protocol engines and its
// proxy core. The core is an http.Handler and must not know which engine
// carried a request (HTTP/1.1 on net/http, HTTP/2, HTTP/3 later); what a
// plain *http.Request cannot carry, the engine puts in the request's
// context as an Info, and the core reads it through Scheme and Protocol.
//
// Today's HTTP/2 engine (x/net/http2, handed the handler directly; see
// internal/server) sets no Info, so both functions fall back to the
// signals that engine gives: r.TLS set only for :scheme https, and
// :protocol in the header map. The fallbacks go with that engine.
package httpx

import (
	"context"
	"net/http"
)

// Info is what an engine knows of a request beyond *http.Request.
type Info struct {
	Scheme   string // :scheme (HTTP/2, HTTP/3); "" on HTTP/1.1
	Protocol string // :protocol of an extended CONNECT (RFC 8441, RFC 9220); "" otherwise
}

type infoKey struct{}

// WithInfo returns ctx carrying i for the request an engine is about to
// hand to the core.
func WithInfo(ctx context.Context, i *Info) context.Context {
	return context.WithValue(ctx, infoKey{}, i)
}

func info(r *http.Request) *Info {
	i, _ := r.Context().Value(infoKey{}).(*Info)
	return i
}

// Scheme is the request's scheme: HTTP/2's :scheme, or an HTTP/1.1
// absolute-form URL's scheme ("" for origin-form and CONNECT).
func Scheme(r *http.Request) string {
	if i := info(r); i != nil {
		return i.Scheme
	}
	if r.ProtoMajor < 2 {
		return r.URL.Scheme
	}
	// x/net/http2 handed the handler directly sets r.TLS only for
	// :scheme https (and CONNECT has no :scheme, but is never asked).
	if r.TLS != nil {
		return "https"
	}
	return "http"
}

// Protocol is the :protocol of an extended CONNECT, or "".
func Protocol(r *http.Request) string {
	if i := info(r); i != nil {
		return i.Protocol
	}
	if r.ProtoMajor < 2 {
		return ""
	}
	return r.Header.Get(":protocol")
}
