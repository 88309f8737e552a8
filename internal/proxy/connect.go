package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/egress"
	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// serveConnect opens a tunnel to the CONNECT authority. The upstream dial
// happens before the client is answered, so every failure still gets a
// proper status; then HTTP/1.1 hijacks the connection and HTTP/2 keeps the
// stream, and bytes flow both ways.
func (p *Proxy) serveConnect(w http.ResponseWriter, r *http.Request, q *request) {
	t, ok := p.checkTarget(w, q, r.Host, 0, func(t egress.Target) { q.rec.TargetURL = t.String() })
	if !ok {
		return
	}
	release, ok := p.acquireTunnel(w, q)
	if !ok {
		return
	}
	upstream, err := p.opt.Dialer.DialTarget(r.Context(), t)
	if err != nil {
		release()
		p.failUpstream(w, q, err)
		return
	}
	if r.ProtoMajor == 1 {
		p.tunnelHTTP1(w, r, q, upstream, release)
		return
	}
	p.tunnelHTTP2(w, q, connEndpoint(upstream), release)
}

// checkTarget parses an authority (defaultPort 0: the port is required) and
// applies the egress policy to what can be decided before DNS: the port and
// literal addresses. It answers 400 or 403 itself and reports false then.
// parsed, if set, sees the target as soon as it parses, before the policy
// (a CONNECT record names even a denied target in canonical form).
func (p *Proxy) checkTarget(w http.ResponseWriter, q *request, authority string, defaultPort uint16, parsed func(egress.Target)) (egress.Target, bool) {
	t, err := egress.ParseAuthority(authority, defaultPort)
	if err == nil && parsed != nil {
		parsed(t)
	}
	if err == nil {
		err = p.opt.Policy.CheckTarget(t)
	}
	if err != nil {
		p.failUpstream(w, q, err)
		return egress.Target{}, false
	}
	return t, true
}

// acquireTunnel enforces MAX_TUNNELS_PER_TOKEN, or answers with the slot
// that authorize already decided (Options.TunnelAdmission).
func (p *Proxy) acquireTunnel(w http.ResponseWriter, q *request) (release func(), ok bool) {
	const code, reason = "tunnel_limit", "too many concurrent tunnels for this token"
	if q.admitted {
		release, q.release = q.release, nil
		if !q.slotOK {
			w.Header().Set("Retry-After", "1")
			p.fail(w, q, http.StatusTooManyRequests, code, reason)
			return release, false
		}
		return release, true
	}
	return p.acquireSlot(w, q, p.opt.Tunnels, code, reason)
}

// acquireForward enforces MAX_FORWARDS_PER_TOKEN.
func (p *Proxy) acquireForward(w http.ResponseWriter, q *request) (release func(), ok bool) {
	return p.acquireSlot(w, q, p.opt.Forwards, "forward_limit", "too many concurrent forwarded requests for this token")
}

// acquireSlot takes one of the token's slots in lim (nil: no cap), or
// answers 429 with code and reason.
func (p *Proxy) acquireSlot(w http.ResponseWriter, q *request, lim SlotLimiter, code, reason string) (release func(), ok bool) {
	if lim == nil {
		return func() {}, true
	}
	release, ok = lim.Acquire(q.rec.TokenID)
	if !ok {
		w.Header().Set("Retry-After", "1")
		p.fail(w, q, http.StatusTooManyRequests, code, reason)
	}
	return release, ok
}

// connectEstablishedFor is the 200 of an HTTP/1.1 CONNECT, written on the
// hijacked connection, with the request id like every other answer.
func connectEstablishedFor(requestID string) []byte {
	b := make([]byte, 0, 96)
	b = append(b, "HTTP/1.1 200 Connection established\r\n"...)
	b = append(b, accesslog.RequestIDHeader+": "...)
	b = append(b, requestID...)
	return append(b, "\r\n\r\n"...)
}

