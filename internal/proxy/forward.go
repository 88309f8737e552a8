package proxy

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync/atomic"

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
			// the clone's trailer values would stay empty; share the map
			// the server fills at the end of the body.
			out.Trailer = in.Trailer
			// ReverseProxy has already removed the hop-by-hop headers;
			// Proxy-Authorization is the one that must never leak, so say
			// it again where the policy is visible.
			out.Header.Del("Proxy-Authorization")
			addVia(out.Header, in)
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
			addVia(res.Header, res.Request)
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			q := r.Context().Value(requestKey{}).(*request)
			if q.rec.StatusCode != 0 {
				// The response had started: the body broke mid-way.
				q.rec.Error = "upstream_body"
				return
			}
			p.failUpstream(w, q, err)
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
	if upgrade {
		release, ok := p.acquireTunnel(w, q)
		if !ok {
			return
		}
		defer release()
		p.opt.Metrics.ActiveTunnels.Inc()
		defer p.opt.Metrics.ActiveTunnels.Dec()
	}

	cw := &countingWriter{ResponseWriter: w, q: q, p: p}
	var body *countingBody
	if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
		body = &countingBody{ReadCloser: r.Body, p: p}
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
	p.forwarder.ServeHTTP(cw, r)
	if body != nil {
		// The transport may still be reading the body after the response
		// is done; what it reads later is not in the record.
		q.rec.RequestSize += body.n.Load()
	}
	if cw.hijacked != nil {
		q.rec.RequestSize += cw.hijacked.up.Load()
		q.rec.ResponseSize += cw.hijacked.down.Load()
	}
}

// addVia appends this hop to Via (RFC 9110 §7.6.3).
func addVia(h http.Header, r *http.Request) {
	v := "1.1 pinaka"
	if r != nil && r.ProtoMajor == 2 {
		v = "2 pinaka"
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
}

func (c *countingWriter) WriteHeader(code int) {
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
	c.hijacked = &countingConn{Conn: conn, m: c.p.opt.Metrics}
	return c.hijacked, brw, nil
}

// countingConn counts the bytes of an upgraded (hijacked) connection.
type countingConn struct {
	net.Conn
	m        *metrics.Metrics
	up, down atomic.Int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.up.Add(int64(n))
	c.m.BytesUpstream.Add(float64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.down.Add(int64(n))
	c.m.BytesDownstream.Add(float64(n))
	return n, err
}

// CloseWrite passes the origin's half-close on, as ReverseProxy does for
// the bare connection.
func (c *countingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// countingBody counts request body bytes. The transport reads it from its
// own goroutine, which can outlive the handler when the origin answers
// early, so the count is atomic and copied into the record by the handler.
type countingBody struct {
	io.ReadCloser
	p *Proxy
	n atomic.Int64
}

func (c *countingBody) Read(b []byte) (int, error) {
	n, err := c.ReadCloser.Read(b)
	c.n.Add(int64(n))
	c.p.opt.Metrics.BytesUpstream.Add(float64(n))
	return n, err
}

type bufferPool struct{}

func (bufferPool) Get() []byte  { return *largeBufs.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { largeBufs.Put(&b) }

// checkStatus refuses a status net/http would panic on when written back
// (http.ReadResponse accepts any three digits, WriteHeader only 100–999).
func checkStatus(code int) error {
	if code < 100 || code > 999 {
		return fmt.Errorf("origin sent invalid status %d", code)
	}
	return nil
}
