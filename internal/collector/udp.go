package collector

import (
	"math"
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
func udpSchema() []string { return addColumns(udpColumns) }

// udpFields are a flow's counts on the wire: absent or null is NULL.
type udpFields struct {
	DatagramsUp      *int64 `json:"datagrams_up"`
	DatagramsDown    *int64 `json:"datagrams_down"`
	DatagramsDropped *int64 `json:"datagrams_dropped"`
}

// udpFieldNames are their wire names, in udpColumns order.
var udpFieldNames = [...]string{"datagrams_up", "datagrams_down", "datagrams_dropped"}

// check adds the rules the counts break to rule.
func (f *udpFields) check(l *columnLimits, rule func(bool, string, ...any)) {
	for i, v := range [...]*int64{f.DatagramsUp, f.DatagramsDown, f.DatagramsDropped} {
		if v == nil {
			continue
		}
		column := udpFieldNames[i]
		limit := int64(math.MaxInt64)
		if col, ok := l.maxInt[column]; ok {
			limit = min(limit, col)
		}
		rule(*v >= 0, "%s is negative", column)
		rule(*v <= limit, "%s %d is above %d", column, *v, limit)
	}
}

// optInt is a nullable integer column: ok false is NULL.
type optInt struct {
	n  int64
	ok bool
}

func optI(p *int64) optInt {
	if p == nil {
		return optInt{}
	}
	return optInt{*p, true}
}

// value is o for pgx's CopyFrom: nil or an int64.
func (o optInt) value() any {
	if !o.ok {
		return nil
	}
	return o.n
}

func appendOptInt(buf []byte, k pgKind, o optInt) ([]byte, bool) {
	if !o.ok {
		return appendNull(buf), true
	}
	return appendInt(buf, k, o.n)
}
