// Package h2srv is Pinaka's HTTP/2 server: the engine behind ALPN "h2" on
// the proxy listener. It is written for a proxy, on x/net/http2's Framer
// (reading frames) and hpack (header compression), with the semantics of
// RFC 9113 and RFC 8441, and hands every request to an http.Handler with a
// real *http.Request and http.ResponseWriter, as net/http does, so the
// proxy core does not know which engine carried a request.
//
// Each connection has two goroutines: its reader (conn.serve), which parses
// every frame and never blocks on a stream, and its writer (conn.writeLoop),
// which gathers the frames of all streams into large TLS writes. A stream
// has a goroutine only while its handler runs. Everything a client can make
// the server hold is bounded: streams (SETTINGS_MAX_CONCURRENT_STREAMS),
// header blocks (MaxHeaderBytes), buffered request bodies (the windows we
// grant, reserved from a node-wide budget), queued control frames (the
// reader waits for the writer), and frames that do no work (a credit bucket
// per connection; see frameBudget).
package h2srv

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// Config sets up a Server. Zero values take the defaults named.
type Config struct {
	Handler http.Handler
	// BaseContext gives a connection's base context (the proxy attaches
	// its per-address accounting here); nil: context.Background.
	BaseContext func(net.Conn) context.Context

	MaxConcurrentStreams uint32        // 250
	MaxHeaderBytes       int           // 32 KiB: SETTINGS_MAX_HEADER_LIST_SIZE
	HeaderReadTimeout    time.Duration // 10 s: preface, and a header block split over frames
	IdleTimeout          time.Duration // 120 s without a stream: GOAWAY
	// WriteStallTimeout resets a stream that has had bytes to send and no
	// flow-control window for this long (60 s).
	WriteStallTimeout time.Duration
	// StreamWindow is SETTINGS_INITIAL_WINDOW_SIZE (1 MiB): the request
	// bytes one stream may have in flight and buffered.
	StreamWindow uint32
	// ConnWindow is where a connection's receive window starts (1 MiB);
	// it grows to MaxConnWindow (16 MiB) while the window, not the
	// consumer, limits an upload. Both come out of BodyBudget.
	ConnWindow, MaxConnWindow uint32
	// BodyBudget bounds, node-wide, the request-body bytes all connections
	// may have granted above the protocol's initial 65,535 (256 MiB).
	BodyBudget int64
	// KeepaliveInterval: with streams open and nothing read for this long,
	// PING; no frame for KeepaliveTimeout more closes (30 s, 15 s).
	KeepaliveInterval, KeepaliveTimeout time.Duration

	// Batch, when set, returns functions that gather the TLS records of
	// one flush of the writer into one write(2) on c's socket.
	Batch func(c net.Conn) (start func(), flush func() error)

	Log   *slog.Logger
	Hooks Hooks
}

// Hooks report what the engine does, for metrics. Every label they pass
// comes from a fixed set. Nil hooks are skipped.
type Hooks struct {
	GoAway       func(reason string)    // a GOAWAY we sent with an error: "protocol", "enhance_your_calm", ...
	StreamError  func(reason string)    // a stream we reset: "malformed", "refused", "flow_control", ...
	Unproductive func(frameType string) // a frame charged against the flood budget
	BodyBuffered func(delta int64)      // request-body bytes buffered, node-wide
	Reserved     func(delta int64)      // budget reserved for connection windows
}

func (c *Config) defaults() {
	setDefault(&c.MaxConcurrentStreams, 250)
	setDefault(&c.MaxHeaderBytes, 32<<10)
	setDefault(&c.HeaderReadTimeout, 10*time.Second)
	setDefault(&c.IdleTimeout, 120*time.Second)
	setDefault(&c.WriteStallTimeout, 60*time.Second)
	setDefault(&c.StreamWindow, 1<<20)
	setDefault(&c.ConnWindow, 1<<20)
	setDefault(&c.MaxConnWindow, 16<<20)
	setDefault(&c.BodyBudget, 256<<20)
	setDefault(&c.KeepaliveInterval, 30*time.Second)
	setDefault(&c.KeepaliveTimeout, 15*time.Second)
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	c.StreamWindow = min(c.StreamWindow, maxWindow)
	c.MaxConnWindow = min(max(c.MaxConnWindow, c.ConnWindow), maxWindow)
}

