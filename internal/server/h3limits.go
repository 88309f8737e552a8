package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"golang.org/x/time/rate"

	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// QUIC's share of the node's connection limits. A QUIC connection holds
// state from its first Initial packet on, before anything proves that the
// packet's source address is the sender's; these rules keep what such
// packets can make the node hold bounded, and put QUIC connections under
// the same MAX_CONNECTIONS and per-address caps as TCP ones (see
// docs/OPERATIONS.md, "HTTP/3").
//
//   - Every QUIC connection takes a place of the node's connection cap
//     (ratelimit.ConnLimiter, shared with TCP) at its first Initial.
//   - Handshakes from addresses not yet validated are capped at
//     h3MaxUnvalidated(MAX_CONNECTIONS); beyond it, and whenever new
//     connections arrive faster than h3RetryRate, a new connection must
//     first answer a Retry (RFC 9000 §8.1.2), which costs the node one
//     stateless packet. A spoofed-source flood so holds at most that many
//     places, each for at most the handshake timeout, and the rest of the
//     cap stays for clients that can receive packets.
//   - The per-address caps count a connection once its address is
//     validated: at its first packet when it came with a Retry token (as
//     TCP counts at accept), else when its handshake completes, which
//     proves the address too. A spoofed source can thus never use up a
//     real client's per-address budget. Before a handshake the node asks
//     whether the address is at a cap already (Crowded), so a client at
//     its cap costs no handshake.

// h3MaxUnvalidated is how many handshakes from unvalidated addresses may
// be in progress at once: a quarter of MAX_CONNECTIONS, at most
// h3RetryBurst.
func h3MaxUnvalidated(maxConns int) int64 {
	return int64(max(1, min(maxConns/4, h3RetryBurst)))
}

// h3Limits is the QUIC listener's admission state.
type h3Limits struct {
	conns       *ratelimit.ConnLimiter
	retry       *rate.Limiter
	unvalidated atomic.Int64 // handshakes in progress from unvalidated addresses
	maxUnval    int64
	retries     prometheus.Counter
	refused     func(reason string)
	// handshakeFailed, when set (client certificates), is told about each
	// handshake that failed, with its cause.
	handshakeFailed func(net.Addr, error)
}

func (s *Server) newH3Limits() *h3Limits {
	l := &h3Limits{
		conns:    s.connLimit,
		retry:    rate.NewLimiter(h3RetryRate, h3RetryBurst),
		maxUnval: h3MaxUnvalidated(s.cfg.MaxConnections),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_quic_retries_total",
			Help: "New QUIC connections asked to validate their address with a Retry first (more than 200 new connections a second, or too many handshakes from unvalidated addresses in progress).",
		}),
		refused: func(r string) { s.metrics.ConnectionsRefused.WithLabelValues(r).Inc() },
	}
	s.metrics.Registry.MustRegister(l.retries,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "pinaka_quic_unvalidated_handshakes",
			Help: "QUIC handshakes in progress from addresses not yet validated (a Retry is required beyond a quarter of MAX_CONNECTIONS, at most 400).",
		}, func() float64 { return float64(l.unvalidated.Load()) }))
	if s.clientCerts != nil {
		l.handshakeFailed = s.clientCerts.handshakeFailed
	}
	return l
}

// needRetry is quic.Transport.VerifySourceAddress: it runs for each new
// connection without a valid token, on quic-go's packet loop, before
// connContext.
func (l *h3Limits) needRetry(net.Addr) bool {
	if l.unvalidated.Load() >= l.maxUnval || !l.retry.Allow() {
		l.retries.Inc()
		return true
	}
	return false
}

// h3ConnState is a QUIC connection's admission, in its context.
type h3ConnState struct {
	slot        *ratelimit.Slot
	unvalidated bool        // counted in h3Limits.unvalidated until its handshake ends
	handshaken  atomic.Bool // accepted: the handshake completed
	settled     atomic.Bool // unvalidated count given back
}

type h3ConnStateKey struct{}

// connContext is quic.Transport.ConnContext: the connection takes its
// place in the node's cap, and in its address's when the address is
// validated already; an error refuses it (CONNECTION_REFUSED).
func (l *h3Limits) connContext(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
	addr, hasAddr := udpAddr(ci.RemoteAddr)
	if hasAddr {
		if reason := l.conns.Crowded(addr); reason != "" {
			l.refused(reason)
			return nil, errors.New("QUIC connection refused: " + reason)
		}
	}
	slot, ok := l.conns.Acquire() // counts a refusal itself
	if !ok {
		return nil, errors.New("QUIC connection refused: " + ratelimit.RefusedNode)
	}
	if hasAddr && ci.AddrVerified {
		if reason := slot.Admit(addr); reason != "" { // released by Admit
			return nil, errors.New("QUIC connection refused: " + reason)
		}
	}
	st := &h3ConnState{slot: slot, unvalidated: !ci.AddrVerified}
	if st.unvalidated {
		l.unvalidated.Add(1)
	}
	ctx = ratelimit.WithSlot(context.WithValue(ctx, h3ConnStateKey{}, st), slot)
	remote := ci.RemoteAddr
	context.AfterFunc(ctx, func() {
		l.settle(st)
		slot.Release()
		if !st.handshaken.Load() && l.handshakeFailed != nil {
			if err := context.Cause(ctx); err != nil {
				l.handshakeFailed(remote, err)
			}
		}
	})
	return ctx, nil
}

// settle gives back st's place among the unvalidated handshakes, once.
func (l *h3Limits) settle(st *h3ConnState) {
	if st.unvalidated && st.settled.CompareAndSwap(false, true) {
		l.unvalidated.Add(-1)
	}
}

// admit runs when a connection's handshake has completed (its address is
// validated now): it counts against its address's caps, or is refused.
func (l *h3Limits) admit(c *quic.Conn) bool {
	st, ok := c.Context().Value(h3ConnStateKey{}).(*h3ConnState)
	if !ok {
		return true
	}
	st.handshaken.Store(true)
	l.settle(st)
	if addr, ok := udpAddr(c.RemoteAddr()); ok {
		if reason := st.slot.Admit(addr); reason != "" {
			// H3_EXCESSIVE_LOAD (RFC 9114 §8.1).
			_ = c.CloseWithError(0x107, "too many connections from this address")
			return false
		}
	}
	return true
}

func udpAddr(a net.Addr) (netip.Addr, bool) {
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		return netip.Addr{}, false
	}
	return ua.AddrPort().Addr(), true
}

// h3AdmitListener hands http3.Server only the connections admit lets in.
type h3AdmitListener struct {
	*quic.Listener
	limits *h3Limits
}

func (l h3AdmitListener) Accept(ctx context.Context) (*quic.Conn, error) {
	for {
		c, err := l.Listener.Accept(ctx)
		if err != nil {
			return nil, err
		}
		if l.limits.admit(c) {
			return c, nil
		}
	}
}

// h3ClientTLS asks QUIC clients for certificates the way the TCP listener
// does (CLIENT_CERT_MODE, CLIENT_CA_PATH, CLIENT_CRL_PATH, reloaded by
// SIGHUP): the proxy reads the identity from the request's TLS state,
// which quic-go's http3 fills in as net/http does.
func (s *Server) h3ClientTLS(c *tls.Config) *tls.Config {
	if s.clientCerts != nil {
		s.clientCerts.apply(c)
	}
	return c
}
