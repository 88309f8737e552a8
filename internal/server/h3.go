package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// HTTP/3 is quic-go's http3 engine in front of the same proxy handler as
// HTTP/1.1 and HTTP/2. These are its QUIC limits; see docs/OPERATIONS.md
// ("HTTP/3") for why each value.
const (
	// h3MaxUniStreams: a client needs three (control, QPACK encoder and
	// decoder); a few more for extensions, and no room to hoard.
	h3MaxUniStreams = 8
	// h3RetryRate and h3RetryBurst: new connections per second from
	// unvalidated addresses served without a Retry round trip. Beyond it
	// every new connection must prove its address first (RFC 9000 §8.1.2),
	// so spoofed Initials cost the node a Retry packet, no handshake and no
	// state. h3MaxUnvalidated caps the handshakes in progress too.
	h3RetryRate  = 200
	h3RetryBurst = 400
	// h3KeepAlive keeps NAT bindings of idle tunnels open: UDP mappings
	// time out after ~30 s on many routers.
	h3KeepAlive = 15 * time.Second
)

// h3Listener is the QUIC side of the proxy listener.
type h3Listener struct {
	udp  net.PacketConn
	tr   *quic.Transport
	ln   *quic.Listener
	srv  *http3.Server
	lim  *h3Limits
	done chan struct{} // closed when shutdown has seen every connection end
	once sync.Once
}

// listenH3 opens UDP PROXY_BIND:PROXY_PORT for HTTP/3 (HTTP3_ENABLED).
func (s *Server) listenH3() error {
	udp, err := net.ListenPacket("udp", s.cfg.ListenAddr())
	if err != nil {
		return fmt.Errorf("listening on UDP %s (PROXY_BIND:PROXY_PORT, HTTP3_ENABLED): %w", s.cfg.ListenAddr(), err)
	}
	h := &h3Listener{udp: udp, done: make(chan struct{})}
	limits := s.newH3Limits()
	h.tr = &quic.Transport{
		Conn: udp,
		// Retry (address validation) once new connections arrive faster
		// than h3RetryRate or too many handshakes are unvalidated, and
		// the node's connection caps: see h3limits.go.
		VerifySourceAddress: limits.needRetry,
		ConnContext:         limits.connContext,
	}
	ln, err := h.tr.Listen(http3.ConfigureTLSConfig(s.h3ClientTLS(s.h3TLSConfig())), s.quicConfig())
	if err != nil {
		_ = udp.Close()
		return fmt.Errorf("starting QUIC on UDP %s: %w", s.cfg.ListenAddr(), err)
	}
	h.ln, h.lim = ln, limits
	h.srv = &http3.Server{
		Handler:        h3Handler(s.proxy),
		MaxHeaderBytes: s.cfg.MaxHeaderBytes,
		IdleTimeout:    s.cfg.IdleTimeout,
		// HTTP Datagrams (RFC 9297, SETTINGS_H3_DATAGRAM) for CONNECT-UDP
		// (RFC 9298); quicConfig enables the QUIC DATAGRAM frames under them.
		EnableDatagrams: true,
		Logger:          slog.New(s.log.Handler()).With("listener", "http3"),
	}
	s.h3 = h
	return nil
}

// h3TLSConfig is the TCP listener's certificate source (so a SIGHUP
// reload applies to new QUIC handshakes too) with QUIC's TLS 1.3.
func (s *Server) h3TLSConfig() *tls.Config {
	c := s.certs.TLSConfig(s.cfg.TLSPostQuantum)
	c.MinVersion = tls.VersionTLS13
	c.CipherSuites = nil
	return c
}

