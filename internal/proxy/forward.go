package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"strings"
	"sync/atomic"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/httpx"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

type requestKey struct{}

// newForwarder builds the plain-HTTP forwarder. httputil.ReverseProxy does
// the forwarding details: hop-by-hop headers both ways (so they are handled
// in one place), trailers, 1xx responses, flushing of streamed responses and
// HTTP/1.1 Upgrade. Its transport never follows redirects: they reach the
// client as they are.
func (p *Proxy) newForwarder() http.Handler {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			in, out := pr.In, pr.Out
			if out.URL.Host == "" { // HTTP/2: :scheme http, :authority
				out.URL.Scheme, out.URL.Host = "http", in.Host
			}
			out.Host = out.URL.Host
			// ReverseProxy clones the request before its body is read, so
			// the clone's trailer values would stay empty: the body hands
			// them over when it ends, filtered like headers.
			out.Trailer = nil
			if b, ok := in.Body.(*requestBody); ok {
				out.Trailer = b.declareTrailers(in.Trailer)
			}
			// ReverseProxy has already removed the hop-by-hop headers;
			// Proxy-Authorization is the one that must never leak, so say
			// it again where the policy is visible.
			out.Header.Del("Proxy-Authorization")
			addVia(out.Header, in)
			q, _ := in.Context().Value(requestKey{}).(*request)
			injectSpan(q, out.Header)
			if p.opt.AddForwardedFor {
				pr.SetXForwarded()
				out.Header.Del("X-Forwarded-Host")
				out.Header.Del("X-Forwarded-Proto")
			}
		},
		Transport: p.transport,
		ModifyResponse: func(res *http.Response) error {
			if err := checkStatus(res.StatusCode); err != nil {
				return err
			}
			// The request id is ours (countingWriter sets it); an
			// origin's would be added to it.
			res.Header.Del(accesslog.RequestIDHeader)
			addVia(res.Header, res.Request)
			// Trailers pass the same filter as headers: the declared
			// names now (ReverseProxy announces them), the values when
			// the body ends.
			filterTrailer(res.Trailer)
			if res.StatusCode != http.StatusSwitchingProtocols {
				// (An upgrade's body is the connection, which ReverseProxy
				// needs to see as one.)
				q := res.Request.Context().Value(requestKey{}).(*request)
				res.Body = &responseBody{ReadCloser: res.Body, res: res, q: q}
				if q.req.ProtoMajor == 1 && unread(q.req, q.body) {
					// The origin answered before the client finished its
					// body: the rest of it will not be read (see
					// requestBody.finish), so the connection cannot carry
					// another request. ReverseProxy has removed the
					// origin's hop-by-hop fields already; this one is ours.
					res.Header.Set("Connection", "close")
				}
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			q := r.Context().Value(requestKey{}).(*request)
			if q.rec.StatusCode != 0 {
				// The response had started: the body broke mid-way.
				q.rec.Error = "upstream_body"
				return
			}
			switch {
			case errors.Is(context.Cause(r.Context()), errShutdownDeadline):
				// Cut by the drain deadline: not the origin's fault.
				p.fail(w, q, http.StatusServiceUnavailable, "shutdown", "the proxy is shutting down")
			case q.body != nil && q.body.timedOut.Load():
				p.fail(w, q, http.StatusRequestTimeout, "client_body_timeout", "the request body stopped arriving")
			default:
				p.failUpstream(w, q, err)
			}
		},
		BufferPool: bufferPool{},
		ErrorLog:   slog.NewLogLogger(p.log.Handler(), slog.LevelWarn),
	}
}

