package collector

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Reasons a batch is refused, the values of the reason label of
// pinaka_collector_batches_refused_total: a fixed set, never client text.
const (
	refusedUnauthorized = "unauthorized"  // missing or wrong API key
	refusedNodeMismatch = "node_mismatch" // records claim another node than the certificate
	refusedInvalid      = "invalid"       // not a batch (400) or too large (413)
)

// collectorMetrics are the collector's own metrics, served at GET /metrics
// on its listener (behind the node-certificate requirement when there is
// one).
type collectorMetrics struct {
	reg               *prometheus.Registry
	batchesRefused    *prometheus.CounterVec
	handshakeFailures prometheus.Counter
	tlsReloadFailures prometheus.Counter
	// maintenanceFailures counts partition maintenance rounds that failed
	// (partition.go).
	maintenanceFailures prometheus.Counter
}

func newCollectorMetrics() *collectorMetrics {
	m := &collectorMetrics{
		reg: prometheus.NewRegistry(),
		batchesRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pinaka_collector_batches_refused_total",
			Help: "Batches refused, by reason: unauthorized, node_mismatch (records of another node than the certificate's), invalid.",
		}, []string{"reason"}),
		handshakeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_collector_tls_handshake_failures_total",
			Help: "TLS handshakes that failed: no node certificate, one from another CA, one naming no node, or not TLS at all.",
		}),
		tlsReloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pinaka_collector_tls_reload_failures_total",
			Help: "SIGHUP reloads that refused a certificate, key or client CA bundle (the one in use was kept).",
		}),
	}
	m.maintenanceFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pinaka_collector_partition_maintenance_failures_total",
		Help: "Rounds of partition maintenance (creating the partitions ahead, RECORDS_RETENTION_DAYS) that failed; retried every hour.",
	})
	m.reg.MustRegister(m.maintenanceFailures)
	for _, r := range []string{refusedUnauthorized, refusedNodeMismatch, refusedInvalid} {
		m.batchesRefused.WithLabelValues(r)
	}
	m.reg.MustRegister(m.batchesRefused, m.handshakeFailures, m.tlsReloadFailures)
	return m
}

func (m *collectorMetrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
