// Package metrics holds Pinaka's Prometheus collectors. They live on one
// registry per process (no globals) so tests can run several proxies at once.
package metrics

import (
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the proxy's counters, gauges and histograms. All names start
// with pinaka_.
type Metrics struct {
	Registry *prometheus.Registry

	Requests           *prometheus.CounterVec // protocol, method, status
	ActiveTunnels      prometheus.Gauge
	ActiveConnections  prometheus.Gauge
	BytesUpstream      prometheus.Counter     // client → origin
	BytesDownstream    prometheus.Counter     // origin → client
	AuthFailures       *prometheus.CounterVec // reason
	RateLimited        prometheus.Counter
	EgressDenied       *prometheus.CounterVec // reason
	ConnectionsRefused *prometheus.CounterVec // reason: which accept-time cap
	RecordsSuppressed  prometheus.Counter     // credential-less refusals not written (sampled)
	WriteStalls        prometheus.Counter     // client connections closed because a write made no progress
	DialSeconds        prometheus.Histogram
	CertNotAfter       prometheus.Gauge // unix seconds of the serving certificate's NotAfter

	// CONNECT-UDP flows (RFC 9298, HTTP/3). Bytes are counted in
	// BytesUpstream and BytesDownstream with the tunnels'.
	UDPFlows     prometheus.Gauge
	UDPDatagrams *prometheus.CounterVec // direction: upstream, downstream
	UDPDropped   *prometheus.CounterVec // reason: UDPDrop* (fixed set)

	// HTTP/2 engine (internal/h2srv). Labels come from fixed sets.
	HTTP2GoAways      *prometheus.CounterVec // reason: protocol, enhance_your_calm, flow_control, compression, frame_size, stream_closed, other
	HTTP2StreamErrors *prometheus.CounterVec // reason: malformed, refused, flow_control, stream_closed
	HTTP2Unproductive *prometheus.CounterVec // type: the frame kinds charged against the flood budget
	HTTP2BodyBuffered prometheus.Gauge       // request-body bytes buffered, node-wide
	HTTP2BodyReserved prometheus.Gauge       // HTTP2_BODY_BUFFER_BYTES reserved by connection windows

	ShipQueueDepth    prometheus.Gauge
	BatchesSent       prometheus.Counter
	BatchesRetried    prometheus.Counter
	BatchesSpooled    prometheus.Counter
	BatchesDeadLetter prometheus.Counter
	RecordsDropped    *prometheus.CounterVec // reason
	SpoolBytes        prometheus.Gauge

	// Record shipping: how long records sit in memory only (lost by a
	// crash), and spool files that could not be read.
	ShipMemoryOldest     atomic.Int64           // unix nanoseconds of the oldest record held only in memory; 0 = none
	ShipMemoryAge        prometheus.GaugeFunc   // exports ShipMemoryOldest as an age
	ShipAttemptsTimedOut prometheus.Counter     // attempts that hit LOG_SHIP_TIMEOUT
	SpoolFilesSetAside   *prometheus.CounterVec // reason: corrupt, unreadable
	SpoolReadErrors      prometheus.Counter     // read failures of a spool file kept for a later retry

	// Where upstream time goes (timing.go); labels protocol, kind, outcome.
	UpstreamConnect *prometheus.HistogramVec
	UpstreamTTFB    *prometheus.HistogramVec
	DNSLookup       *prometheus.HistogramVec
	// ShipSpoolOldest is unix nanoseconds of the oldest batch parked
	// (spooled, or in memory without a spool dir); 0 = none. With
	// ShipMemoryOldest it makes pinaka_ship_lag_seconds.
	ShipSpoolOldest atomic.Int64
	ShipLag         prometheus.GaugeFunc
}

// New creates the collectors and registers them, with the Go runtime and
// process collectors, on a fresh registry.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{
		Registry: reg,
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_requests_total", Help: "Requests and tunnels handled, by client protocol, method (other for unregistered methods) and final status (Nxx for unregistered codes).",
		}, []string{"protocol", "method", "status"}),
		ActiveTunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_active_tunnels", Help: "Tunnels (CONNECT, WebSocket upgrades) open now.",
		}),
		ActiveConnections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_active_connections", Help: "Client connections open now.",
		}),
		BytesUpstream: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_upstream_bytes_total", Help: "Bytes relayed from clients to origins.",
		}),
		BytesDownstream: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_downstream_bytes_total", Help: "Bytes relayed from origins to clients.",
		}),
		AuthFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_auth_failures_total", Help: "Requests refused by authentication, by reason.",
		}, []string{"reason"}),
		RateLimited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_rate_limited_total", Help: "Requests refused with 429.",
		}),
		EgressDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_egress_denied_total", Help: "Requests refused by the egress policy, by reason.",
		}, []string{"reason"}),
		ConnectionsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_connections_refused_total", Help: "Client connections closed at accept, by the cap reached: max_connections, per_ip, per_ip_unauthenticated.",
		}, []string{"reason"}),
		WriteStalls: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_connections_write_stalled_total", Help: "Client connections closed because one write to them was blocked for TUNNEL_IDLE_TIMEOUT (at most 60s): the client stopped reading.",
		}),
		RecordsSuppressed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_unauthenticated_records_suppressed_total", Help: "Refusals of requests without valid credentials that wrote no record or log line (over UNAUTHENTICATED_RECORDS_PER_MINUTE for their address); their count rides on a later record.",
		}),
		DialSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "pinaka_upstream_dial_seconds", Help: "Time to resolve and connect to an origin.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		CertNotAfter: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_tls_certificate_not_after_seconds", Help: "Expiry of the serving certificate (unix time); moves on SIGHUP reload.",
		}),
		HTTP2GoAways: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_http2_goaway_total", Help: "HTTP/2 connections ended with a GOAWAY carrying an error, by error: protocol, enhance_your_calm (flood budget spent), flow_control, compression, frame_size, stream_closed, other.",
		}, []string{"reason"}),
		HTTP2StreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_http2_stream_errors_total", Help: "HTTP/2 streams reset by the proxy for a client error, by reason: malformed, refused (over HTTP2_MAX_CONCURRENT_STREAMS), flow_control, stream_closed.",
		}, []string{"reason"}),
		HTTP2Unproductive: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_http2_frames_unproductive_total", Help: "HTTP/2 frames charged against a connection's flood budget (they made the proxy work without moving a request forward), by kind.",
		}, []string{"type"}),
		HTTP2BodyBuffered: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_http2_body_buffer_bytes", Help: "HTTP/2 request-body bytes received and not yet taken by a handler or tunnel, node-wide.",
		}),
		HTTP2BodyReserved: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_http2_body_budget_reserved_bytes", Help: "Part of HTTP2_BODY_BUFFER_BYTES that HTTP/2 connections hold as receive window.",
		}),
		ShipQueueDepth: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_ship_queue_records", Help: "Records waiting to be batched and shipped.",
		}),
		BatchesSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_ship_batches_sent_total", Help: "Batches the backend accepted.",
		}),
		BatchesRetried: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_ship_batches_retried_total", Help: "Batch delivery attempts that will be retried.",
		}),
		BatchesSpooled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_ship_batches_spooled_total", Help: "Batches written to the disk spool.",
		}),
		BatchesDeadLetter: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_ship_batches_dead_letter_total", Help: "Batches the backend rejected with a non-retryable 4xx, kept in the dead-letter file.",
		}),
		RecordsDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_ship_records_dropped_total", Help: "Records dropped because a bound was hit, by reason.",
		}, []string{"reason"}),
		SpoolBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pinaka_ship_spool_bytes", Help: "Bytes in the disk spool.",
		}),
	}
	reg.MustRegister(m.Requests, m.ActiveTunnels, m.ActiveConnections, m.BytesUpstream, m.BytesDownstream,
		m.AuthFailures, m.RateLimited, m.EgressDenied, m.ConnectionsRefused, m.RecordsSuppressed, m.WriteStalls, m.DialSeconds, m.CertNotAfter,
		m.HTTP2GoAways, m.HTTP2StreamErrors, m.HTTP2Unproductive, m.HTTP2BodyBuffered, m.HTTP2BodyReserved,
		m.ShipQueueDepth, m.BatchesSent, m.BatchesRetried, m.BatchesSpooled, m.BatchesDeadLetter,
		m.RecordsDropped, m.SpoolBytes)

	// An age rather than a timestamp, so an alert is a plain threshold; it is
	// computed at scrape time because it grows between shipper events.
	m.ShipMemoryAge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "pinaka_ship_memory_oldest_seconds",
		Help: "Age of the oldest record held only in memory (not yet delivered nor spooled); 0 when none.",
	}, func() float64 {
		if t := m.ShipMemoryOldest.Load(); t != 0 {
			return max(time.Since(time.Unix(0, t)).Seconds(), 0)
		}
		return 0
	})
	m.ShipAttemptsTimedOut = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pinaka_ship_attempts_timed_out_total", Help: "Batch delivery attempts that got no answer within LOG_SHIP_TIMEOUT.",
	})
	m.SpoolFilesSetAside = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pinaka_ship_spool_files_set_aside_total", Help: "Spool files renamed aside (*.corrupt, *.unreadable) and no longer shipped, by reason.",
	}, []string{"reason"})
	m.SpoolReadErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pinaka_ship_spool_read_errors_total", Help: "Times a spool file could be neither read nor moved aside; it stays in the spool and is retried.",
	})
	reg.MustRegister(m.ShipMemoryAge, m.ShipAttemptsTimedOut, m.SpoolFilesSetAside, m.SpoolReadErrors)
	m.registerUDP()
	m.registerTiming()
	return m
}

