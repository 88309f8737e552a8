package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
)

// Cache lifetimes. A DNS answer lives for its TTL, clamped to
// [minTTL, maxTTL]; the system resolver does not report TTLs, so its answers
// live systemTTL. Not-found answers live negativeTTL: long enough to absorb a
// burst of requests for a mistyped name, short enough not to hide a new record.
const (
	minTTL      = 1 * time.Second
	maxTTL      = 1 * time.Hour
	systemTTL   = 30 * time.Second
	negativeTTL = 5 * time.Second

	defaultDNSTimeout = 5 * time.Second
	ednsUDPSize       = 1232 // avoids IP fragmentation (DNS flag day 2020)
)

// Resolver resolves host names to addresses for the dialer, with an LRU
// cache that honours TTLs and coalesces concurrent lookups of one name. With
// DNS_SERVERS it queries those servers directly (A and AAAA in parallel);
// otherwise it uses the system resolver. It is safe for concurrent use.
type Resolver struct {
	servers []string
	timeout time.Duration
	system  *net.Resolver
	cache   *lru.Cache[string, cacheEntry]
	group   singleflight.Group
	now     func() time.Time // replaced in tests to step through TTLs
}

type cacheEntry struct {
	addrs   []netip.Addr
	err     *net.DNSError // negative answer
	expires time.Time
}

// lookupResult is one real lookup's outcome. A temporary failure (timeout,
// SERVFAIL) is not cached, so the next request tries again.
type lookupResult struct {
	addrs  []netip.Addr
	ttl    time.Duration
	err    *net.DNSError
	cached bool // from the cache after all (see lookupHost)
}

// NewResolver returns a resolver using servers (host:port) or, when there
// are none, the system resolver. timeout bounds each lookup; cacheSize bounds
// the number of names cached.
func NewResolver(servers []string, timeout time.Duration, cacheSize int) *Resolver {
	if timeout <= 0 {
		timeout = defaultDNSTimeout
	}
	if cacheSize < 1 {
		cacheSize = 1
	}
	cache, err := lru.New[string, cacheEntry](cacheSize)
	if err != nil {
		panic(err) // only for a non-positive size, excluded above
	}
	return &Resolver{
		servers: append([]string(nil), servers...),
		timeout: timeout,
		system:  &net.Resolver{},
		cache:   cache,
		now:     time.Now,
	}
}

// LookupHost returns the addresses of host, IPv4 first. A name that does not
// exist or has no addresses gives a *net.DNSError with IsNotFound; a lookup
// that runs out of time gives one with IsTimeout.
//
// "localhost" and names under it are answered locally with the loopback
// addresses (RFC 6761 §6.3), so they mean the same thing whatever DNS server
// is configured, and the policy refuses them as loopback.
func (r *Resolver) LookupHost(ctx context.Context, host string) ([]netip.Addr, error) {
	addrs, _, err := r.lookupHost(ctx, host)
	return addrs, err
}

// lookupHost is LookupHost that also says whether no query was needed
// (an answer from the cache, a literal, localhost): the record's dns_ms is
// 0 then.
func (r *Resolver) lookupHost(ctx context.Context, host string) (_ []netip.Addr, local bool, _ error) {
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if name == "" {
		return nil, true, &net.DNSError{Err: "empty host name", Name: host, IsNotFound: true}
	}
	if a, err := netip.ParseAddr(name); err == nil {
		return []netip.Addr{a}, true, nil
	}
	if name == "localhost" || strings.HasSuffix(name, ".localhost") {
		return []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}, true, nil
	}
	if _, ok := dns.IsDomainName(name); !ok || strings.HasSuffix(name, ".") {
		return nil, true, &net.DNSError{Err: "invalid host name", Name: host, IsNotFound: true}
	}
	if e, ok := r.cache.Get(name); ok && r.now().Before(e.expires) {
		if e.err != nil {
			return nil, true, e.err
		}
		return append([]netip.Addr(nil), e.addrs...), true, nil
	}

	// The shared lookup must not die with whichever caller started it, so it
	// runs on its own deadline; each caller still stops waiting when its own
	// context ends.
	ch := r.group.DoChan(name, func() (any, error) {
		// A flight that ended between this caller's cache miss and here
		// has filled the cache: no second query for the same name.
		if e, ok := r.cache.Get(name); ok && r.now().Before(e.expires) {
			return lookupResult{addrs: e.addrs, err: e.err, cached: true}, nil
		}
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.timeout)
		defer cancel()
		res := r.lookup(lctx, name)
		r.store(name, res)
		return res, nil
	})
	select {
	case <-ctx.Done():
		return nil, false, ctxDNSError(ctx.Err(), host)
	case out := <-ch:
		res := out.Val.(lookupResult)
		if res.err != nil {
			return nil, res.cached, res.err
		}
		return append([]netip.Addr(nil), res.addrs...), res.cached, nil
	}
}

