// Package server runs Pinaka's listeners: the TLS proxy listener (HTTP/2 and
// HTTP/1.1 by ALPN) and the admin listener (metrics, health), with
// certificate reload and graceful drain.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/h2srv"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// Server owns the listeners of one Pinaka process.
type Server struct {
	cfg     *config.Config
	log     *slog.Logger
	certs   *CertStore
	proxy   *proxy.Proxy
	metrics *metrics.Metrics

	proxySrv *http.Server
	h2       *h2srv.Server // HTTP/2, handed its connections by tlsLn
	adminSrv *http.Server
	proxyLn  net.Listener // TCP, with the connection limits and the stall guard
	tlsLn    *tlsAcceptor // TLS on top: what the HTTP server accepts from
	adminLn  net.Listener
	ready    atomic.Bool
	wg       sync.WaitGroup
	stalls   *stallGuard
	// connLimit is MAX_CONNECTIONS and the per-address caps, shared by the
	// TCP listener and QUIC.
	connLimit *ratelimit.ConnLimiter
	// clientCerts, when set, asks clients for certificates
	// (CLIENT_CERT_MODE optional or require).
	clientCerts *clientCerts
	// h3 is the HTTP/3 listener (HTTP3_ENABLED), nil when off.
	h3 *h3Listener
}

// New prepares a Server; Listen opens its sockets.
func New(cfg *config.Config, log *slog.Logger, certs *CertStore, p *proxy.Proxy, m *metrics.Metrics) *Server {
	s := &Server{cfg: cfg, log: log, certs: certs, proxy: p, metrics: m}
	initLabelSets(m)
	if leaf := certs.Leaf(); leaf != nil {
		m.CertNotAfter.Set(float64(leaf.NotAfter.Unix()))
	}
	s.proxySrv = &http.Server{
		Handler:           closeAmbiguous(p),
		TLSConfig:         certs.TLSConfig(cfg.TLSPostQuantum),
		ReadHeaderTimeout: cfg.HeaderReadTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    cfg.MaxHeaderBytes,
		// HTTP/2 connections never reach net/http: the TLS acceptor hands
		// them to our engine (s.h2); an empty map keeps net/http from
		// starting an HTTP/2 server of its own.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		// Requests find their connection's listener slot through their
		// context, to mark it authenticated (per-address caps), and an
		// HTTP/1.1 connection's framing watch (see h1Conn).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if h1, ok := c.(*h1Conn); ok {
				ctx = context.WithValue(ctx, h1ConnKey{}, h1)
			}
			return ratelimit.WithConn(ctx, c)
		},
	}
	s.h2 = newH2Server(cfg, log, p, m)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	// Profiles, for measuring before tuning. The admin listener is
	// loopback-only by default; expose it with care.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/profile", capSeconds(pprof.Profile))
	mux.HandleFunc("GET /debug/pprof/trace", capSeconds(pprof.Trace))
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	s.adminSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return s
}

// maxProfileSeconds caps ?seconds= of the profiling endpoints: a profile
// holds a goroutine and a buffer for as long as it runs, and only one CPU
// profile can run at a time.
const maxProfileSeconds = 60

// capSeconds refuses a profile longer than maxProfileSeconds (or a
// malformed duration) with 400 instead of running it.
func capSeconds(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if v := r.URL.Query().Get("seconds"); v != "" {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil || n <= 0 || n > maxProfileSeconds || math.IsNaN(n) {
				http.Error(w, fmt.Sprintf("seconds must be a number in (0, %d]", maxProfileSeconds), http.StatusBadRequest)
				return
			}
		}
		h(w, r)
	}
}

// writeStallTimeout closes an HTTP/2 connection whose client has taken no
// bytes for this long while the proxy had some to send: one stalled reader
// would otherwise hold every stream of the connection.
const writeStallTimeout = 60 * time.Second

// Listen opens the proxy and admin sockets.
func (s *Server) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.ListenAddr())
	if err != nil {
		return fmt.Errorf("listening on %s (PROXY_BIND:PROXY_PORT): %w", s.cfg.ListenAddr(), err)
	}
	s.proxyLn = s.stackListener(ln)
	// TLS as http.Server.ServeTLS sets it up, but with the handshake ours
	// (see tlsAcceptor): h2 goes to our engine, http/1.1 to net/http.
	tlsCfg := s.proxySrv.TLSConfig.Clone()
	tlsCfg.NextProtos = []string{"h2", "http/1.1"}
	handshakeTimeout := s.handshakeTimeout()
	if s.clientCerts != nil {
		s.clientCerts.apply(tlsCfg)
	}
	s.tlsLn = newTLSAcceptor(s.proxyLn, tlsCfg, handshakeTimeout, s.log)
	if s.clientCerts != nil {
		s.tlsLn.failed = func(c net.Conn, err error) { s.clientCerts.handshakeFailed(c.RemoteAddr(), err) }
	}
	s.tlsLn.h2 = func(tc *tls.Conn) {
		if kernelStallGuard {
			if err := guardWriteStall(tc, writeStallTimeout); err != nil {
				s.log.Warn("HTTP/2 connection without a write-stall timeout", "err", err)
			}
		}
		s.h2.ServeConn(tc)
	}
	if s.cfg.AdminAddr != "" && s.cfg.AdminAddr != "off" {
		aln, err := net.Listen("tcp", s.cfg.AdminAddr)
		if err != nil {
			s.tlsLn.Close() // and the listeners beneath it
			s.stalls.close()
			return fmt.Errorf("listening on %s (ADMIN_ADDR): %w", s.cfg.AdminAddr, err)
		}
		s.adminLn = aln
	}
	if s.cfg.HTTP3Enabled {
		if err := s.listenH3(); err != nil {
			s.tlsLn.Close()
			s.stalls.close()
			if s.adminLn != nil {
				s.adminLn.Close()
			}
			return err
		}
	}
	return nil
}

