package server

import (
	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/ratelimit"
)

// Label values of counters that alerts and dashboards read with rate() or
// increase(). A labelled counter's series is born on its first increment,
// already at 1, and increase() over a window starting at its first sample
// sees no increase: without these, the first record dropped, the first
// connection shed at MAX_CONNECTIONS and the first spool file set aside
// would not fire their alerts (deploy/prometheus/pinaka-alerts.yml). They
// are created at 0 at start instead. The sets are fixed (docs/OPERATIONS.md
// §8); egress reasons are not listed here: they are many and only feed
// dashboards, where a late-born series costs nothing.
var (
	// authFailureReasons are the reasons internal/proxy counts.
	authFailureReasons = []string{"missing", "invalid", "region", "throttled", "revoked"}
	refusedReasons     = []string{ratelimit.RefusedNode, ratelimit.RefusedPerIP, ratelimit.RefusedUnauthenticated}
	dropReasons        = []string{accesslog.DropQueueFull, accesslog.DropSpoolFull, accesslog.DropSpoolError,
		accesslog.DropMemoryFull, accesslog.DropShutdown, accesslog.DropEncode, accesslog.DropDeadLetterFull}
	setAsideReasons = []string{"corrupt", "unreadable"}
)

// initLabelSets creates the series above at 0.
func initLabelSets(m *metrics.Metrics) {
	for _, r := range authFailureReasons {
		m.AuthFailures.WithLabelValues(r)
	}
	for _, r := range refusedReasons {
		m.ConnectionsRefused.WithLabelValues(r)
	}
	for _, r := range dropReasons {
		m.RecordsDropped.WithLabelValues(r)
	}
	for _, r := range setAsideReasons {
		m.SpoolFilesSetAside.WithLabelValues(r)
	}
}