func (r *Resolver) store(name string, res lookupResult) {
	e := cacheEntry{addrs: res.addrs, err: res.err}
	switch {
	case res.err == nil:
		e.expires = r.now().Add(res.ttl)
	case res.err.IsNotFound:
		e.expires = r.now().Add(negativeTTL)
	default:
		return
	}
	r.cache.Add(name, e)
}

func (r *Resolver) lookup(ctx context.Context, name string) lookupResult {
	if len(r.servers) == 0 {
		return r.lookupSystem(ctx, name)
	}
	return r.lookupServers(ctx, name)
}

func (r *Resolver) lookupSystem(ctx context.Context, name string) lookupResult {
	ips, err := r.system.LookupIPAddr(ctx, name)
	if err != nil {
		if ctx.Err() != nil {
			return lookupResult{err: ctxDNSError(ctx.Err(), name)}
		}
		var de *net.DNSError
		if errors.As(err, &de) {
			return lookupResult{err: de}
		}
		return lookupResult{err: &net.DNSError{Err: err.Error(), Name: name, IsTemporary: true, UnwrapErr: err}}
	}
	var v4, v6 []netip.Addr
	for _, ip := range ips {
		a, ok := netip.AddrFromSlice(ip.IP)
		if !ok {
			continue
		}
		// The system resolver hands A records back as 16-byte slices.
		if a = a.Unmap(); a.Is4() {
			v4 = append(v4, a)
		} else {
			v6 = append(v6, a)
		}
	}
	if len(v4)+len(v6) == 0 {
		return lookupResult{err: notFound(name)}
	}
	return lookupResult{addrs: append(v4, v6...), ttl: systemTTL}
}

// queryResult is the outcome of one query type (A or AAAA).
type queryResult struct {
	addrs  []netip.Addr
	ttl    uint32
	nxName bool  // NXDOMAIN
	err    error // no usable answer from any server
}

func (r *Resolver) lookupServers(ctx context.Context, name string) lookupResult {
	var wg sync.WaitGroup
	var a, aaaa queryResult
	wg.Add(2)
	go func() { defer wg.Done(); a = r.query(ctx, name, dns.TypeA) }()
	go func() { defer wg.Done(); aaaa = r.query(ctx, name, dns.TypeAAAA) }()
	wg.Wait()

	addrs := append(a.addrs, aaaa.addrs...)
	if len(addrs) > 0 {
		// One family failing does not hide the other's answer; the failed
		// half is retried when the entry expires.
		var ttl uint32
		switch {
		case len(a.addrs) == 0:
			ttl = aaaa.ttl
		case len(aaaa.addrs) == 0:
			ttl = a.ttl
		default:
			ttl = min(a.ttl, aaaa.ttl)
		}
		return lookupResult{addrs: addrs, ttl: clampTTL(ttl)}
	}
	if a.nxName || aaaa.nxName || (a.err == nil && aaaa.err == nil) {
		return lookupResult{err: notFound(name)}
	}
	if ctx.Err() != nil {
		return lookupResult{err: ctxDNSError(ctx.Err(), name)}
	}
	err := a.err
	if err == nil {
		err = aaaa.err
	}
	de := &net.DNSError{Err: err.Error(), Name: name, IsTemporary: true, UnwrapErr: err}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		de.IsTimeout = true
	}
	return lookupResult{err: de}
}

