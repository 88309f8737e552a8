package proxy

import (
	"net/http"
	"net/textproto"
	"strings"
)

// hopHeaders are removed at every hop (RFC 9110 §7.6.1) plus the proxy
// credentials, which are for this hop only. Forwarded requests get this
// treatment from httputil.ReverseProxy; requests Pinaka builds itself (the
// RFC 8441 WebSocket handshake) use removeHopByHop.
var hopHeaders = []string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// trailerForbidden are fields a trailer section must not carry besides the
// hop-by-hop ones: credentials, cookies, and what frames, routes or
// describes the content (RFC 9110 §6.5.1). A trailer is only data that
// arrives late; it must not smuggle past the filtering headers get.
var trailerForbidden = []string{
	"Authorization",
	"Cookie",
	"Set-Cookie",
	"Www-Authenticate",
	"Content-Length",
	"Content-Encoding",
	"Content-Type",
	"Content-Range",
	"Host",
}

// filterTrailer removes from a trailer section (the declared names, or
// the values received) what must not pass this hop.
func filterTrailer(t http.Header) {
	if len(t) == 0 {
		return
	}
	removeHopByHop(t)
	t.Del("Te") // "TE: trailers" is a request header, never a trailer
	for _, name := range trailerForbidden {
		t.Del(name)
	}
}

// removeHopByHop deletes hop-by-hop headers from h: Connection and every
// header it names, then the fixed list. "TE: trailers" survives, since it
// is end-to-end in meaning.
func removeHopByHop(h http.Header) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	keepTE := false
	for _, v := range h.Values("Te") {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(textproto.TrimString(t), "trailers") {
				keepTE = true
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
	if keepTE {
		h.Set("Te", "trailers")
	}
	// HTTP/2 pseudo-headers such as :protocol are stored in the header map
	// by net/http; they are never forwarded as fields.
	for name := range h {
		if strings.HasPrefix(name, ":") {
			delete(h, name)
		}
	}
}
