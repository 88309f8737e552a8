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
