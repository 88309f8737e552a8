package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// Dial timing, as in the standard library's net.Dialer: the dial timeout
// covers resolution and every address tried; each address gets an equal
// share of what is left, but at least minAttemptTimeout, so one black-holed
// address cannot use up the time meant for the next.
const (
	defaultDialTimeout = 10 * time.Second
	minAttemptTimeout  = 2 * time.Second
)

// DialerOptions configures a Dialer.
type DialerOptions struct {
	Policy   *Policy          // required
	Resolver *Resolver        // nil: the system resolver with a small cache
	Timeout  time.Duration    // per whole dial, resolution included; 0: 10s
	Metrics  *metrics.Metrics // may be nil; DialSeconds is observed
}

// Dialer is the proxy's only way out: CONNECT tunnels use DialTarget and
// HTTP forwarding uses DialContext as its http.Transport.DialContext, so
// both paths get the same policy. It is safe for concurrent use.
type Dialer struct {
	policy   *Policy
	resolver *Resolver
	timeout  time.Duration
	metrics  *metrics.Metrics
}

// NewDialer returns a Dialer. It panics without a Policy: a dialer that
// checks nothing must not be constructible by accident.
func NewDialer(o DialerOptions) *Dialer {
	if o.Policy == nil {
		panic("egress: NewDialer without a Policy")
	}
	d := &Dialer{policy: o.Policy, resolver: o.Resolver, timeout: o.Timeout, metrics: o.Metrics}
	if d.resolver == nil {
		d.resolver = NewResolver(nil, 0, 1024)
	}
	if d.timeout <= 0 {
		d.timeout = defaultDialTimeout
	}
	return d
}

// DialContext connects to address (host:port) on network "tcp", "tcp4" or
// "tcp6". See DialTarget for the errors it returns; a malformed address
// gives a *TargetError.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("egress: dialing %s: unsupported network %q", address, network)
	}
	t, err := ParseAuthority(address, 0)
	if err != nil {
		return nil, err
	}
	return d.dial(ctx, network, t)
}

// DialTarget connects to t. It checks the port and any IP literal before
// resolving, resolves once, checks every address, and dials the allowed
// ones in order (IPv4 first) until one connects. It returns a *DeniedError
// when the policy refuses every address (no connection was attempted), a
// *net.DNSError when resolution fails, or the last dial error, wrapped so
// that errors.Is(err, syscall.ECONNREFUSED) and net.Error's Timeout work.
func (d *Dialer) DialTarget(ctx context.Context, t Target) (net.Conn, error) {
	return d.dial(ctx, "tcp", t)
}

