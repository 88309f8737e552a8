package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Label values of the upstream timing histograms. protocol is the client's
// protocol, as in pinaka_requests_total (HTTP/1.1, HTTP/2).
const (
	KindForward   = "forward"   // plain HTTP forwarding (http:// and https:// origins)
	KindConnect   = "connect"   // CONNECT tunnels, HTTP/1.1 and HTTP/2
	KindWebSocket = "websocket" // RFC 8441 extended CONNECT, and HTTP/1.1 Upgrade forwarded
	// KindUDP: CONNECT-UDP flows (RFC 9298). Their "connect" is the UDP
	// socket's connect(2), which sends nothing; their TTFB is the first
	// datagram back from the target.
	KindUDP = "connect_udp"

	OutcomeOK       = "ok"
	OutcomeCached   = "cached"    // DNS: answered from the resolver's cache
	OutcomeNotFound = "not_found" // DNS: no such name, or no address
	OutcomeRefused  = "refused"   // connect: connection refused
	OutcomeTimeout  = "timeout"
	OutcomeCanceled = "canceled" // the client went away or the request was cut first
	OutcomeError    = "error"
)

// timingLabels are the labels of the timing histograms: fixed sets only.
var timingLabels = []string{"protocol", "kind", "outcome"}

// registerTiming creates and registers the upstream timing histograms and
// the shipping lag gauge.
func (m *Metrics) registerTiming() {
	m.UpstreamConnect = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pinaka_upstream_connect_seconds",
		Help:    "TCP connect time to origins (every address of the name tried), by client protocol, kind (forward, connect, websocket, connect_udp) and outcome (ok, refused, timeout, canceled, error). Pooled connections are not counted.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18), // 100µs .. 13s
	}, timingLabels)
	m.UpstreamTTFB = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pinaka_upstream_ttfb_seconds",
		Help:    "Time from the request's arrival to the origin's first byte (forwarding, websocket: its response headers; tunnels: the first byte back), by client protocol, kind and outcome (ok; timeout and error: the origin failed before its first byte, observed at the failure).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18), // 500µs .. 65s
	}, timingLabels)
	m.DNSLookup = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pinaka_dns_lookup_seconds",
		Help:    "Resolution of origin names, by client protocol, kind and outcome (ok, cached: answered from the cache, not_found, timeout, canceled, error).",
		Buckets: prometheus.ExponentialBuckets(0.00005, 2, 18), // 50µs .. 6.5s
	}, timingLabels)
	// An age, like pinaka_ship_memory_oldest_seconds, computed at scrape
	// time because it grows between shipper events.
	m.ShipLag = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pinaka_ship_lag_seconds",
		Help: "Age of the oldest record not yet delivered to the backend, in memory or in the spool (spooled batches count from when they were cut); 0 when everything is delivered.",
	}, func() float64 {
		oldest := m.ShipMemoryOldest.Load()
		if s := m.ShipSpoolOldest.Load(); s != 0 && (oldest == 0 || s < oldest) {
			oldest = s
		}
		if oldest == 0 {
			return 0
		}
		return max(time.Since(time.Unix(0, oldest)).Seconds(), 0)
	})
	m.Registry.MustRegister(m.UpstreamConnect, m.UpstreamTTFB, m.DNSLookup, m.ShipLag)
}
