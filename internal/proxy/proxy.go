// Package proxy is Pinaka's request handler: it authenticates every request,
// applies the rate limit and the egress policy, then tunnels CONNECT
// (HTTP/1.1 and HTTP/2), bootstraps RFC 8441 WebSockets, or forwards plain
// HTTP, recording one accesslog.Record per request or tunnel.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/egress"
	"github.com/pinaka-proxy/pinaka/internal/httpx"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// Recorder receives one record per request or tunnel. It must not block.
type Recorder interface {
	Record(accesslog.Record)
}

// RateLimiter decides whether a token may make one more request, and if
// not, how long until it may. ratelimit.Limiter decides on this node alone;
// fleet.Limiter shares the bucket between the nodes on one Redis.
type RateLimiter interface {
	Allow(tokenID string) (ok bool, retryAfter time.Duration)
}

// SlotLimiter caps what a token holds open at once (tunnels, forwarded
// requests). release is never nil and releases once however often called.
// ratelimit.TunnelLimiter counts on this node; fleet.Tunnels across nodes.
type SlotLimiter interface {
	Acquire(tokenID string) (release func(), ok bool)
}

// TunnelAdmitter takes a tunnel's rate-limit decision and its tunnel slot
// in one step: what Limiter.Allow then Tunnels.Acquire decide, with the
// same outcomes (a refused rate limit takes no slot; a slot refused at the
// cap still consumed the unit). fleet.Fleet does it in one Redis round trip
// instead of two. slotOK is meaningful only when ok; release is never nil
// and releases once.
type TunnelAdmitter interface {
	AdmitTunnel(tokenID string) (ok bool, retryAfter time.Duration, release func(), slotOK bool)
}

// Options configure a Proxy. Auth, Dialer, Policy and Metrics are required;
// the limiters may be nil (no limit).
type Options struct {
	Auth         *auth.Verifier
	Policy       *egress.Policy
	Dialer       *egress.Dialer
	Limiter      RateLimiter
	Tunnels      SlotLimiter
	Forwards     SlotLimiter // concurrent forwarded requests per token
	UDPFlows     SlotLimiter // concurrent CONNECT-UDP flows per token
	AuthThrottle *ratelimit.AuthThrottle
	// TunnelAdmission, when set, decides a CONNECT's (and an extended
	// CONNECT's) rate limit and tunnel slot together, in place of Limiter
	// and Tunnels; it stands for both, so set it only with both.
	TunnelAdmission TunnelAdmitter
	// Refusals bounds the records and log lines of refusals without valid
	// credentials per client address; nil writes them all.
	Refusals *ratelimit.RefusalSampler
	Records  Recorder
	Metrics  *metrics.Metrics
	Log      *slog.Logger
	// Revocations, when set, refuses revoked tokens and closes what they
	// have open when they are revoked (see revoke.go).
	Revocations Revocations
	// Tracer, when set, makes a span of each request (tracer.go).
	Tracer Tracer

	HTTPProxyEnabled      bool
	ProbeNode             string
	Region                string
	IncludeQuery          bool          // keep the query string in target_url
	AddForwardedFor       bool          // send X-Forwarded-For upstream
	TunnelIdleTimeout     time.Duration // close tunnels idle this long
	UpstreamHeaderTimeout time.Duration
	BodyIdleTimeout       time.Duration // end a forwarded request whose client stops sending its body
	UDPIdleTimeout        time.Duration // close CONNECT-UDP flows without a datagram this long
	// UpstreamTLS verifies origins reached over TLS; nil means the system
	// roots. Tests set their own CA here.
	UpstreamTLS *tls.Config
}

// Proxy is an http.Handler for a forward proxy. Create it with New.
type Proxy struct {
	opt       Options
	log       *slog.Logger
	transport *http.Transport
	forwarder http.Handler
	active    activeSet
	parker    *parker // idle tunnel directions (see parkAfter)
	stopSweep func()  // ends the suppressed-refusal summaries
	revoked   revokedCounts
	udpm      udpCounters
}