// query asks the configured servers in turn, two rounds at most, until one
// gives a usable answer (NOERROR or NXDOMAIN) or ctx expires.
func (r *Resolver) query(ctx context.Context, name string, qtype uint16) queryResult {
	fqdn := dns.Fqdn(name)
	var lastErr error
	for round := 0; round < 2; round++ {
		for _, server := range r.servers {
			if ctx.Err() != nil {
				return queryResult{err: errors.Join(lastErr, ctx.Err())}
			}
			resp, err := exchange(ctx, fqdn, qtype, server)
			if err != nil {
				lastErr = fmt.Errorf("querying %s: %w", server, err)
				continue
			}
			switch resp.Rcode {
			case dns.RcodeSuccess:
				return answers(resp, fqdn, qtype)
			case dns.RcodeNameError:
				return queryResult{nxName: true}
			default:
				lastErr = fmt.Errorf("querying %s: server answered %s", server, dns.RcodeToString[resp.Rcode])
			}
		}
	}
	return queryResult{err: lastErr}
}

// exchange sends one query over UDP, and again over TCP if the answer was
// truncated.
func exchange(ctx context.Context, fqdn string, qtype uint16, server string) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(fqdn, qtype)
	m.SetEdns0(ednsUDPSize, false)
	resp, _, err := (&dns.Client{Net: "udp"}).ExchangeContext(ctx, m, server)
	if err == nil && resp.Truncated {
		resp, _, err = (&dns.Client{Net: "tcp"}).ExchangeContext(ctx, m, server)
	}
	return resp, err
}

// answers collects the addresses for fqdn, following the CNAME chain within
// the answer section, and the smallest TTL along the way. Records for other
// owner names are ignored: a server has no say over names it was not asked.
func answers(resp *dns.Msg, fqdn string, qtype uint16) queryResult {
	owner := map[string]bool{strings.ToLower(fqdn): true}
	var ttl uint32
	first := true
	see := func(t uint32) {
		if first || t < ttl {
			ttl, first = t, false
		}
	}
	// CNAME records may come in any order; iterate until the chain stops growing.
	for changed := true; changed; {
		changed = false
		for _, rr := range resp.Answer {
			if c, ok := rr.(*dns.CNAME); ok && owner[strings.ToLower(c.Hdr.Name)] && !owner[strings.ToLower(c.Target)] {
				owner[strings.ToLower(c.Target)] = true
				see(c.Hdr.Ttl)
				changed = true
			}
		}
	}
	var res queryResult
	for _, rr := range resp.Answer {
		if !owner[strings.ToLower(rr.Header().Name)] {
			continue
		}
		var ip net.IP
		switch v := rr.(type) {
		case *dns.A:
			if qtype == dns.TypeA {
				ip = v.A
			}
		case *dns.AAAA:
			if qtype == dns.TypeAAAA {
				ip = v.AAAA
			}
		}
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			continue
		}
		if qtype == dns.TypeA {
			a = a.Unmap()
		}
		res.addrs = append(res.addrs, a)
		see(rr.Header().Ttl)
	}
	res.ttl = ttl
	return res
}

func clampTTL(ttl uint32) time.Duration {
	d := time.Duration(ttl) * time.Second
	return min(max(d, minTTL), maxTTL)
}

func notFound(name string) *net.DNSError {
	return &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
}

func ctxDNSError(err error, name string) *net.DNSError {
	return &net.DNSError{
		Err:         err.Error(),
		Name:        name,
		IsTimeout:   errors.Is(err, context.DeadlineExceeded),
		IsTemporary: true,
		UnwrapErr:   err,
	}
}
