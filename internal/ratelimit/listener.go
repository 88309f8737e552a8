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
	return NewConnLimiter(lim).Listener(l)
}

// ConnLimiter is the connection caps of ListenerLimits, shared by every
// listener of a node: TCP connections come through Listener, QUIC ones
// take their place with Acquire and Slot.Admit. One MAX_CONNECTIONS then
// bounds what the node holds, whichever protocol its clients use.
type ConnLimiter struct {
	lim       ListenerLimits
	slots     chan struct{} // one element per open connection
	onAccept  func()
	onClose   func()
	onRefused func(string)

	// perIP holds an entry only for addresses with connections admitted
	// and open, so its size is bounded by Max however many addresses
	// connect.
	mu    sync.Mutex
	perIP map[netip.Addr]*ipConns
}

// NewConnLimiter returns a ConnLimiter enforcing lim. It panics if lim.Max is less
// than 1.
func NewConnLimiter(lim ListenerLimits) *ConnLimiter {
	mustPositive("NewConnLimiter", "max", lim.Max)
	l := &ConnLimiter{
		lim:       lim,
		slots:     make(chan struct{}, lim.Max),
		onAccept:  orNoop(lim.OnAccept),
		onClose:   orNoop(lim.OnClose),
		onRefused: lim.OnRefused,
	}
	if l.onRefused == nil {
		l.onRefused = func(string) {}
	}
	if lim.PerIP > 0 || lim.UnauthenticatedPerIP > 0 {
		l.perIP = make(map[netip.Addr]*ipConns)
	}
	return l
}

// Listener wraps a TCP listener: each accepted connection takes a place
// and is counted against its address at once (a TCP handshake proved the
// address), or is closed.
func (l *ConnLimiter) Listener(ln net.Listener) net.Listener {
	return &limitListener{Listener: ln, l: l}
}

type limitListener struct {
	net.Listener
	l *ConnLimiter
}

type ipConns struct{ open, unauthenticated int }

// Accept returns the next connection within the limits, closing any that
// would exceed them.
func (ll *limitListener) Accept() (net.Conn, error) {
	l := ll.l
	for {
		c, err := ll.Listener.Accept()
		if err != nil {
			// Not wrapped: net/http inspects Accept errors for
			// net.ErrClosed and temporary errors.
			return nil, err
		}
		// Not a TCP connection (tests with pipes): no per-address cap.
		ta, isTCP := c.RemoteAddr().(*net.TCPAddr)
		// An address already at its cap is refused before it takes a
		// place: a flood from one address neither allocates a slot nor
		// moves pinaka_active_connections. A full node is still refused
		// as such first (Acquire), and Admit checks the address again,
		// under the same lock as the count, for connections racing in.
		if isTCP && len(l.slots) < cap(l.slots) {
			if reason := l.Crowded(ta.AddrPort().Addr()); reason != "" {
				l.onRefused(reason)
				c.Close()
				continue
			}
		}
		s, ok := l.Acquire()
		if !ok {
			c.Close()
			continue
		}
		if isTCP {
			if reason := s.Admit(ta.AddrPort().Addr()); reason != "" {
				c.Close()
				continue
			}
		}
		return &limitConn{Conn: c, slot: s}, nil
	}
}

// Acquire takes a place within Max, or refuses (counted as RefusedNode).
// TCP connections get theirs from Listener; a QUIC connection takes one at
// its first Initial packet, since its handshake holds state from then on.
func (l *ConnLimiter) Acquire() (*Slot, bool) {
	select {
	case l.slots <- struct{}{}:
	default:
		l.onRefused(RefusedNode)
		return nil, false
	}
	l.onAccept()
	return &Slot{l: l}, true
}