// New returns a Proxy.
func New(o Options) *Proxy {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Records == nil {
		o.Records = discard{}
	}
	p := &Proxy{opt: o, log: o.Log, parker: newParker(o.Log), udpm: newUDPCounters(o.Metrics)}
	p.transport = &http.Transport{
		Proxy:                 nil, // never chain to an environment proxy
		DialContext:           o.Dialer.DialContext,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: o.UpstreamHeaderTimeout,
		ExpectContinueTimeout: time.Second,
		// Origins see exactly what the client asked for: no transparent
		// gzip, which would change bodies and lengths.
		DisableCompression:     true,
		TLSClientConfig:        p.upstreamTLS(),
		MaxResponseHeaderBytes: 1 << 20,
		WriteBufferSize:        32 << 10,
		ReadBufferSize:         32 << 10,
	}
	p.forwarder = p.newForwarder()
	p.stopSweep = func() {}
	if o.Refusals != nil {
		p.stopSweep = p.sweepSuppressed()
	}
	if o.Revocations != nil {
		o.Revocations.OnRevoke(p.closeRevoked)
	}
	return p
}

// Close releases idle upstream connections and writes the summaries of
// suppressed refusals still pending.
func (p *Proxy) Close() {
	p.stopSweep()
	p.transport.CloseIdleConnections()
	p.parker.close()
}

// ParkedDirections is the number of tunnel directions idle without a
// goroutine (see parkAfter).
func (p *Proxy) ParkedDirections() int { return p.parker.len() }

// ActiveRequests is the number of requests and tunnels in progress.
func (p *Proxy) ActiveRequests() int { return p.active.len() }

// Drain waits until every request and tunnel has finished or ctx is done;
// then it cancels what is left, calls atDeadline (the server closes its
// connections there, which unblocks handlers stuck writing to a client that
// does not read) and waits for them to unwind. http.Server's Shutdown does
// not see hijacked HTTP/1.1 tunnels, so the server calls this alongside it.
func (p *Proxy) Drain(ctx context.Context, atDeadline func()) error {
	open, err := p.active.wait(ctx)
	if err == nil {
		return nil
	}
	n := max(open, p.active.cancelAll())
	if atDeadline != nil {
		atDeadline()
	}
	p.log.Warn("shutdown timeout: closing requests and tunnels still open", "count", n)
	wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = p.active.wait(wctx)
	return fmt.Errorf("closed %d requests and tunnels at the shutdown deadline", n)
}

// request carries one request's state from ServeHTTP to the record. A
// tunnel keeps it as long as it is open, so its flags are packed together
// and the tracer's auth span is a pointer: the struct fits the 480-byte
// size class instead of 640 (docs/PERFORMANCE.md, "Idle memory").
type request struct {
	rec         accesslog.Record
	start       time.Time
	proxyStatus string        // RFC 9209 Proxy-Status error type, "" on success
	req         *http.Request // as the handler sees it
	body        *requestBody  // a forwarded body, nil otherwise
	// slot is the request's place in the active set.
	slot *activeEntry
	// timing collects the upstream phases (timing.go); kind and upgrade
	// say what the request was, for the histograms' kind label.
	timing *timing.Trace
	// span is the request's trace span, nil without a tracer; auth is the
	// authorization step's time, taken only for it.
	span RequestSpan
	auth *timing.Span
	// release, until acquireTunnel takes it, frees the tunnel's slot when
	// the request ends before its tunnel (a refused target); see admitted.
	release func()

	kind    requestKind
	upgrade bool // a forwarded HTTP/1.1 Upgrade
	// detached: a goroutine outlives the handler (a hijacked tunnel) and
	// finishes the record itself.
	detached bool
	// upstreamBroke: reading the origin's response body failed.
	upstreamBroke bool
	// authenticated: the request carried valid credentials.
	authenticated bool
	// admitted: the tunnel's slot was decided with its rate limit
	// (Options.TunnelAdmission): slotOK says whether it was granted.
	admitted bool
	slotOK   bool
	// udp: a CONNECT-UDP request (udp.go).
	udp bool
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx, slot := p.active.add(r.Context(), false)
	defer p.active.remove(slot)
	q := &request{start: time.Now(), slot: slot}
	ctx = p.startTiming(ctx, w, q)
	ctx = p.startSpan(ctx, r, q)
	// One request clone carries both the drain context and the request's
	// state (the forwarder's error handler finds it there).
	r = r.WithContext(context.WithValue(ctx, requestKey{}, q))
	q.req = r

	q.rec = accesslog.Record{
		Timestamp: q.start.UTC(),
		ProbeNode: p.opt.ProbeNode,
		Region:    p.opt.Region,
		ClientIP:  clientIP(r),
		Protocol:  protocolName(r),
		Method:    r.Method,
		RequestID: q.rec.RequestID, // given by startTiming
	}
	defer func() {
		if q.release != nil {
			q.release()
		}
		if !q.detached {
			p.finish(q)
		}
	}()

	kind := classify(r)
	q.kind = kind
	q.rec.TargetURL = p.targetURL(r, kind)
	if kind == kindSelf {
		p.serveSelf(w, r, q)
		return
	}
	if q.span != nil {
		q.auth = &timing.Span{Start: time.Now()}
	}
	ok := p.authorize(w, r, q)
	if q.span != nil {
		q.auth.End = time.Now()
		if !ok {
			q.auth.Err = errAuthRefused
		}
	}
	if !ok {
		return
	}
	switch kind {
	case kindConnect:
		p.serveConnect(w, r, q)
	case kindExtendedConnect:
		p.serveExtendedConnect(w, r, q)
	case kindForward:
		p.serveForward(w, r, q)
	}
}