// serveForward checks the target, then hands the request to the forwarder.
func (p *Proxy) serveForward(w http.ResponseWriter, r *http.Request, q *request) {
	if !p.opt.HTTPProxyEnabled {
		p.fail(w, q, http.StatusForbidden, "http_proxy_disabled", "plain HTTP forwarding is disabled on this proxy; use CONNECT")
		return
	}
	if r.Method == http.MethodTrace {
		w.Header().Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
		p.fail(w, q, http.StatusMethodNotAllowed, "method_not_allowed", "TRACE is not forwarded")
		return
	}
	scheme, host := r.URL.Scheme, r.URL.Host
	if host == "" {
		scheme, host = "http", r.Host
	}
	var defPort uint16 = 80
	switch strings.ToLower(scheme) {
	case "http":
	case "https":
		defPort = 443
	default:
		p.fail(w, q, http.StatusBadRequest, "bad_target", "bad target: unsupported scheme "+scheme)
		return
	}
	if r.URL.User != nil {
		p.fail(w, q, http.StatusBadRequest, "bad_target", "bad target: userinfo in URL")
		return
	}
	if _, ok := p.checkTarget(w, q, host, defPort, nil); !ok {
		return
	}
	upgrade := r.Header.Get("Upgrade") != ""
	q.upgrade = upgrade
	if upgrade {
		release, ok := p.acquireTunnel(w, q)
		if !ok {
			return
		}
		defer release()
		p.opt.Metrics.ActiveTunnels.Inc()
		defer p.opt.Metrics.ActiveTunnels.Dec()
	} else {
		// A forwarded request can last as long as a tunnel (a slow
		// body, a long poll, a stream), holding an upstream connection:
		// it has a per-token cap of its own, separate from tunnels so
		// that a page's burst of requests does not compete with them.
		release, ok := p.acquireForward(w, q)
		if !ok {
			return
		}
		defer release()
	}

	cw := &countingWriter{ResponseWriter: w, q: q, p: p}
	var body *requestBody
	if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
		body = newRequestBody(p, w, r, p.opt.BodyIdleTimeout)
		defer body.stop()
		q.body = body
		r.Body = body
		if r.ProtoMajor == 1 {
			// An origin may answer before it has read the whole body (an
			// early 413, a redirect). Without full duplex, net/http's
			// HTTP/1.1 server waits for the body reader, which the
			// transport holds until the client sends more, before it
			// writes the response: a client waiting for that answer
			// would hang.
			_ = http.NewResponseController(w).EnableFullDuplex()
		}
	}
	// ReverseProxy aborts the handler with a panic (http.ErrAbortHandler)
	// when the response breaks after it started; the record must still
	// say what happened, so this runs on the way out either way.
	completed := false
	defer func() {
		if !completed && q.rec.Error == "" {
			q.rec.Error = p.brokenForward(r, q, cw)
		}
	}()
	if body != nil && r.ProtoMajor == 1 {
		defer func() { // also on ReverseProxy's abort
			if !body.eof.Load() {
				body.finish()
			}
		}()
	}
	// The transport reports its TLS handshake, the connection it used and
	// the response's first byte to the request's trace.
	r = r.WithContext(httptrace.WithClientTrace(r.Context(), q.timing.ClientTrace()))
	p.forwarder.ServeHTTP(cw, r)
	completed = true
	if body != nil {
		// The transport may still be reading the body after the response
		// is done; what it reads later is not in the record.
		q.rec.RequestSize += body.n.Load()
	}
	if cw.hijacked != nil {
		cw.hijacked.watch.stop()
		q.rec.RequestSize += cw.hijacked.up.Load()
		q.rec.ResponseSize += cw.hijacked.down.Load()
		q.rec.CloseReason = endNames[cw.hijacked.firstEnd.Load()]
		switch {
		case cw.hijacked.idled.Load():
			q.rec.Error = "tunnel_idle_timeout"
			q.rec.CloseReason = "idle_timeout"
		case errors.Is(context.Cause(r.Context()), errShutdownDeadline):
			q.rec.Error = "tunnel_shutdown"
			q.rec.CloseReason = "shutdown"
		case errors.Is(context.Cause(r.Context()), errTokenRevoked):
			q.rec.Error = "token_revoked"
			q.rec.CloseReason = "token_revoked"
		}
	}
}

// addVia appends this hop to Via (RFC 9110 §7.6.3).
func addVia(h http.Header, r *http.Request) {
	v := "1.1 pinaka"
	if r != nil && r.ProtoMajor == 2 {
		v = "2 pinaka"
	}
	if r != nil && r.ProtoMajor == 3 {
		v = "3 pinaka"
	}
	if prior := h.Get("Via"); prior != "" {
		v = prior + ", " + v
	}
	h.Set("Via", v)
}

// countingWriter records the status and counts response body bytes.
type countingWriter struct {
	http.ResponseWriter
	q        *request
	p        *Proxy
	hijacked *countingConn // set once an upgrade took the connection
	// writeFailed: a write to the client failed (it went away).
	writeFailed bool
}