// Label values must come from fixed sets: a value taken from client or
// origin input would let anyone create series without bound (each costs
// memory for the life of the process and bytes on every scrape).

// MethodLabel is the method label value for m: the method itself if it is
// one of RFC 9110's or PATCH (RFC 5789), else "other".
func MethodLabel(m string) string {
	switch m {
	case "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH":
		return m
	}
	return "other"
}

// StatusLabel is the status label value for code: the code if it is a
// registered one, else its class ("5xx"). Origins may send any three
// digits.
func StatusLabel(code int) string {
	switch {
	case code < 100 || code > 999:
		return "other"
	case http.StatusText(code) != "" || code == 499:
		return strconv.Itoa(code)
	}
	return strconv.Itoa(code/100) + "xx"
}

// Reasons a CONNECT-UDP datagram is dropped (pinaka_udp_datagrams_dropped_total).
const (
	UDPDropOversize    = "oversize"    // UDP payload above the proxy's limit, either way
	UDPDropContextID   = "context_id"  // a context id other than 0 (RFC 9298 §4): no extension is served
	UDPDropTooLarge    = "too_large"   // did not fit one QUIC datagram to the client
	UDPDropUnreachable = "unreachable" // the target's host answered ICMP unreachable (ECONNREFUSED)
	UDPDropMalformed   = "malformed"   // an HTTP datagram without a whole context id
)