// authorize runs the checks every request passes before any DNS lookup or
// dial: authentication, failed-auth throttling, region, rate limit.
//
// Credentials are checked before the throttle: valid ones pass even from
// an address that is throttled, because offices and carriers put many
// users behind one address, and one user's bad token must not lock the
// others out. A signature check costs microseconds, much less than the
// TLS handshake that came before it.
func (p *Proxy) authorize(w http.ResponseWriter, r *http.Request, q *request) bool {
	id, err := p.authenticate(r)
	if id != nil {
		q.rec.TokenID, q.rec.UserID, q.rec.TokenType = id.TokenID, id.UserID, id.TokenType
		// Whatever the identity came from; a revoked one is refused
		// like an invalid token, whatever else is wrong with it.
		if p.watchToken(q.slot, id.TokenID) {
			err = errTokenRevoked
		}
	}
	switch {
	case errors.Is(err, auth.ErrRegion):
		q.authenticated = true // valid credentials, wrong region
		ratelimit.MarkAuthenticated(r.Context())
		p.opt.Metrics.AuthFailures.WithLabelValues("region").Inc()
		p.fail(w, q, http.StatusForbidden, "region_not_allowed", "token not allowed in region "+strconv.Quote(p.opt.Region))
		return false
	case err != nil:
		reason, code := "missing", "auth_missing"
		if !errors.Is(err, auth.ErrMissing) {
			reason, code = "invalid", "auth_invalid"
			if errors.Is(err, errTokenRevoked) {
				reason, code = "revoked", "token_revoked"
			}
			if p.opt.AuthThrottle != nil {
				ip, _ := netip.ParseAddr(q.rec.ClientIP)
				if !p.opt.AuthThrottle.Allowed(ip) {
					p.opt.Metrics.AuthFailures.WithLabelValues("throttled").Inc()
					w.Header().Set("Retry-After", "60")
					p.fail(w, q, http.StatusTooManyRequests, "auth_throttled", "too many failed authentications")
					return false
				}
				p.opt.AuthThrottle.Failed(ip)
			}
		}
		p.opt.Metrics.AuthFailures.WithLabelValues(reason).Inc()
		h := w.Header()
		h.Add("Proxy-Authenticate", `Bearer realm="pinaka"`)
		h.Add("Proxy-Authenticate", `Basic realm="pinaka"`)
		p.log.Debug("authentication failed", "client_ip", q.rec.ClientIP, "reason", err.Error())
		p.fail(w, q, http.StatusProxyAuthRequired, code, err.Error())
		return false
	}
	q.authenticated = true
	ratelimit.MarkAuthenticated(r.Context())
	// A UDP flow counts against MAX_UDP_FLOWS_PER_TOKEN on this node, not
	// against the fleet's tunnel leases: only its rate limit is shared.
	if p.opt.TunnelAdmission != nil && (q.kind == kindConnect || q.kind == kindExtendedConnect && !isConnectUDP(r)) {
		ok, wait, release, slotOK := p.opt.TunnelAdmission.AdmitTunnel(id.TokenID)
		if !ok {
			p.refuseRateLimited(w, q, wait)
			return false
		}
		q.admitted, q.slotOK, q.release = true, slotOK, release
		return true
	}
	if p.opt.Limiter != nil {
		if ok, wait := p.opt.Limiter.Allow(id.TokenID); !ok {
			p.refuseRateLimited(w, q, wait)
			return false
		}
	}
	return true
}

// refuseRateLimited answers 429 with the wait until the token's bucket
// admits again.
func (p *Proxy) refuseRateLimited(w http.ResponseWriter, q *request, wait time.Duration) {
	q.rec.RateLimited = true
	p.opt.Metrics.RateLimited.Inc()
	w.Header().Set("Retry-After", strconv.Itoa(int((wait+time.Second-1)/time.Second)))
	p.fail(w, q, http.StatusTooManyRequests, "rate_limited", "rate limit exceeded")
}