// quicConfig sets every QUIC limit explicitly rather than trusting the
// library's defaults to stay what they are.
func (s *Server) quicConfig() *quic.Config {
	handshake := s.handshakeTimeout()
	return &quic.Config{
		HandshakeIdleTimeout: handshake,
		// A connection that has sent nothing for this long is gone. Idle
		// tunnels of a live client stay because the node sends keep-alives
		// (h3KeepAlive) that the client acknowledges; a connection without
		// requests is closed by the HTTP/3 layer after IDLE_TIMEOUT.
		MaxIdleTimeout:        max(s.cfg.IdleTimeout, 30*time.Second),
		KeepAlivePeriod:       h3KeepAlive,
		MaxIncomingStreams:    int64(s.cfg.MaxConcurrentStreams),
		MaxIncomingUniStreams: h3MaxUniStreams,
		// Receive windows (what a client can make the node buffer before
		// the relay reads it): quic-go's defaults, stated. Windows start
		// small and grow only while the relay drains them quickly, so a
		// client facing a slow origin holds 512 KiB per stream and 768 KiB
		// per connection; a fast tunnel grows to 6 MiB, which a single
		// tunnel needs to fill a fast long path.
		InitialStreamReceiveWindow:     512 << 10,
		MaxStreamReceiveWindow:         6 << 20,
		InitialConnectionReceiveWindow: 768 << 10,
		MaxConnectionReceiveWindow:     15 << 20,
		// No 0-RTT: early data can be replayed, and a replayed POST or
		// CONNECT through a proxy is not harmless.
		Allow0RTT: false,
		// QUIC DATAGRAM frames (RFC 9221), which carry CONNECT-UDP's
		// payloads. A datagram is never larger than a packet, and quic-go
		// queues at most 32 unread ones per request stream (dropping the
		// rest), so they add no unbounded buffer.
		EnableDatagrams: true,
	}
}

// serve runs the HTTP/3 server until Shutdown or Close.
func (h *h3Listener) serve(log *slog.Logger) {
	log.Info("HTTP/3 listening", "udp", h.udp.LocalAddr().String())
	if err := h.srv.ServeListener(h3AdmitListener{Listener: h.ln, limits: h.lim}); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("HTTP/3 listener stopped", "err", err)
	}
}

// shutdown sends GOAWAY and waits for the connections to end, or ctx.
func (h *h3Listener) shutdown(ctx context.Context) error {
	err := h.srv.Shutdown(ctx)
	h.once.Do(func() { close(h.done) })
	h.closeSocket()
	return err
}

// close closes every connection at once (CONNECTION_CLOSE).
func (h *h3Listener) close() {
	_ = h.srv.Close()
	h.closeSocket()
}

func (h *h3Listener) closeSocket() {
	_ = h.ln.Close()
	_ = h.tr.Close()
	_ = h.udp.Close()
}

// H3Addr is the HTTP/3 listener's UDP address, or nil when it is off.
func (s *Server) H3Addr() net.Addr {
	if s.h3 == nil {
		return nil
	}
	return s.h3.udp.LocalAddr()
}

// h3Handler tells the proxy core what quic-go's request does not carry
// (httpx.Info) and lets CONNECT streams be detached.
//
// quic-go v0.65.0 parses :scheme but does not pass it on, so the scheme
// is inferred: a request whose :authority is the name the client asked
// TLS for (SNI) is for the proxy itself; any other is forwarded as http,
// which is what a client sending a request for a foreign origin to a
// proxy means (https origins are reached with CONNECT). See
// docs/DESIGN.md.
func h3Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := &httpx.Info{}
		switch {
		case r.Method == http.MethodConnect && r.Proto != "HTTP/3.0":
			// Extended CONNECT: quic-go puts :protocol in Proto. Without
			// :scheme, a WebSocket is bootstrapped over TLS (wss), never
			// downgraded to plain text.
			i.Protocol, i.Scheme = r.Proto, "https"
		case r.Method == http.MethodConnect:
		case h3ForSelf(r):
			i.Scheme = "https"
		default:
			i.Scheme = "http"
		}
		r = r.WithContext(httpx.WithInfo(r.Context(), i))
		r.Proto = "HTTP/3.0"
		if r.Method == http.MethodConnect {
			w = &h3Writer{ResponseWriter: w}
		}
		h.ServeHTTP(w, r)
	})
}

// h3ForSelf: the request's host is the name the client reached the proxy
// by (SNI), or the address it reached it at. Anything else that names the
// proxy is refused by the egress policy (own addresses) when forwarded.
func h3ForSelf(r *http.Request) bool {
	host, port := r.Host, "443"
	if h, p, err := net.SplitHostPort(host); err == nil {
		host, port = h, p
	}
	if r.TLS != nil && r.TLS.ServerName != "" && strings.EqualFold(host, r.TLS.ServerName) {
		return true
	}
	local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if !ok {
		return false
	}
	lh, lp, err := net.SplitHostPort(local.String())
	return err == nil && lp == port && net.ParseIP(strings.Trim(host, "[]")).Equal(net.ParseIP(lh))
}

// h3Writer adds httpx.Detacher to quic-go's ResponseWriter, for tunnels,
// and httpx.DatagramSettings, for CONNECT-UDP.
type h3Writer struct {
	http.ResponseWriter
}

var (
	_ httpx.DatagramSettings = (*h3Writer)(nil)
	_ httpx.Datagrams        = (*h3Stream)(nil)
)

