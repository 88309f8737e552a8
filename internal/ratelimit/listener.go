package ratelimit

import (
	"errors"
	"net"
	"sync/atomic"
)

// LimitListener returns a Listener that keeps at most max accepted
// connections open at once. It wraps the raw TCP listener, below TLS, so a
// connection refused here costs no handshake.
//
// Unlike golang.org/x/net/netutil.LimitListener, which stops accepting while
// full and lets connections queue in the kernel, a full listener accepts and
// immediately closes new connections: a saturated node should shed load
// quickly so that clients retry elsewhere, not hang in a backlog.
//
// onAccept runs for each connection handed to the caller, onClose once when
// such a connection is first closed, and onRefused for each connection shed;
// any may be nil. They run synchronously (onAccept and onRefused on the
// accept loop), so they must be quick, like updating a gauge. onRefused runs
// before the shed connection is closed.
//
// It panics if max is less than 1.
func LimitListener(l net.Listener, max int, onAccept func(), onClose func(), onRefused func()) net.Listener {
	mustPositive("LimitListener", "max", max)
	return &limitListener{
		Listener:  l,
		slots:     make(chan struct{}, max),
		onAccept:  orNoop(onAccept),
		onClose:   orNoop(onClose),
		onRefused: orNoop(onRefused),
	}
}

type limitListener struct {
	net.Listener
	slots     chan struct{} // one element per open connection
	onAccept  func()
	onClose   func()
	onRefused func()
}

// Accept returns the next connection for which there is a free slot,
// closing any that arrive while all slots are taken.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			// Not wrapped: net/http inspects Accept errors for
			// net.ErrClosed and temporary errors.
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			l.onAccept()
			return &limitConn{Conn: c, l: l}, nil
		default:
			l.onRefused()
			c.Close()
		}
	}
}

// limitConn frees its listener slot on the first Close. net/http and
// crypto/tls may both close a connection, so later Closes only reach the
// underlying connection (which reports it is already closed).
type limitConn struct {
	net.Conn
	l      *limitListener
	closed atomic.Bool
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		<-c.l.slots
		c.l.onClose()
	}
	return err
}

// CloseWrite half-closes the connection when the underlying one supports it
// (TCP does), so a plain-TCP tunnel can pass a client's half-close on; the
// wrapper would otherwise hide the method.
func (c *limitConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return &net.OpError{Op: "close", Net: c.Conn.LocalAddr().Network(), Addr: c.Conn.LocalAddr(), Err: errors.ErrUnsupported}
}

// NetConn returns the wrapped connection, following crypto/tls's Conn.NetConn,
// for callers that need the *net.TCPConn (for example to set keep-alives).
func (c *limitConn) NetConn() net.Conn { return c.Conn }

func orNoop(f func()) func() {
	if f == nil {
		return noop
	}
	return f
}