// finish completes and emits the record.
func (p *Proxy) finish(q *request) {
	p.finishTiming(q)
	d := time.Since(q.start)
	// Rounded up, so that it is never below the record's sub-millisecond
	// timings (ttfb_ms ≤ duration_ms; docs/RECORDS.md).
	q.rec.DurationMS = int64((d + time.Millisecond - 1) / time.Millisecond)
	if q.req != nil && q.rec.Error != "token_revoked" && errors.Is(context.Cause(q.req.Context()), errTokenRevoked) {
		// Cut by a revocation wherever it was: the record says so
		// rather than what the cut looked like (a closed client).
		q.rec.Error = "token_revoked"
	}
	if q.rec.StatusCode == 0 {
		// The handler ended without a response: the client went away.
		q.rec.StatusCode = 499
		if q.rec.Error == "" {
			q.rec.Error = "client_closed"
		}
	}
	q.rec.Success = q.rec.Error == "" && q.rec.StatusCode < 400
	p.endSpan(q)
	p.opt.Metrics.Requests.WithLabelValues(q.rec.Protocol, metrics.MethodLabel(q.rec.Method), metrics.StatusLabel(q.rec.StatusCode)).Inc()
	if !q.authenticated && p.opt.Refusals != nil {
		ip, _ := netip.ParseAddr(q.rec.ClientIP)
		ok, suppressed := p.opt.Refusals.Allow(ip)
		if !ok {
			p.opt.Metrics.RecordsSuppressed.Inc()
			return
		}
		q.rec.Suppressed = suppressed
	}
	p.opt.Records.Record(q.rec)
}

// sweepInterval is how often the counts of suppressed refusals of
// addresses that went quiet are written as summary records.
const sweepInterval = 10 * time.Second

// sweepSuppressed writes, every sweepInterval, a summary record for each
// address whose suppressed refusals no later record carried; the returned
// func stops it after a last sweep.
func (p *Proxy) sweepSuppressed() (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(sweepInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.writeSuppressed(p.opt.Refusals.Sweep(sweepInterval))
			case <-done:
				p.writeSuppressed(p.opt.Refusals.Sweep(0))
				return
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done); <-finished })
	}
}

// writeSuppressed writes one summary record per address: the refusals it
// stands for were counted in pinaka_requests_total when they happened.
func (p *Proxy) writeSuppressed(counts []ratelimit.Suppressed) {
	now := time.Now().UTC()
	for _, c := range counts {
		p.opt.Records.Record(accesslog.Record{
			Timestamp:  now,
			ProbeNode:  p.opt.ProbeNode,
			Region:     p.opt.Region,
			ClientIP:   c.Addr.String(),
			StatusCode: http.StatusProxyAuthRequired,
			Error:      "refusals_suppressed",
			Suppressed: c.Count,
		})
	}
}

// fail answers with status and a short plain-text reason, and marks the
// record. code is the record's short error code.
func (p *Proxy) fail(w http.ResponseWriter, q *request, status int, code, reason string) {
	q.rec.StatusCode = status
	q.rec.Error = code
	h := w.Header()
	stampRequestID(h, q) // again: a 1xx from the origin clears the headers
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	if q.proxyStatus != "" {
		h.Set("Proxy-Status", "pinaka; error="+q.proxyStatus+"; details="+strconv.Quote(reason))
	}
	// A refusal answers at once, without waiting for a body the client
	// announced and may never send. net/http's HTTP/1.1 server would read
	// up to 256 KB of it, with no time limit, before answering and again
	// when the handler returns; closing the connection after the answer
	// makes it skip the first read, and the expired read deadline ends the
	// second. The next request could not be found in the stream anyway.
	if unread(q.req, q.body) && q.req.ProtoMajor == 1 {
		h.Set("Connection", "close")
		_ = http.NewResponseController(w).SetReadDeadline(aLongTimeAgo)
	}
	// Refusals of authenticated requests are logged (their rate is bounded
	// per token); those without credentials only at debug level, since
	// anyone can send them at line rate (their records are sampled).
	level := slog.LevelDebug
	if q.authenticated && (status >= 500 || status == http.StatusForbidden || status == http.StatusBadRequest) {
		level = slog.LevelInfo
	}
	p.log.Log(q.req.Context(), level, "request refused", "status", status, "error", code, "reason", reason,
		"client_ip", q.rec.ClientIP, "token_id", q.rec.TokenID, "target", q.rec.TargetURL, "request_id", q.rec.RequestID)
	w.WriteHeader(status)
	fmt.Fprintln(w, reason)
}