// Unwrap lets http.ResponseController reach quic-go's writer.
func (w *h3Writer) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *h3Writer) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// ClientDatagrams reports whether the client's SETTINGS enabled HTTP
// Datagrams (httpx.DatagramSettings). A client sends its SETTINGS first
// thing on its control stream, so they have almost always arrived before
// its first request; ctx bounds the wait for the others.
func (w *h3Writer) ClientDatagrams(ctx context.Context) bool {
	st, ok := w.ResponseWriter.(http3.Settingser)
	if !ok {
		return false
	}
	select {
	case <-st.ReceivedSettings():
	case <-ctx.Done():
		return false
	}
	return st.Settings().EnableDatagrams
}

// Detach sends the response header and takes the stream over: quic-go
// leaves a stream taken with HTTPStream open when the handler returns.
func (w *h3Writer) Detach() (httpx.Stream, error) {
	hs, ok := w.ResponseWriter.(http3.HTTPStreamer)
	if !ok {
		return nil, errors.New("http3: the ResponseWriter cannot hand over its stream")
	}
	st, err := hs.HTTPStream()
	if err != nil {
		return nil, fmt.Errorf("taking over the HTTP/3 stream: %w", err)
	}
	return &h3Stream{st: st}, nil
}

// HTTP/3 error codes (RFC 9114 §8.1) a tunnel's stream ends with.
const (
	h3NoError          = 0x100
	h3RequestCancelled = 0x10c
)

// h3Stream is a detached HTTP/3 stream as an httpx.Stream. quic-go offers
// no readiness callback, so ReadReady waits in a goroutine of its own
// (Peek, which consumes nothing): an idle HTTP/3 tunnel holds that small
// goroutine instead of the relay's larger one and its buffers.
type h3Stream struct {
	st         *http3.Stream
	wroteFinal atomic.Bool // our FIN is queued (CloseWrite)
}

func (s *h3Stream) Read(p []byte) (int, error)  { return s.st.Read(p) }
func (s *h3Stream) Write(p []byte) (int, error) { return s.st.Write(p) }

func (s *h3Stream) CloseWrite() error {
	s.wroteFinal.Store(true)
	return s.st.Close()
}

func (s *h3Stream) Close() error {
	if !s.wroteFinal.Load() {
		s.st.CancelWrite(h3RequestCancelled)
	}
	s.st.CancelRead(h3NoError)
	return nil
}

func (s *h3Stream) Abort() {
	s.st.CancelWrite(h3RequestCancelled)
	s.st.CancelRead(h3RequestCancelled)
}

func (s *h3Stream) SetReadDeadline(t time.Time) error { return s.st.SetReadDeadline(t) }

// SendDatagram and ReceiveDatagram make h3Stream an httpx.Datagrams:
// quic-go adds and strips the quarter stream id (RFC 9297 §2.1), and
// copies b before it returns.
func (s *h3Stream) SendDatagram(b []byte) error {
	err := s.st.SendDatagram(b)
	if _, ok := errors.AsType[*quic.DatagramTooLargeError](err); ok {
		return fmt.Errorf("%w: %w", httpx.ErrDatagramTooLarge, err)
	}
	return err
}

func (s *h3Stream) ReceiveDatagram(ctx context.Context) ([]byte, error) {
	return s.st.ReceiveDatagram(ctx)
}

func (s *h3Stream) ReadReady(f func()) bool {
	go func() {
		var b [1]byte
		_, _ = s.st.QUICStream().Peek(b[:])
		f()
	}()
	return true
}

// shutdownH3 is h3.shutdown when HTTP/3 is on.
func (s *Server) shutdownH3(ctx context.Context) error {
	if s.h3 == nil {
		return nil
	}
	return s.h3.shutdown(ctx)
}

// h3Linger is how long QUIC connections may stay after their last request
// or tunnel ended during a drain, before they are closed: long enough for
// the last stream data and FINs to be delivered and acknowledged (a
// CONNECTION_CLOSE discards what is still in flight), short enough that
// clients which keep their connection open after GOAWAY do not hold the
// drain until SHUTDOWN_TIMEOUT.
const h3Linger = 2 * time.Second

// drained is called once every request and tunnel has ended: connections
// still open get h3Linger (within ctx) to finish delivery, then are closed.
func (h *h3Listener) drained(ctx context.Context) {
	t := time.NewTimer(h3Linger)
	defer t.Stop()
	select {
	case <-h.done:
	case <-t.C:
	case <-ctx.Done():
	}
	h.close()
}
