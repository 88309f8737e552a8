package server

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// stallGuard closes client connections whose writes have made no progress
// for limit: a client that stops reading while it keeps the connection
// alive otherwise holds it, its streams and their upstream connections
// forever. TCP_USER_TIMEOUT (guardWriteStall) does not cover it: every
// segment the client sends (an HTTP/2 PING, say) resets the kernel's
// zero-window probe clock. And a write deadline per write costs timer
// updates on the data path, so instead each connection notes when its
// pending write began (one clock read and two atomic stores per write)
// and one goroutine looks at all of them every limit/4.
//
// A write that has been pending for limit is not enough: the kernel wakes
// a blocked writer only once much of the send buffer has drained, so a
// client reading slowly but steadily has long pending writes too. Progress
// is the socket's unsent-bytes count (TIOCOUTQ) going down between two
// looks; only a connection without progress for limit is closed.
type stallGuard struct {
	limit    time.Duration
	base     time.Time // monotonic origin
	onStall  func()
	mu       sync.Mutex
	conns    map[*stallConn]struct{}
	stopOnce sync.Once
	stop     context.CancelFunc
}

func newStallGuard(limit time.Duration, onStall func()) *stallGuard {
	ctx, cancel := context.WithCancel(context.Background())
	g := &stallGuard{limit: limit, base: time.Now(), onStall: onStall, conns: make(map[*stallConn]struct{}), stop: cancel}
	go g.run(ctx)
	return g
}

func (g *stallGuard) run(ctx context.Context) {
	t := time.NewTicker(max(g.limit/4, 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			g.sweep()
		}
	}
}

// sweep closes every connection whose pending write has made no progress
// for limit.
func (g *stallGuard) sweep() {
	now := time.Since(g.base)
	var pending, stalled []*stallConn
	g.mu.Lock()
	for c := range g.conns {
		if c.writingSince.Load() != 0 {
			pending = append(pending, c)
		} else {
			c.outqSeen = -1
		}
	}
	g.mu.Unlock()
	for _, c := range pending {
		start := max(time.Duration(c.writingSince.Load()), c.progressAt)
		if q, ok := socketOutq(c.Conn); ok {
			if c.outqSeen >= 0 && q < c.outqSeen {
				c.progressAt, start = now, now // bytes left since the last look
			}
			c.outqSeen = q
		}
		if since := c.writingSince.Load(); since != 0 && now-start >= g.limit {
			stalled = append(stalled, c)
		}
	}
	for _, c := range stalled {
		g.onStall()
		c.Close() // fails the blocked write; the engine then ends its streams
	}
}

func (g *stallGuard) close() { g.stopOnce.Do(g.stop) }

// listener wraps l so that its connections are watched.
func (g *stallGuard) listener(l net.Listener) net.Listener { return stallListener{l, g} }

type stallListener struct {
	net.Listener
	g *stallGuard
}

func (l stallListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	sc := &stallConn{Conn: c, g: l.g, outqSeen: -1}
	l.g.mu.Lock()
	l.g.conns[sc] = struct{}{}
	l.g.mu.Unlock()
	return sc, nil
}

type stallConn struct {
	net.Conn
	g *stallGuard
	// writingSince is when the pending Write began, in nanoseconds after
	// g.base (odd, so never 0), or 0 when no Write is pending.
	writingSince atomic.Int64
	closeOnce    sync.Once
	// Seen by the sweeping goroutine alone: the unsent bytes at its last
	// look (-1: no write was pending) and when they last went down.
	outqSeen   int
	progressAt time.Duration
}

func (c *stallConn) Write(b []byte) (int, error) {
	c.writingSince.Store(int64(time.Since(c.g.base)) | 1)
	n, err := c.Conn.Write(b)
	c.writingSince.Store(0)
	return n, err
}

func (c *stallConn) Close() error {
	c.closeOnce.Do(func() {
		c.g.mu.Lock()
		delete(c.g.conns, c)
		c.g.mu.Unlock()
	})
	return c.Conn.Close()
}

// CloseWrite and NetConn keep what the wrapped connection offers visible
// (half-close for tunnels, the socket for the relay's parking).
func (c *stallConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

func (c *stallConn) NetConn() net.Conn { return c.Conn }