// failUpstream maps a dial or round-trip error to a status: malformed target
// 400, denied 403, unknown host and refused 502, timeout 504.
func (p *Proxy) failUpstream(w http.ResponseWriter, q *request, err error) {
	if q.req != nil && errors.Is(context.Cause(q.req.Context()), errTokenRevoked) {
		// The dial or round trip was cut because the token was revoked
		// meanwhile: the client learns why, as a new request would.
		p.failRevoked(w, q)
		return
	}
	status, code, pstatus, reason := classifyError(err)
	if status == 0 { // the client went away; nobody to answer
		q.rec.StatusCode, q.rec.Error = 499, code
		return
	}
	if code == "egress_denied" {
		var de *egress.DeniedError
		errors.As(err, &de)
		p.opt.Metrics.EgressDenied.WithLabelValues(de.Reason).Inc()
	}
	q.proxyStatus = pstatus
	p.fail(w, q, status, code, reason)
}

func classifyError(err error) (status int, code, proxyStatus, reason string) {
	var te *egress.TargetError
	var de *egress.DeniedError
	var dnsErr *net.DNSError
	var nerr net.Error
	switch {
	case errors.As(err, &te):
		return http.StatusBadRequest, "bad_target", "http_request_error", te.Error()
	case errors.As(err, &de):
		return http.StatusForbidden, "egress_denied", "destination_ip_prohibited", de.Error()
	case errors.Is(err, context.Canceled):
		return 0, "client_closed", "", ""
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return http.StatusBadGateway, "dns_not_found", "dns_error", "unknown host " + dnsErr.Name
	case errors.As(err, &dnsErr) && dnsErr.IsTimeout:
		return http.StatusGatewayTimeout, "dns_timeout", "dns_timeout", "DNS lookup timed out"
	case errors.As(err, &dnsErr):
		return http.StatusBadGateway, "dns_error", "dns_error", "DNS lookup failed"
	case isRefused(err):
		return http.StatusBadGateway, "connection_refused", "connection_refused", "connection refused by upstream"
	case isResponseTimeout(err):
		return http.StatusGatewayTimeout, "upstream_timeout", "http_response_timeout", "upstream did not answer in time"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &nerr) && nerr.Timeout():
		return http.StatusGatewayTimeout, "upstream_timeout", "connection_timeout", "upstream timed out"
	}
	return http.StatusBadGateway, "upstream_error", "proxy_internal_response", "upstream error"
}

// serveSelf answers requests addressed to the proxy itself (origin-form, or
// HTTP/2 with :scheme https) with a small page instead of proxying them,
// which could only loop back here.
func (p *Proxy) serveSelf(w http.ResponseWriter, r *http.Request, q *request) {
	// Read a bounded part of the body, for a second at most, before
	// answering: HTTP/2 checks a declared Content-Length against the DATA
	// frames only while the body is read (RFC 9113 §8.1.1), and an answer
	// sent first would race them (h2spec 8.1.2.6).
	if r.Body != nil && r.Body != http.NoBody {
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 64<<10))
	}
	p.fail(w, q, http.StatusBadRequest, "not_a_proxy_request",
		"this is Pinaka, a forward proxy: configure it as your HTTPS proxy instead of browsing to it")
}

type requestKind uint8

const (
	kindSelf requestKind = iota
	kindConnect
	kindExtendedConnect
	kindForward
)

// classify tells proxy requests from requests for the proxy itself. Over
// HTTP/2 a :scheme http request is a forwarding request for :authority;
// :scheme https is the proxy's own (it terminates that TLS).
func classify(r *http.Request) requestKind {
	if r.Method == http.MethodConnect {
		if httpx.Protocol(r) != "" {
			return kindExtendedConnect
		}
		return kindConnect
	}
	if r.ProtoMajor >= 2 {
		if httpx.Scheme(r) == "http" && r.Host != "" {
			return kindForward
		}
		return kindSelf
	}
	if r.URL.IsAbs() && r.URL.Host != "" {
		return kindForward
	}
	return kindSelf
}

// isResponseTimeout: the connection was made but the origin sent no
// response headers within UPSTREAM_RESPONSE_TIMEOUT (net/http's wording).
func isResponseTimeout(err error) bool {
	return strings.Contains(err.Error(), "timeout awaiting response headers")
}