// Crowded says which per-address cap addr is at (RefusedPerIP,
// RefusedUnauthenticated), or "", without counting anything. A QUIC
// listener asks before a handshake from a not yet validated address: the
// counts hold only admitted (validated) connections, so a spoofed address
// cannot raise them, and a client already at its cap costs no handshake.
func (l *ConnLimiter) Crowded(addr netip.Addr) string {
	if l.perIP == nil {
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.crowded(l.perIP[throttleKey(addr)])
}

func (l *ConnLimiter) crowded(e *ipConns) string {
	switch {
	case e == nil:
		return ""
	case l.lim.PerIP > 0 && e.open >= l.lim.PerIP:
		return RefusedPerIP
	case l.lim.UnauthenticatedPerIP > 0 && e.unauthenticated >= l.lim.UnauthenticatedPerIP:
		return RefusedUnauthenticated
	}
	return ""
}

// Slot is one connection's place within a ConnLimiter's caps.
type Slot struct {
	l *ConnLimiter
	// key is the address the connection counts against (invalid: none
	// yet, or no per-address caps). Set once, by Admit, under l.mu.
	key netip.Addr
	// state: open and unauthenticated, authenticated, closed. It only
	// moves forward (transition), and each count moves exactly once.
	state atomic.Int32
}

// Admit counts the connection against addr's per-address caps, once addr
// is known to be the client's (TCP: at accept; QUIC: when the handshake
// completes, which validates the address). It returns "" when admitted;
// otherwise the cap it exceeds, counted as refused, with the slot
// released.
func (s *Slot) Admit(addr netip.Addr) string {
	l := s.l
	if l.perIP == nil {
		return ""
	}
	key := throttleKey(addr)
	l.mu.Lock()
	state := s.state.Load()
	if state == connClosed || s.key.IsValid() {
		l.mu.Unlock()
		return "" // closed meanwhile, or admitted already: nothing to count
	}
	e := l.perIP[key]
	if reason := l.crowded(e); reason != "" {
		l.mu.Unlock()
		l.onRefused(reason)
		s.Release()
		return reason
	}
	if e == nil {
		e = &ipConns{}
		l.perIP[key] = e
	}
	e.open++
	if state == connUnauthenticated {
		e.unauthenticated++
	}
	s.key = key
	l.mu.Unlock()
	return ""
}

// Release frees the place; only the first call counts.
func (s *Slot) Release() {
	if s.l.transition(s, connClosed) {
		<-s.l.slots
		s.l.onClose()
	}
}

// transition moves s to state to (connAuthenticated or connClosed) once,
// and moves its address's counts with it, under one lock: a connection
// closing while it authenticates must not count twice or against a newer
// connection from its address. It reports whether s was still open.
func (l *ConnLimiter) transition(s *Slot, to int32) bool {
	if l.perIP == nil {
		for {
			from := s.state.Load()
			if from == connClosed || from == to {
				return false
			}
			if s.state.CompareAndSwap(from, to) {
				return true
			}
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	from := s.state.Load()
	if from == connClosed || from == to {
		return false
	}
	s.state.Store(to)
	if !s.key.IsValid() {
		return true
	}
	e := l.perIP[s.key]
	if e == nil {
		return true
	}
	if from == connUnauthenticated {
		e.unauthenticated--
	}
	if to == connClosed {
		e.open--
		if e.open <= 0 {
			delete(l.perIP, s.key)
		}
	}
	return true
}

// limitConn frees its listener slot on the first Close. net/http and
// crypto/tls may both close a connection, so later Closes only reach the
// underlying connection (which reports it is already closed).
type limitConn struct {
	net.Conn
	slot *Slot
}

const (
	connUnauthenticated int32 = iota
	connAuthenticated
	connClosed
)

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.slot.Release()
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
			return WithSlot(ctx, lc.slot)
		}
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = nc.NetConn()
	}
	return ctx
}

// WithSlot returns ctx carrying s, for MarkAuthenticated: the QUIC
// listener's connections carry their slot this way.
func WithSlot(ctx context.Context, s *Slot) context.Context {
	return context.WithValue(ctx, connKey{}, s)
}

// MarkAuthenticated tells the listener that the connection carried by ctx
// (see WithConn, WithSlot) has carried an authenticated request: it no
// longer counts against its address's unauthenticated cap. It is cheap
// after the first call and does nothing for a context without a
// connection.
func MarkAuthenticated(ctx context.Context) {
	if s, ok := ctx.Value(connKey{}).(*Slot); ok && s.state.Load() == connUnauthenticated {
		s.l.transition(s, connAuthenticated)
	}
}

func orNoop(f func()) func() {
	if f == nil {
		return noop
	}
	return f
}
