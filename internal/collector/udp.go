package collector

import (
	"fmt"
	"math"

	"github.com/jackc/pgx/v5"
)

// udpColumns are the columns of forward_proxy_request_logs that a
// CONNECT-UDP flow's record fills (docs/RECORDS.md, "UDP flows"), after
// timingColumns in COPY order. Nullable: every other record leaves them
// NULL, and a flow's 0 is stored as 0.
var udpColumns = []struct{ name, typ string }{
	{"datagrams_up", "BIGINT"},
	{"datagrams_down", "BIGINT"},
	{"datagrams_dropped", "BIGINT"},
}

// udpSchema is schema version 6: the UDP flow columns, added like the
// timing columns (ADD COLUMN IF NOT EXISTS, to any earlier table,
// partitioned or not).
func udpSchema() []string {
	stmts := make([]string, 0, len(udpColumns))
	for _, c := range udpColumns {
		stmts = append(stmts, fmt.Sprintf(`ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS %s %s`,
			pgx.Identifier{c.name}.Sanitize(), c.typ))
	}
	return stmts
}

// udpFields are a flow's counts on the wire: absent or null is NULL.
type udpFields struct {
	DatagramsUp      *int64 `json:"datagrams_up"`
	DatagramsDown    *int64 `json:"datagrams_down"`
	DatagramsDropped *int64 `json:"datagrams_dropped"`
}

// check adds the rules the counts break to rule, and returns them in
// udpColumns order: nil (NULL) or an int64, which the binary COPY writes
// as it writes the other integers.
func (f *udpFields) check(l *columnLimits, rule func(bool, string, ...any)) []any {
	out := make([]any, 0, len(udpColumns))
	for _, c := range []struct {
		column string
		v      *int64
	}{{"datagrams_up", f.DatagramsUp}, {"datagrams_down", f.DatagramsDown}, {"datagrams_dropped", f.DatagramsDropped}} {
		if c.v == nil {
			out = append(out, nil)
			continue
		}
		limit := int64(math.MaxInt64)
		if col, ok := l.maxInt[c.column]; ok {
			limit = min(limit, col)
		}
		rule(*c.v >= 0, "%s is negative", c.column)
		rule(*c.v <= limit, "%s %d is above %d", c.column, *c.v, limit)
		out = append(out, *c.v)
	}
	return out
}