func (p *Proxy) targetURL(r *http.Request, kind requestKind) string {
	switch kind {
	case kindConnect:
		return r.Host
	case kindExtendedConnect:
		scheme := "ws"
		if httpx.Scheme(r) == "https" {
			scheme = "wss"
		}
		if isConnectUDP(r) {
			// CONNECT-UDP asks the proxy itself; serveConnectUDP names
			// the target once it has parsed it.
			scheme = "https"
		}
		u := *r.URL
		u.Scheme, u.Host = scheme, r.Host
		return accesslog.TargetURL(&u, p.opt.IncludeQuery)
	case kindForward:
		u := *r.URL
		if u.Host == "" {
			u.Scheme, u.Host = "http", r.Host
		}
		return accesslog.TargetURL(&u, p.opt.IncludeQuery)
	}
	return accesslog.TargetURL(r.URL, p.opt.IncludeQuery)
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func protocolName(r *http.Request) string {
	if r.ProtoMajor == 3 {
		return "HTTP/3"
	}
	if r.ProtoMajor == 2 {
		return "HTTP/2"
	}
	return "HTTP/1.1"
}

// errShutdownDeadline is the cause of contexts cancelled by Drain, so a
// tunnel can tell the drain deadline from its client going away.
var errShutdownDeadline = errors.New("shutdown deadline")

type discard struct{}

func (discard) Record(accesslog.Record) {}

// activeSet tracks in-flight requests so shutdown can wait for them and, at
// the deadline, cancel them: including hijacked tunnels that http.Server no
// longer sees.
//
// Entries are also indexed by token id (setToken), so that a revocation
// cancels exactly the requests and tunnels of the tokens it names.
type activeSet struct {
	mu      sync.Mutex
	cancels map[*activeEntry]struct{}
	byToken map[string]map[*activeEntry]struct{}
	changed chan struct{} // closed and replaced whenever the set shrinks
}

// activeEntry is one request or tunnel in the set.
type activeEntry struct {
	cancel context.CancelCauseFunc
	token  string // "" until known; guarded by activeSet.mu
	tunnel bool   // a detached tunnel rather than a handler
}

// add puts a request or a detached tunnel in the set; remove takes it
// out. Its token is set once known (setToken).
func (a *activeSet) add(parent context.Context, tunnel bool) (context.Context, *activeEntry) {
	ctx, cancel := context.WithCancelCause(parent)
	return ctx, a.addFunc(cancel, tunnel)
}

// addFunc is add for what is stopped by calling cancel rather than through
// a context.
func (a *activeSet) addFunc(cancel context.CancelCauseFunc, tunnel bool) *activeEntry {
	e := &activeEntry{cancel: cancel, tunnel: tunnel}
	a.mu.Lock()
	if a.cancels == nil {
		a.cancels = make(map[*activeEntry]struct{})
	}
	a.cancels[e] = struct{}{}
	a.mu.Unlock()
	return e
}

// remove takes e out of the set, once its request or tunnel is over (a
// method, not a closure per entry: a tunnel would keep that as long as it
// is open).
func (a *activeSet) remove(e *activeEntry) {
	e.cancel(nil)
	a.mu.Lock()
	delete(a.cancels, e)
	a.unindex(e)
	if a.changed != nil {
		close(a.changed)
		a.changed = nil
	}
	a.mu.Unlock()
}

func (a *activeSet) len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.cancels)
}

// wait returns when the set is empty, or when ctx is done with how many
// were still open then: the count as of the set's last change, since what
// the server closes at the same deadline (its HTTP/3 connections) may end
// them before the caller counts again.
func (a *activeSet) wait(ctx context.Context) (open int, err error) {
	for {
		a.mu.Lock()
		open = len(a.cancels)
		if open == 0 {
			a.mu.Unlock()
			return 0, nil
		}
		if a.changed == nil {
			a.changed = make(chan struct{})
		}
		ch := a.changed
		a.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return open, ctx.Err()
		}
	}
}

func (a *activeSet) cancelAll() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	for e := range a.cancels {
		e.cancel(errShutdownDeadline)
	}
	return len(a.cancels)
}

// upstreamTLS is the TLS configuration for origins reached over TLS by the
// proxy itself (https:// forwarding, wss:// WebSocket bootstrap).
func (p *Proxy) upstreamTLS() *tls.Config {
	if p.opt.UpstreamTLS != nil {
		return p.opt.UpstreamTLS.Clone()
	}
	return &tls.Config{MinVersion: tls.VersionTLS12}
}