// stackListener wraps the proxy's TCP listener, from the socket up: the
// connection caps (a connection refused there costs nothing more), the
// write-stall guard, then write batching, so that the relay's batched
// flushes pass the stall guard too. TLS goes on top (tlsAcceptor).
func (s *Server) stackListener(ln net.Listener) net.Listener {
	s.connLimit = ratelimit.NewConnLimiter(ratelimit.ListenerLimits{
		Max:                  s.cfg.MaxConnections,
		PerIP:                s.cfg.MaxConnectionsPerIP,
		UnauthenticatedPerIP: s.cfg.MaxUnauthenticatedConnectionsPerIP,
		OnAccept:             s.metrics.ActiveConnections.Inc,
		OnClose:              s.metrics.ActiveConnections.Dec,
		OnRefused:            func(reason string) { s.metrics.ConnectionsRefused.WithLabelValues(reason).Inc() },
	})
	limited := s.connLimit.Listener(ln)
	s.stalls = newStallGuard(stallLimit(s.cfg), s.metrics.WriteStalls.Inc)
	return proxy.BatchListener(s.stalls.listener(limited))
}

// stallLimit: a write without progress for the tunnel idle timeout (at
// most writeStallTimeout) is a stream or tunnel without progress.
func stallLimit(cfg *config.Config) time.Duration {
	if t := cfg.TunnelIdleTimeout; t > 0 && t < writeStallTimeout {
		return t
	}
	return writeStallTimeout
}

// ProxyAddr is the proxy listener's address (useful with port 0).
func (s *Server) ProxyAddr() net.Addr { return s.proxyLn.Addr() }

// AdminAddr is the admin listener's address, or nil.
func (s *Server) AdminAddr() net.Addr {
	if s.adminLn == nil {
		return nil
	}
	return s.adminLn.Addr()
}

// Serve starts serving on the opened sockets and returns at once.
func (s *Server) Serve() {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.proxySrv.Serve(s.tlsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("proxy listener stopped", "err", err)
		}
	}()
	if s.h3 != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.h3.serve(s.log)
		}()
	}
	if s.adminLn != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.adminSrv.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("admin listener stopped", "err", err)
			}
		}()
	}
	s.ready.Store(true)
}

// Reload re-reads the certificate; on failure the old one stays in use.
func (s *Server) Reload() error {
	if err := s.certs.Reload(); err != nil {
		s.log.Error("certificate reload refused; keeping the current certificate", "err", err)
		return err
	}
	leaf := s.certs.Leaf()
	s.metrics.CertNotAfter.Set(float64(leaf.NotAfter.Unix()))
	s.log.Info("certificate reloaded", "subject", leaf.Subject.String(), "not_after", leaf.NotAfter)
	return nil
}

// Shutdown drains: it stops accepting, sends GOAWAY to HTTP/2 clients, lets
// requests and tunnels (hijacked ones too) finish until ctx is done, then
// closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.ready.Store(false)
	s.log.Info("draining", "active", s.proxy.ActiveRequests())
	var shutErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		shutErr = errors.Join(s.proxySrv.Shutdown(ctx), s.h2.Shutdown(ctx), s.shutdownH3(ctx))
	}()
	drainErr := s.proxy.Drain(ctx, s.closeProxyConns)
	if s.h3 != nil {
		s.h3.drained(ctx)
	}
	<-done
	if shutErr != nil { // Drain closed the connections already if it hit its deadline
		s.closeProxyConns()
	}
	actx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.adminSrv.Shutdown(actx)
	s.wg.Wait()
	if s.stalls != nil {
		s.stalls.close()
	}
	s.proxy.Close()
	return errors.Join(drainErr, shutErrIfNotDeadline(shutErr))
}

// closeProxyConns closes every proxy connection at once.
func (s *Server) closeProxyConns() {
	s.proxySrv.Close()
	s.h2.Close()
	if s.h3 != nil {
		s.h3.close()
	}
}

func shutErrIfNotDeadline(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return nil // reported by Drain with a count
	}
	return err
}

// handshakeTimeout bounds a TLS handshake, over TCP and QUIC alike:
// HEADER_READ_TIMEOUT, or 10s when that is off.
func (s *Server) handshakeTimeout() time.Duration {
	if t := s.cfg.HeaderReadTimeout; t > 0 {
		return t
	}
	return 10 * time.Second
}