func (d *Dialer) dial(ctx context.Context, network string, t Target) (net.Conn, error) {
	if err := d.policy.CheckTarget(t); err != nil {
		return nil, err
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	conn, err := d.resolveAndDial(ctx, network, t)
	var denied *DeniedError
	if d.metrics != nil && !errors.As(err, &denied) {
		d.metrics.DialSeconds.Observe(time.Since(start).Seconds())
	}
	return conn, err
}

func (d *Dialer) resolveAndDial(ctx context.Context, network string, t Target) (net.Conn, error) {
	tr := timing.FromContext(ctx)
	allowed, err := d.resolveAllowed(ctx, tr, network, t, d.policy.Check)
	if err != nil {
		return nil, err
	}

	tr.Begin(timing.Connect)
	var lastErr error
	for i, ap := range allowed {
		conn, err := d.dialAddr(ctx, ap, len(allowed)-i)
		if err == nil {
			tr.EndConnect(ap, conn, nil)
			return conn, nil
		}
		lastErr = &dialError{target: t, addr: ap, err: err}
		if ctx.Err() != nil || i == len(allowed)-1 {
			tr.EndConnect(ap, nil, lastErr)
			break
		}
	}
	return nil, lastErr
}

// resolveAllowed resolves t (unless it is an IP literal) and returns the
// addresses check allows, in the resolver's order (IPv4 first): a
// *DeniedError when it allows none, a *net.DNSError when resolution fails
// or finds no address of network's family.
func (d *Dialer) resolveAllowed(ctx context.Context, tr *timing.Trace, network string, t Target, check func(netip.AddrPort) error) ([]netip.AddrPort, error) {
	addrs := []netip.Addr{t.Addr}
	if !t.Addr.IsValid() {
		tr.Begin(timing.DNS)
		var cached bool
		var err error
		addrs, cached, err = d.resolver.lookupHost(ctx, t.Host)
		tr.EndDNS(cached, err)
		if err != nil {
			return nil, err
		}
	}

	var allowed []netip.AddrPort
	var denied *DeniedError
	for _, a := range addrs {
		if (network == "tcp4" || network == "udp4") && !a.Unmap().Is4() || (network == "tcp6" || network == "udp6") && !a.Is6() {
			continue
		}
		ap := netip.AddrPortFrom(a, t.Port)
		if err := check(ap); err != nil {
			if denied == nil {
				denied = err.(*DeniedError)
				denied.Host = t.Host
			}
			continue
		}
		allowed = append(allowed, ap)
	}
	if len(allowed) == 0 {
		if denied != nil {
			return nil, denied
		}
		return nil, &net.DNSError{Err: "no " + network + " address", Name: t.Host, IsNotFound: true}
	}
	return allowed, nil
}

// DialUDP opens a connected UDP socket to t for a CONNECT-UDP flow, under
// the same rules as DialTarget with ALLOWED_UDP_PORTS for the port: the
// port and any IP literal are checked before resolving, every resolved
// address is checked, and the socket is connected to the first allowed
// one (IPv4 first; UDP has no handshake that could fail over to the
// next), with a Control hook that checks that exact address again. A
// connected socket receives only what that address sends, so no other
// host can inject datagrams into the flow. Errors are as DialTarget's.
func (d *Dialer) DialUDP(ctx context.Context, t Target) (*net.UDPConn, error) {
	if err := d.policy.CheckTargetUDP(t); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	tr := timing.FromContext(ctx)
	allowed, err := d.resolveAllowed(ctx, tr, "udp", t, d.policy.CheckUDP)
	if err != nil {
		return nil, err
	}
	ap := allowed[0]
	tr.Begin(timing.Connect)
	nd := net.Dialer{Control: d.policy.controlUDP(ap)}
	conn, err := nd.DialUDP(ctx, "udp", netip.AddrPort{}, ap)
	if err != nil {
		err = &dialError{target: t, addr: ap, err: err}
		tr.EndConnect(ap, nil, err)
		return nil, err
	}
	tr.EndConnect(ap, conn, nil)
	return conn, nil
}

// dialAddr connects to one checked address. Only the IP literal is dialed,
// so there is no lookup, and the Control hook refuses the socket unless the
// kernel is about to connect to exactly that address and the policy still
// allows it.
func (d *Dialer) dialAddr(ctx context.Context, ap netip.AddrPort, remaining int) (net.Conn, error) {
	// The last address gets all the time left, which is ctx's own
	// deadline (or minAttemptTimeout past it, which a child context cannot
	// extend): a context of its own would change nothing and cost a timer
	// and three allocations on every CONNECT.
	if deadline, ok := ctx.Deadline(); ok && remaining > 1 {
		share := time.Until(deadline) / time.Duration(remaining)
		if share < minAttemptTimeout {
			share = minAttemptTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, share)
		defer cancel()
	}
	// No TCP keepalive upstream (Squid, nghttpx and Envoy set none by
	// default either): TUNNEL_IDLE_TIMEOUT and the transport's idle-pool
	// timeout already end idle connections, probes from every idle tunnel
	// would be traffic for nothing, and the four setsockopt(2) calls per
	// dial are a tenth of what a warm CONNECT costs the proxy.
	nd := net.Dialer{Control: d.policy.control(ap), KeepAlive: -1}
	return nd.DialTCP(ctx, "tcp", netip.AddrPort{}, ap)
}

// dialError is a failed connection attempt. It implements net.Error so
// callers that test for timeouts by type assertion still see them.
type dialError struct {
	target Target
	addr   netip.AddrPort
	err    error
}

func (e *dialError) Error() string {
	if e.target.Addr.IsValid() {
		return fmt.Sprintf("dialing %s: %v", e.target, e.err)
	}
	return fmt.Sprintf("dialing %s (%s): %v", e.target, e.addr, e.err)
}

func (e *dialError) Unwrap() error { return e.err }

func (e *dialError) Timeout() bool {
	var ne net.Error
	return errors.As(e.err, &ne) && ne.Timeout()
}

// Temporary is required by net.Error; like the standard library's, it
// reports only timeouts.
func (e *dialError) Temporary() bool { return e.Timeout() }