func setDefault[T comparable](v *T, d T) {
	var zero T
	if *v == zero {
		*v = d
	}
}

// Server serves HTTP/2 connections handed to it by ServeConn.
type Server struct {
	cfg Config

	// httpSrv stands for this server in request contexts
	// (http.ServerContextKey); only its presence is used.
	httpSrv *http.Server

	dateCache atomic.Pointer[dateText]
	workers   *workers // handler goroutines (workers.go)

	// budget is what is left of Config.BodyBudget.
	budget atomic.Int64

	mu       sync.Mutex
	conns    map[*conn]struct{}
	draining bool
	drained  chan struct{} // closed when draining and the last conn is gone
}

// New returns a Server for cfg.
func New(cfg Config) *Server {
	cfg.defaults()
	s := &Server{cfg: cfg, conns: make(map[*conn]struct{}), drained: make(chan struct{}), httpSrv: &http.Server{}, workers: newWorkers()}
	s.budget.Store(cfg.BodyBudget)
	return s
}

// ServeConn serves one connection that negotiated h2 until it ends, and
// closes it. tc must have completed its TLS handshake.
func (s *Server) ServeConn(tc *tls.Conn) {
	c := newConn(s, tc)
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		c.refuse() // GOAWAY(0): the client retries on another connection
		return
	}
	s.conns[c] = struct{}{}
	s.workers.conns.Add(1)
	s.mu.Unlock()
	defer s.forget(c)
	c.serve()
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	s.workers.connEnded()
	if s.draining && len(s.conns) == 0 {
		select {
		case <-s.drained:
		default:
			close(s.drained)
		}
	}
}

// Shutdown stops taking streams: every connection gets GOAWAY with the
// last stream it will serve, and closes when its streams are done. It
// returns when they all have, or with ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	for c := range s.conns {
		c.startDrain()
	}
	if len(s.conns) == 0 {
		select {
		case <-s.drained:
		default:
			close(s.drained)
		}
	}
	s.mu.Unlock()
	select {
	case <-s.drained:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes every connection at once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.draining = true
	cs := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		c.closeWithError(errServerClosed)
	}
	return nil
}

// Conns is the number of connections being served.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// date is the Date header value for now, formatted once per second for
// every response of the node.
func (s *Server) date() string {
	now := time.Now()
	if d := s.dateCache.Load(); d != nil && d.unix == now.Unix() {
		return d.text
	}
	d := &dateText{unix: now.Unix(), text: now.UTC().Format(http.TimeFormat)}
	s.dateCache.Store(d)
	return d.text
}

type dateText struct {
	unix int64
	text string
}

// BudgetInUse is how much of Config.BodyBudget connections hold.
func (s *Server) BudgetInUse() int64 { return s.cfg.BodyBudget - s.budget.Load() }

// reserve takes up to n bytes of the node budget, at least min (else none),
// and returns how much it took.
func (s *Server) reserve(n, least int64) int64 {
	for {
		left := s.budget.Load()
		take := min(n, left)
		if take < least || take <= 0 {
			return 0
		}
		if s.budget.CompareAndSwap(left, left-take) {
			if h := s.cfg.Hooks.Reserved; h != nil {
				h(take)
			}
			return take
		}
	}
}

func (s *Server) unreserve(n int64) {
	if n <= 0 {
		return
	}
	s.budget.Add(n)
	if h := s.cfg.Hooks.Reserved; h != nil {
		h(-n)
	}
}

var (
	errServerClosed = errors.New("http2: server closed")
	// ErrStreamReset is the cause of a request context cancelled because
	// the client reset the stream.
	ErrStreamReset = errors.New("http2: stream reset by the client")
	// ErrWriteStalled is returned by a Write that waited longer than
	// WriteStallTimeout for flow-control window, and is the cause of the
	// request context's cancellation then.
	ErrWriteStalled = httpx.ErrWriteStalled
	errStreamClosed = errors.New("http2: stream closed")
	errHandlerDone  = errors.New("http2: handler returned")
	errGoneAway     = errors.New("http2: client went away")
)
