package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// tlsAcceptor completes TLS handshakes off the accept loop and hands each
// connection to net/http by protocol: an HTTP/2 connection as the *tls.Conn
// itself (net/http dispatches it to the HTTP/2 server by ALPN), an HTTP/1.1
// one wrapped in an h1Conn. net/http's own TLS path gives a handler no way
// to see a request's framing as it arrived; owning the handshake does.
type tlsAcceptor struct {
	inner   net.Listener
	cfg     *tls.Config
	timeout time.Duration // for the handshake (HEADER_READ_TIMEOUT)
	log     *slog.Logger
	// h2, when set, serves connections that negotiated h2 (our own engine);
	// nil: they go to net/http like the others.
	h2 func(*tls.Conn)
	// failed, when set, is told about each handshake that failed (client
	// certificate refusals are counted there).
	failed func(net.Conn, error)

	conns     chan net.Conn
	ctx       context.Context // cancelled by Close: ends handshakes in progress
	cancel    context.CancelFunc
	closeOnce sync.Once
	done      chan struct{} // closed when the accept loop has stopped
	err       error         // why it stopped; read after done
}

func newTLSAcceptor(inner net.Listener, cfg *tls.Config, timeout time.Duration, log *slog.Logger) *tlsAcceptor {
	ctx, cancel := context.WithCancel(context.Background())
	a := &tlsAcceptor{inner: inner, cfg: cfg, timeout: timeout, log: log,
		conns: make(chan net.Conn), ctx: ctx, cancel: cancel, done: make(chan struct{})}
	go a.acceptLoop()
	return a
}

func (a *tlsAcceptor) acceptLoop() {
	defer close(a.done)
	var backoff time.Duration
	for {
		c, err := a.inner.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || a.ctx.Err() != nil {
				a.err = err
				return
			}
			// Out of file descriptors (EMFILE), a connection reset while
			// queued, and the like: wait and go on, as net/http does. A
			// listener that stopped accepting would stop the node.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			a.log.Warn("accepting a connection failed; retrying", "err", err, "in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go a.handshake(c)
	}
}

// handshake runs one TLS handshake, bounded by the timeout, and queues the
// connection for Accept.
func (a *tlsAcceptor) handshake(c net.Conn) {
	tc := tls.Server(c, a.cfg)
	ctx, cancel := context.WithTimeout(a.ctx, a.timeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		a.log.Debug("TLS handshake failed", "client", c.RemoteAddr().String(), "err", err)
		if a.failed != nil {
			a.failed(c, err)
		}
		c.Close()
		return
	}
	var out net.Conn = tc
	p := tc.ConnectionState().NegotiatedProtocol
	if p == "h2" && a.h2 != nil {
		// A fresh goroutine: this one's stack grew through the handshake.
		go a.h2(tc)
		return
	}
	if p != "h2" {
		out = &h1Conn{Conn: tc}
	}
	select {
	case a.conns <- out:
	case <-a.ctx.Done():
		tc.Close()
	}
}

func (a *tlsAcceptor) Accept() (net.Conn, error) {
	select {
	case c := <-a.conns:
		return c, nil
	case <-a.done:
		select {
		case c := <-a.conns: // handed over while the loop was stopping
			return c, nil
		default:
		}
		if a.ctx.Err() != nil {
			return nil, net.ErrClosed
		}
		return nil, a.err
	}
}

func (a *tlsAcceptor) Close() error {
	var err error
	a.closeOnce.Do(func() {
		a.cancel()
		err = a.inner.Close()
	})
	return err
}

func (a *tlsAcceptor) Addr() net.Addr { return a.inner.Addr() }

// h1Conn is an HTTP/1.1 connection as net/http reads it. It watches the
// request heads going by for one that carries both Content-Length and
// Transfer-Encoding: RFC 9112 §6.1 says to answer such a request by its
// Transfer-Encoding, as net/http does, and then to close the connection,
// since the message may be an attempt to smuggle a second request past a
// parser that read the other field. net/http deletes Content-Length before
// a handler could see it, so the watch happens here, on the bytes.
//
// The watch reads lines, not messages: it cannot tell a head from a body,
// so a body that happens to hold both fields in one block of lines closes
// its connection too, which costs the client a reconnect and nothing else.
// Tunnels read the *tls.Conn beneath (NetConn) once they have taken the
// connection over.
type h1Conn struct {
	*tls.Conn
	ambiguous atomic.Bool // a head with both fields went by
	// Read runs on net/http's one reading goroutine; the scan state needs
	// no lock.
	line            [18]byte // the start of the current line, lowercased: len("transfer-encoding:")
	lineLen         int
	skipLine        bool // the line cannot be either field
	sawCL, sawTE    bool
	lineHasContents bool
}

func (c *h1Conn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 && !c.ambiguous.Load() {
		c.scan(b[:n])
	}
	return n, err
}

// scan feeds bytes to the line watcher. It looks at the first bytes of
// each line only and finds line ends with bytes.IndexByte, so bodies going
// by cost little.
func (c *h1Conn) scan(b []byte) {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		seg := b
		if i >= 0 {
			seg = b[:i]
		}
		if !c.lineHasContents && len(bytes.Trim(seg, "\r")) > 0 {
			c.lineHasContents = true // a line of nothing but \r counts as empty
		}
		if c.lineLen == 0 && len(seg) > 0 && seg[0]|0x20 != 'c' && seg[0]|0x20 != 't' {
			c.skipLine = true // neither field: the rest of the line is not copied
		}
		if c.skipLine {
			seg = nil
		}
		for _, ch := range seg[:min(len(seg), len(c.line)-c.lineLen)] {
			if 'A' <= ch && ch <= 'Z' {
				ch += 'a' - 'A'
			}
			c.line[c.lineLen] = ch
			c.lineLen++
		}
		if i < 0 {
			return
		}
		c.endLine()
		b = b[i+1:]
	}
}

func (c *h1Conn) endLine() {
	l := c.line[:c.lineLen]
	switch {
	case !c.lineHasContents: // the empty line that ends a head
		if c.sawCL && c.sawTE {
			c.ambiguous.Store(true)
		}
		c.sawCL, c.sawTE = false, false
	case len(l) >= 15 && string(l[:15]) == "content-length:":
		c.sawCL = true
	case len(l) >= 18 && string(l) == "transfer-encoding:":
		c.sawTE = true
	}
	c.lineLen, c.lineHasContents, c.skipLine = 0, false, false
}

// NetConn is the TLS connection beneath, for the relay of a hijacked
// tunnel (no line watching on tunnel bytes) and the limits' bookkeeping.
func (c *h1Conn) NetConn() net.Conn { return c.Conn }

type h1ConnKey struct{}

// closeAmbiguous wraps the proxy handler: a request on an HTTP/1.1
// connection that has carried a head with both Content-Length and
// Transfer-Encoding is answered with Connection: close, so net/http closes
// the connection after the answer.
func closeAmbiguous(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(h1ConnKey{}).(*h1Conn); ok && c.ambiguous.Load() {
			w.Header().Set("Connection", "close")
		}
		h.ServeHTTP(w, r)
	})
}