// tunnelHTTP1 hijacks the connection, answers 200 and hands the tunnel to
// fresh goroutines, then returns: the connection's serve goroutine, whose
// stack grew through the TLS handshake, and net/http's per-connection
// buffers are freed instead of idling as long as the tunnel does. The
// tunnel keeps its own place in the drain set and its tunnel-limit slot
// (release) until it ends.
func (p *Proxy) tunnelHTTP1(w http.ResponseWriter, r *http.Request, q *request, upstream net.Conn, release func()) {
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		release()
		upstream.Close()
		p.fail(w, q, http.StatusInternalServerError, "hijack_failed", "cannot take over the connection")
		return
	}
	// The server's header timeouts must not cut the tunnel; the idle watch
	// takes over.
	_ = conn.SetDeadline(time.Time{})
	if _, err := conn.Write(connectEstablishedFor(q.rec.RequestID)); err != nil {
		release()
		conn.Close()
		upstream.Close()
		q.rec.StatusCode, q.rec.Error = 499, "client_closed"
		return
	}
	q.rec.StatusCode = http.StatusOK
	// A client may send its first bytes (a TLS ClientHello) right behind the
	// CONNECT; they are already in the server's buffer.
	if n := brw.Reader.Buffered(); n > 0 {
		b, _ := brw.Reader.Peek(n)
		nw, err := upstream.Write(b)
		q.rec.RequestSize += int64(nw)
		p.opt.Metrics.BytesUpstream.Add(float64(nw))
		if err != nil {
			release()
			conn.Close()
			upstream.Close()
			q.rec.Error = "upstream_write"
			return
		}
	}
	// The buffered bytes were replayed, so the tunnel reads the conn itself
	// and the bufio buffers can be collected with the handler. The relay
	// runs in goroutines of its own that end while the tunnel is idle (see
	// parkAfter); the last one to finish writes the record.
	p.detachTunnel(q, connEndpoint(conn), connEndpoint(upstream), release)
}

// tunnelHTTP2 answers 200 on the stream, detaches it from the handler
// (httpx.Detacher) and relays: the shape of tunnelHTTP1, the handler
// returns and the relay runs on goroutines of its own, which end while the
// tunnel is idle; the request and its contexts are not kept. It owns
// release (the tunnel-limit slot).
func (p *Proxy) tunnelHTTP2(w http.ResponseWriter, q *request, upstream endpoint, release func()) {
	d, ok := w.(httpx.Detacher)
	if !ok { // every HTTP/2 engine of ours detaches; this is a wiring error
		release()
		upstream.close()
		p.fail(w, q, http.StatusInternalServerError, "tunnel_unsupported", "this listener cannot carry tunnels")
		return
	}
	w.WriteHeader(http.StatusOK)
	st, err := d.Detach()
	if err != nil {
		release()
		upstream.close()
		q.rec.StatusCode, q.rec.Error = 499, "client_closed"
		return
	}
	q.rec.StatusCode = http.StatusOK
	q.req = nil
	p.detachTunnel(q, streamEndpoint(st), upstream, release)
}

// detachTunnel relays a tunnel whose handler returns: it keeps its own
// place in the drain set and the tunnel-limit slot (release) until it
// ends. It holds no context: the request's, and the server's
// per-connection ones, would otherwise live as long as the tunnel.
func (p *Proxy) detachTunnel(q *request, client, upstream endpoint, release func()) {
	q.detached = true
	p.opt.Metrics.ActiveTunnels.Inc()
	t := newTunnel(p.parker, client, upstream, p.opt.TunnelIdleTimeout, &detached{p: p, q: q, release: release})
	// In the drain set as its stop function, not as a context: see
	// tunnel.cause. The request's entry, and through its cancel func the
	// request's context chain, must not live as long as the tunnel.
	q.slot = p.active.addFunc(t.stop, true)
	if p.watchToken(q.slot, q.rec.TokenID) {
		// Revoked while the tunnel was being set up: it starts cut.
		p.revoked.tunnels.Add(1)
		t.stop(errTokenRevoked)
	}
	t.start()
}

func (p *Proxy) countTunnelBytes(up, down int) {
	if up > 0 {
		p.opt.Metrics.BytesUpstream.Add(float64(up))
	}
	if down > 0 {
		p.opt.Metrics.BytesDownstream.Add(float64(down))
	}
}

func (p *Proxy) tunnelDone(q *request, res relayResult) {
	p.opt.Metrics.ActiveTunnels.Dec()
	p.recordRelayEnd(q, res)
}

// recordRelayEnd puts what a tunnel or UDP flow moved, and how it ended,
// into its record.
func (p *Proxy) recordRelayEnd(q *request, res relayResult) {
	q.rec.RequestSize += res.up
	q.rec.ResponseSize += res.down
	q.rec.CloseReason = res.closeReason()
	switch res.end {
	case "":
	case "token_revoked":
		q.rec.Error = res.end
	default:
		q.rec.Error = "tunnel_" + res.end
	}
	// Checked first: this runs on a relay goroutine with a small stack,
	// which slog's large frame would grow (a stack copy per tunnel) even
	// when debug logging is off.
	if res.err != nil && p.log.Enabled(context.Background(), slog.LevelDebug) {
		p.log.Debug("tunnel closed", "target", q.rec.TargetURL, "end", res.end, "err", res.err)
	}
}

// h2DataChunk is the largest DATA payload whose frame (9-byte header +
// payload) fits one 16 KiB TLS record; the HTTP/2 engine sizes its frames
// so, and the relay's large buffer is four of them.
const h2DataChunk = 16384 - 9
