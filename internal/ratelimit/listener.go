package ratelimit

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// ListenerLimits are the caps a LimitListener enforces at accept.
type ListenerLimits struct {
	// Max is the number of connections open at once on the node
	// (MAX_CONNECTIONS). It must be at least 1.
	Max int
	// PerIP caps the connections one client address holds
	// (MAX_CONNECTIONS_PER_IP); 0 means no cap. IPv6 addresses count by
	// their /64, as the failed-authentication throttle does.
	PerIP int
	// UnauthenticatedPerIP caps the connections of one client address that
	// have not yet carried an authenticated request
	// (MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP); 0 means no cap. Without it
	// one address without credentials can hold every slot of the node
	// with connections that never finish a request.
	UnauthenticatedPerIP int

	// OnAccept runs for each connection handed to the caller, OnClose once
	// when such a connection is first closed, OnRefused (with a fixed
	// reason: RefusedNode, RefusedPerIP, RefusedUnauthenticated) for each
	// connection shed. Any may be nil. They run synchronously, so they must
	// be quick, like updating a metric.
	OnAccept  func()
	OnClose   func()
	OnRefused func(reason string)
}

// Reasons a connection is shed at accept; fixed strings, usable as metric
// label values.
const (
	RefusedNode            = "max_connections"
	RefusedPerIP           = "per_ip"
	RefusedUnauthenticated = "per_ip_unauthenticated"
)

// LimitListener returns a Listener that enforces lim. It wraps the raw TCP
// listener, below TLS, so a connection refused here costs no handshake.
//
// Unlike golang.org/x/net/netutil.LimitListener, which stops accepting while
// full and lets connections queue in the kernel, a full listener accepts and
// immediately closes new connections: a saturated node should shed load
// quickly so that clients retry elsewhere, not hang in a backlog.
//
// A connection counts as unauthenticated until MarkAuthenticated is called
// with a context that carries it (see WithConn).
//
// It panics if lim.Max is less than 1.
func LimitListener(l net.Listener, lim ListenerLimits) net.Listener {
	mustPositive("LimitListener", "max", lim.Max)
	ll := &limitListener{
		Listener:  l,
		lim:       lim,
		slots:     make(chan struct{}, lim.Max),
		onAccept:  orNoop(lim.OnAccept),
		onClose:   orNoop(lim.OnClose),
		onRefused: lim.OnRefused,
	}
	if ll.onRefused == nil {
		ll.onRefused = func(string) {}
	}
	if lim.PerIP > 0 || lim.UnauthenticatedPerIP > 0 {
		ll.perIP = make(map[netip.Addr]*ipConns)
	}
	return ll
}

type limitListener struct {
	net.Listener
	lim       ListenerLimits
	slots     chan struct{} // one element per open connection
	onAccept  func()
	onClose   func()
	onRefused func(string)

	// perIP holds an entry only for addresses with connections open, so
	// its size is bounded by Max however many addresses connect.
	mu    sync.Mutex
	perIP map[netip.Addr]*ipConns
}

type ipConns struct{ open, unauthenticated int }

// Accept returns the next connection within the limits, closing any that
// would exceed them.
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
		default:
			l.onRefused(RefusedNode)
			c.Close()
			continue
		}
		key, reason := l.admit(c)
		if reason != "" {
			<-l.slots
			l.onRefused(reason)
			c.Close()
			continue
		}
		l.onAccept()
		return &limitConn{Conn: c, l: l, key: key}, nil
	}
}

// admit counts c against its address, or says why it may not be admitted.
func (l *limitListener) admit(c net.Conn) (netip.Addr, string) {
	if l.perIP == nil {
		return netip.Addr{}, ""
	}
	ta, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return netip.Addr{}, "" // not a TCP connection (tests with pipes): no per-address cap
	}
	key := throttleKey(ta.AddrPort().Addr())
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.perIP[key]
	if e == nil {
		e = &ipConns{}
	}
	switch {
	case l.lim.PerIP > 0 && e.open >= l.lim.PerIP:
		return key, RefusedPerIP
	case l.lim.UnauthenticatedPerIP > 0 && e.unauthenticated >= l.lim.UnauthenticatedPerIP:
		return key, RefusedUnauthenticated
	}
	e.open++
	e.unauthenticated++
	l.perIP[key] = e
	return key, ""
}

// transition moves c to state to (connAuthenticated or connClosed) once,
// and moves its address's counts with it, under one lock: a connection
// closing while it authenticates must not count twice or against a newer
// connection from its address. It reports whether c was still open.
func (l *limitListener) transition(c *limitConn, to int32) bool {
	if l.perIP == nil || !c.key.IsValid() {
		for {
			from := c.state.Load()
			if from == connClosed || from == to {
				return false
			}
			if c.state.CompareAndSwap(from, to) {
				return true
			}
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	from := c.state.Load()
	if from == connClosed || from == to {
		return false
	}
	c.state.Store(to)
	e := l.perIP[c.key]
	if e == nil {
		return true
	}
	if from == connUnauthenticated {
		e.unauthenticated--
	}
	if to == connClosed {
		e.open--
		if e.open <= 0 {
			delete(l.perIP, c.key)
		}
	}
	return true
}

// limitConn frees its listener slot on the first Close. net/http and
// crypto/tls may both close a connection, so later Closes only reach the
// underlying connection (which reports it is already closed).
type limitConn struct {
	net.Conn
	l *limitListener
	// key is the address the connection counts against (invalid: none).
	key netip.Addr
	// state: open and unauthenticated, authenticated, closed. It only
	// moves forward (transition), and each count moves exactly once.
	state atomic.Int32
}

const (
	connUnauthenticated int32 = iota
	connAuthenticated
	connClosed
)

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	if c.l.transition(c, connClosed) {
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

type connKey struct{}

// WithConn returns ctx carrying the limited connection under c (found
// through crypto/tls's NetConn and other wrappers), for MarkAuthenticated.
// The server calls it once per connection (http.Server.ConnContext).
func WithConn(ctx context.Context, c net.Conn) context.Context {
	for c != nil {
		if lc, ok := c.(*limitConn); ok {
			return context.WithValue(ctx, connKey{}, lc)
		}
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = nc.NetConn()
	}
	return ctx
}

// MarkAuthenticated tells the listener that the connection carried by ctx
// (see WithConn) has carried an authenticated request: it no longer counts
// against its address's unauthenticated cap. It is cheap after the first
// call and does nothing for a context without a connection.
func MarkAuthenticated(ctx context.Context) {
	if lc, ok := ctx.Value(connKey{}).(*limitConn); ok && lc.state.Load() == connUnauthenticated {
		lc.l.transition(lc, connAuthenticated)
	}
}

func orNoop(f func()) func() {
	if f == nil {
		return noop
	}
	return f
}