func (c *countingWriter) WriteHeader(code int) {
	// Every answer has our id, and only ours: an origin's is replaced, and
	// the headers of a 1xx from the origin replaced the ones set before.
	stampRequestID(c.Header(), c.q)
	if code >= 200 || code == http.StatusSwitchingProtocols {
		c.q.rec.StatusCode = code
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.q.rec.StatusCode == 0 {
		c.q.rec.StatusCode = http.StatusOK
	}
	n, err := c.ResponseWriter.Write(b)
	if err != nil {
		c.writeFailed = true
	}
	c.q.rec.ResponseSize += int64(n)
	c.p.opt.Metrics.BytesDownstream.Add(float64(n))
	return n, err
}

// Unwrap lets http.ResponseController reach Flush.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// Hijack is how ReverseProxy takes over an upgraded connection, which it
// does only after the origin answered 101 and without calling WriteHeader:
// so this is where the record learns the status, and the returned conn
// counts the bytes relayed. The counters are atomic because ReverseProxy's
// copy goroutines may outlive its ServeHTTP by a moment.
func (c *countingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(c.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	c.q.rec.StatusCode = http.StatusSwitchingProtocols
	// ReverseProxy writes the 101 itself, from these headers.
	stampRequestID(c.Header(), c.q)
	hc := &countingConn{Conn: conn, m: c.p.opt.Metrics}
	// ReverseProxy relays the upgraded connection with no time limit of
	// its own: the tunnel idle timeout applies here as to CONNECT.
	// Closing the client side ends both of its copy loops.
	hc.watch = newIdleWatch(c.p.opt.TunnelIdleTimeout, func() {
		hc.idled.Store(true)
		conn.Close()
	})
	c.hijacked = hc
	return hc, brw, nil
}

// countingConn counts the bytes of an upgraded (hijacked) connection and
// closes it when it has been idle for TUNNEL_IDLE_TIMEOUT.
type countingConn struct {
	net.Conn
	m        *metrics.Metrics
	up, down atomic.Int64
	watch    *idleWatch
	idled    atomic.Bool
	// firstEnd: which side ended the upgraded connection first, for
	// close_reason (endClient, endOrigin).
	firstEnd atomic.Int32
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.watch.touch()
	}
	if err != nil {
		// A read of our own closed connection: ReverseProxy closed it
		// because the origin's side ended first.
		side := endClient
		if errors.Is(err, net.ErrClosed) {
			side = endOrigin
		}
		c.firstEnd.CompareAndSwap(endNone, side)
	}
	c.up.Add(int64(n))
	c.m.BytesUpstream.Add(float64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.watch.touch()
	}
	if err != nil {
		c.firstEnd.CompareAndSwap(endNone, endClient)
	}
	c.down.Add(int64(n))
	c.m.BytesDownstream.Add(float64(n))
	return n, err
}

func (c *countingConn) Close() error {
	c.watch.stop()
	return c.Conn.Close()
}

// CloseWrite passes the origin's half-close on, as ReverseProxy does for
// the bare connection.
func (c *countingConn) CloseWrite() error {
	c.firstEnd.CompareAndSwap(endNone, endOrigin)
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// responseBody is the origin's response body on its way to the client. It
// notes a read that failed (the origin cut the body off) for the record,
// and filters the trailers once they are known (the transport fills them
// before it reports EOF; ReverseProxy copies them after).
type responseBody struct {
	io.ReadCloser
	res *http.Response
	q   *request
}

func (b *responseBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		filterTrailer(b.res.Trailer)
	case err != nil:
		b.q.upstreamBroke = true
	}
	return n, err
}

// brokenForward names why a forwarded response that had started did not
// finish: the drain deadline, the origin, or the client.
func (p *Proxy) brokenForward(r *http.Request, q *request, cw *countingWriter) string {
	switch {
	case errors.Is(context.Cause(r.Context()), errShutdownDeadline):
		return "shutdown"
	case errors.Is(context.Cause(r.Context()), errTokenRevoked):
		return "token_revoked"
	case errors.Is(context.Cause(r.Context()), httpx.ErrWriteStalled):
		// The engine reset the stream: the client took no bytes of it
		// (no flow-control window) for the stall limit.
		return "write_stalled"
	case r.Context().Err() != nil:
		// The client went away (connection closed, stream reset): the
		// origin's read then fails too, but it did not break first.
		return "client_closed"
	case q.upstreamBroke:
		return "upstream_body"
	case cw.writeFailed:
		return "client_closed"
	}
	return "aborted"
}

type bufferPool struct{}

func (bufferPool) Get() []byte  { return *largeBufs.get() }
func (bufferPool) Put(b []byte) { largeBufs.put(&b) }

// checkStatus refuses a status net/http would panic on when written back
// (http.ReadResponse accepts any three digits, WriteHeader only 100–999).
func checkStatus(code int) error {
	if code < 100 || code > 999 {
		return fmt.Errorf("origin sent invalid status %d", code)
	}
	return nil
}
