package proxy

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/egress"
	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// CONNECT-UDP (RFC 9298): an extended CONNECT with :protocol connect-udp
// to the proxy's URI template asks for a UDP flow to a target host and
// port. The flow's UDP payloads travel as HTTP Datagrams (RFC 9297) of the
// request, each prefixed with a context id; 0 is a UDP payload, the only
// kind served. Only an engine with HTTP Datagrams carries it (HTTP/3).

// udpProtocol is the :protocol of a CONNECT-UDP request.
const udpProtocol = "connect-udp"

// isConnectUDP reports whether r is a CONNECT-UDP request (extended
// CONNECT with :protocol connect-udp, matched without case as the
// dispatch does).
func isConnectUDP(r *http.Request) bool { return strings.EqualFold(httpx.Protocol(r), udpProtocol) }

// udpPathPrefix is the default URI template's path up to its variables:
// https://PROXY/.well-known/masque/udp/{target_host}/{target_port}/
// (RFC 9298 §3). Pinaka serves that template only.
const udpPathPrefix = "/.well-known/masque/udp/"

// maxUDPPath bounds the work done on a hostile :path: the prefix, a DNS
// name of 253 octets percent-encoded in full, a port and two slashes.
const maxUDPPath = len(udpPathPrefix) + 3*253 + 8

// parseUDPTarget reads the target of a CONNECT-UDP request from its raw
// :path. target_host is a DNS name, an IPv4 literal or an IPv6 literal
// whose colons are percent-encoded (RFC 9298 §2); the decoded host goes
// through egress.ParseAuthority like any CONNECT authority, so names and
// every spelling of an address are judged the same way. The trailing
// slash of the template may be left out. Errors are *egress.TargetError
// (400).
func parseUDPTarget(path string) (egress.Target, error) {
	if len(path) > maxUDPPath {
		return egress.Target{}, &egress.TargetError{Reason: "CONNECT-UDP path too long"}
	}
	rest, ok := strings.CutPrefix(path, udpPathPrefix)
	if !ok {
		return egress.Target{}, &egress.TargetError{Reason: "CONNECT-UDP path is not " + udpPathPrefix + "{target_host}/{target_port}/"}
	}
	if strings.ContainsAny(rest, "?#") {
		return egress.Target{}, &egress.TargetError{Reason: "query or fragment in the CONNECT-UDP path"}
	}
	rest = strings.TrimSuffix(rest, "/")
	host, port, ok := strings.Cut(rest, "/")
	if !ok || host == "" || strings.Contains(port, "/") {
		return egress.Target{}, &egress.TargetError{Reason: "CONNECT-UDP path needs exactly a target host and a target port"}
	}
	if port == "" || len(port) > 5 || strings.Trim(port, "0123456789") != "" {
		return egress.Target{}, &egress.TargetError{Reason: "invalid target port"}
	}
	h, err := url.PathUnescape(host)
	if err != nil {
		return egress.Target{}, &egress.TargetError{Reason: "invalid percent-encoding in the target host"}
	}
	if h == "" || strings.ContainsAny(h, "[]/") {
		return egress.Target{}, &egress.TargetError{Reason: "invalid target host"}
	}
	if strings.Contains(h, ":") {
		h = "[" + h + "]" // an IPv6 literal; ParseAuthority wants it bracketed
	}
	return egress.ParseAuthority(h+":"+port, 0)
}

// udpTargetURL is a flow's target_url: udp://host:port, so that a flow's
// record is told from a TCP CONNECT's (host:port) at a glance.
func udpTargetURL(t egress.Target) string { return "udp://" + t.String() }

// settingsWait bounds how long a CONNECT-UDP request waits for the
// client's SETTINGS, which a client sends before its first request.
const settingsWait = 2 * time.Second

// serveConnectUDP opens a UDP flow (RFC 9298): the checks of a CONNECT
// tunnel in the same order (the request is authenticated and within its
// rate limit already), then a connected UDP socket to the checked address,
// then 200 with Capsule-Protocol, and the flow relays on goroutines of its
// own (udpflow.go) while the handler returns.
func (p *Proxy) serveConnectUDP(w http.ResponseWriter, r *http.Request, q *request) {
	q.udp = true
	path := r.RequestURI
	if path == "" {
		path = r.URL.RequestURI()
	}
	t, err := parseUDPTarget(path)
	if err != nil {
		p.failUpstream(w, q, err)
		return
	}
	q.rec.TargetURL = udpTargetURL(t)
	// Capsule-Protocol is optional on the request; if present it is the
	// structured-field boolean true (RFC 9297 §3.4).
	if v, ok := r.Header["Capsule-Protocol"]; ok && (len(v) != 1 || !strings.HasPrefix(strings.TrimSpace(v[0]), "?1")) {
		p.fail(w, q, http.StatusBadRequest, "bad_request", "Capsule-Protocol must be ?1")
		return
	}
	if err := p.opt.Policy.CheckTargetUDP(t); err != nil {
		p.failUpstream(w, q, err)
		return
	}
	ds, ok := w.(httpx.DatagramSettings)
	if !ok {
		p.fail(w, q, http.StatusNotImplemented, "unsupported_protocol", "CONNECT-UDP is served over HTTP/3 only")
		return
	}
	sctx, cancel := context.WithTimeout(r.Context(), settingsWait)
	enabled := ds.ClientDatagrams(sctx)
	cancel()
	if !enabled {
		p.fail(w, q, http.StatusBadRequest, "datagrams_disabled", "CONNECT-UDP needs HTTP Datagrams: the client's SETTINGS did not enable them (SETTINGS_H3_DATAGRAM)")
		return
	}
	release, ok := p.acquireSlot(w, q, p.opt.UDPFlows, "udp_flow_limit", "too many concurrent UDP flows for this token")
	if !ok {
		return
	}
	conn, err := p.opt.Dialer.DialUDP(r.Context(), t)
	if err != nil {
		release()
		p.failUpstream(w, q, err)
		return
	}
	d, ok := w.(httpx.Detacher)
	if !ok { // an engine with datagrams but no detach: a wiring error
		release()
		conn.Close()
		p.fail(w, q, http.StatusInternalServerError, "tunnel_unsupported", "this listener cannot carry UDP flows")
		return
	}
	w.Header().Set("Capsule-Protocol", "?1")
	w.WriteHeader(http.StatusOK)
	st, err := d.Detach()
	if err != nil {
		release()
		conn.Close()
		q.rec.StatusCode, q.rec.Error = 499, "client_closed"
		return
	}
	dg, ok := st.(httpx.Datagrams)
	if !ok {
		release()
		conn.Close()
		st.Abort()
		q.rec.StatusCode, q.rec.Error = 500, "tunnel_unsupported"
		return
	}
	q.rec.StatusCode = http.StatusOK
	q.req = nil
	p.startFlow(q, st, dg, conn, release)
}
