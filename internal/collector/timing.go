package collector

import (
	"fmt"
	"math"
	"strings"

	"github.com/jackc/pgx/v5"
)

// timingColumns are the columns of forward_proxy_request_logs that newer
// proxies fill (docs/RECORDS.md, "Timings"), after logColumns in COPY
// order. All nullable: records of older proxies, refusals and requests that
// reached no origin leave them NULL.
var timingColumns = []struct{ name, typ string }{
	{"request_id", "TEXT"},
	{"dns_ms", "DOUBLE PRECISION"},
	{"connect_ms", "DOUBLE PRECISION"},
	{"tls_ms", "DOUBLE PRECISION"},
	{"ttfb_ms", "DOUBLE PRECISION"},
	{"upstream_addr", "TEXT"},
	{"close_reason", "TEXT"},
}

// timingSchema is schema version 4: the timing columns. ADD COLUMN IF NOT
// EXISTS, so it applies to any table an earlier version created, and to a
// partitioned one (PostgreSQL adds the column to every partition).
func timingSchema() []string { return append(addColumns(timingColumns), timingIndex) }

// addColumns adds cols to the records table, to any earlier table of it,
// partitioned or not.
func addColumns(cols []struct{ name, typ string }) []string {
	stmts := make([]string, 0, len(cols))
	for _, c := range cols {
		stmts = append(stmts, fmt.Sprintf(`ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS %s %s`,
			pgx.Identifier{c.name}.Sanitize(), c.typ))
	}
	return stmts
}

// timingIndex finds a record from the id a user quotes. migratePartitioned
// builds it again on the partitioned table, like the indexes of schema.go.
const timingIndex = `CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_request_id_idx ON forward_proxy_request_logs (request_id)`

// timingFields are the record's timing fields on the wire: absent or null
// is NULL in the table.
type timingFields struct {
	RequestID    *string  `json:"request_id"`
	DNSMS        *float64 `json:"dns_ms"`
	ConnectMS    *float64 `json:"connect_ms"`
	TLSMS        *float64 `json:"tls_ms"`
	TTFBMS       *float64 `json:"ttfb_ms"`
	UpstreamAddr *string  `json:"upstream_addr"`
	CloseReason  *string  `json:"close_reason"`
}

// maxTimingMS bounds a timing: a year, far beyond any tunnel, so that a
// nonsense value is refused rather than stored.
const maxTimingMS = 365 * 24 * 3600 * 1000.0

// check adds the rules the timing fields break to rule.
func (f *timingFields) check(l *columnLimits, rule func(bool, string, ...any)) {
	for _, c := range []struct {
		column string
		v      *string
	}{{"request_id", f.RequestID}, {"upstream_addr", f.UpstreamAddr}, {"close_reason", f.CloseReason}} {
		if c.v == nil {
			continue
		}
		rule(strings.IndexByte(*c.v, 0) < 0, "%s contains a NUL character", c.column)
		if limit, ok := l.maxChars[c.column]; ok {
			n := len([]rune(*c.v))
			rule(n <= limit, "%s is %d characters, at most %d", c.column, n, limit)
		}
	}
	for _, c := range []struct {
		column string
		v      *float64
	}{{"dns_ms", f.DNSMS}, {"connect_ms", f.ConnectMS}, {"tls_ms", f.TLSMS}, {"ttfb_ms", f.TTFBMS}} {
		if c.v == nil {
			continue
		}
		rule(*c.v >= 0 && !math.IsNaN(*c.v), "%s is negative", c.column)
		rule(*c.v <= maxTimingMS, "%s %g is above %g", c.column, *c.v, maxTimingMS)
	}
}

// storedColumns are the columns COPY writes, in row order.
func storedColumns() []string {
	cols := make([]string, 0, len(logColumns)+len(timingColumns)+len(udpColumns))
	for _, c := range logColumns {
		cols = append(cols, c.name)
	}
	for _, c := range timingColumns {
		cols = append(cols, c.name)
	}
	for _, c := range udpColumns {
		cols = append(cols, c.name)
	}
	return cols
}