// Directions of pinaka_udp_datagrams_total.
const (
	DirectionUpstream   = "upstream"   // client → target
	DirectionDownstream = "downstream" // target → client
)

func (m *Metrics) registerUDP() {
	m.UDPFlows = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "pinaka_udp_flows_active", Help: "CONNECT-UDP flows (RFC 9298, over HTTP/3) open now.",
	})
	m.UDPDatagrams = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pinaka_udp_datagrams_total", Help: "UDP datagrams relayed by CONNECT-UDP flows, by direction: upstream (client to target), downstream.",
	}, []string{"direction"})
	m.UDPDropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pinaka_udp_datagrams_dropped_total", Help: "CONNECT-UDP datagrams dropped, by reason: oversize, context_id, too_large, unreachable, malformed.",
	}, []string{"reason"})
	// Every series exists from the start, so rates and alerts see 0
	// rather than nothing.
	for _, d := range []string{DirectionUpstream, DirectionDownstream} {
		m.UDPDatagrams.WithLabelValues(d)
	}
	for _, r := range []string{UDPDropOversize, UDPDropContextID, UDPDropTooLarge, UDPDropUnreachable, UDPDropMalformed} {
		m.UDPDropped.WithLabelValues(r)
	}
	m.Registry.MustRegister(m.UDPFlows, m.UDPDatagrams, m.UDPDropped)
}
