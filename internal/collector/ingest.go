package collector

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// store writes one batch in a transaction of its own, after making sure a
// partition holds each day its records fall on: the writers' storeMany
// with a group of one, so that a handler without writers stores as they do.
func (p *partitions) store(ctx context.Context, b *batch, good []row, bad []rejected) (bool, error) {
	stored, err := p.storeMany(ctx, []*job{{b: b, good: good, bad: bad}})
	return stored[0], err
}

// copyPlan returns the binary COPY plan of the records table (nil: use
// pgx), reading it on first use and after forget.
func (p *partitions) copyPlan(ctx context.Context) (*copyPlan, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.planLoaded {
		plan, err := loadCopyPlan(ctx, p.pool)
		if err != nil {
			return nil, err
		}
		p.plan, p.planLoaded = plan, true
	}
	return p.plan, nil
}

// copyBufs recycles the COPY data of batches (about 25 KiB for 100
// records).
var copyBufs = sync.Pool{New: func() any { return new([]byte) }}

// copySegments writes segs into the records table in tx, in one COPY:
// with plan's binary encoding when it applies, else with pgx's CopyFrom.
// It returns the number of rows written.
func copySegments(ctx context.Context, tx pgx.Tx, plan *copyPlan, segs []segment) (int64, error) {
	if plan != nil {
		bp := copyBufs.Get().(*[]byte)
		defer copyBufs.Put(bp)
		if data, ok := plan.encode(*bp, segs); ok {
			*bp = data[:0]
			tag, err := tx.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(data), plan.sql)
			return tag.RowsAffected(), err
		}
	}
	cols := storedColumns()
	var all [][]any
	for _, s := range segs {
		for i := range s.rows {
			all = append(all, append([]any{s.id}, s.rows[i].values()...))
		}
	}
	return tx.CopyFrom(ctx, pgx.Identifier{logsTable}, cols, pgx.CopyFromRows(all))
}

// copyPlan writes rows in COPY's binary format itself, for the column
// types the table has: pgx's CopyFrom encodes each value through its type
// map (about 10 µs of CPU per record here) and asks the server to describe
// the columns first (a round trip per batch). A table with a column type
// the plan does not know (an older backend's table) gets nil, and the
// records go through pgx's CopyFrom as before.
type copyPlan struct {
	sql   string
	kinds []pgKind // per storedColumns entry
}

// pgKind is how a column is written in binary COPY.
type pgKind int

const (
	kindUUID pgKind = iota
	kindText
	kindTimestamp
	kindInt2
	kindInt4
	kindInt8
	kindBool
	kindFloat8
)

var kindOfType = map[string]pgKind{
	"uuid":                        kindUUID,
	"text":                        kindText,
	"character varying":           kindText,
	"character":                   kindText,
	"timestamp with time zone":    kindTimestamp,
	"timestamp without time zone": kindTimestamp,
	"smallint":                    kindInt2,
	"integer":                     kindInt4,
	"bigint":                      kindInt8,
	"boolean":                     kindBool,
	"double precision":            kindFloat8,
}

// loadCopyPlan reads the types of storedColumns in the records table. It
// returns nil (use pgx's CopyFrom) when one is not in kindOfType.
func loadCopyPlan(ctx context.Context, pool *pgxpool.Pool) (*copyPlan, error) {
	rows, err := pool.Query(ctx, `SELECT attname, format_type(atttypid, NULL) FROM pg_attribute
		WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`, logsTable)
	if err != nil {
		return nil, fmt.Errorf("reading the column types of %s: %w", logsTable, err)
	}
	types := map[string]string{}
	var name, typ string
	if _, err := pgx.ForEachRow(rows, []any{&name, &typ}, func() error { types[name] = typ; return nil }); err != nil {
		return nil, fmt.Errorf("reading the column types of %s: %w", logsTable, err)
	}
	p := &copyPlan{}
	cols := storedColumns()
	for i, c := range cols {
		k, ok := kindOfType[types[c]]
		if !ok {
			return nil, nil
		}
		p.kinds = append(p.kinds, k)
		cols[i] = pgx.Identifier{c}.Sanitize()
	}
	p.sql = `COPY ` + logsTable + ` (` + strings.Join(cols, ", ") + `) FROM STDIN WITH (FORMAT binary)`
	return p, nil
}

// pgEpoch is where binary timestamps count from.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

var copyHeader = []byte("PGCOPY\n\xff\r\n\x00\x00\x00\x00\x00\x00\x00\x00\x00")

// segment is the records of one batch: rows, each prefixed with id (the
// batch_id column).
type segment struct {
	id   pgtype.UUID
	rows []row
}

// encode is the COPY data of segs, or false if a value is not of a type
// the plan writes (the caller falls back to pgx).
func (p *copyPlan) encode(buf []byte, segs []segment) ([]byte, bool) {
	if len(p.kinds) != len(logColumns)+len(timingColumns)+len(udpColumns) {
		return nil, false
	}
	buf = append(buf[:0], copyHeader...)
	for _, s := range segs {
		for i := range s.rows {
			var ok bool
			if buf, ok = p.appendRow(buf, s.id, &s.rows[i]); !ok {
				return nil, false
			}
		}
	}
	return binary.BigEndian.AppendUint16(buf, 0xffff), true
}

// appendRow writes one row, batch_id first, in storedColumns order.
func (p *copyPlan) appendRow(buf []byte, id pgtype.UUID, r *row) ([]byte, bool) {
	k := p.kinds
	buf = binary.BigEndian.AppendUint16(buf, uint16(len(k)))
	ok := true
	app := func(b []byte, good bool) {
		buf, ok = b, ok && good
	}
	app(appendUUID(buf, k[0], id))
	app(appendTimestamp(buf, k[1], r.ts))
	for i, s := range [...]string{r.tokenID, r.userID, r.tokenType, r.region, r.probeNode, r.clientIP, r.protocol, r.method, r.targetURL} {
		app(appendText(buf, k[2+i], s))
	}
	for i, n := range [...]int64{r.statusCode, r.requestSize, r.responseSize, r.durationMS} {
		app(appendInt(buf, k[11+i], n))
	}
	app(appendBool(buf, k[15], r.success))
	app(appendBool(buf, k[16], r.rateLimited))
	app(appendText(buf, k[17], r.errText))
	app(appendInt(buf, k[18], r.suppressed))
	app(appendOptText(buf, k[19], r.requestID))
	for i, f := range [...]optFloat{r.dnsMS, r.connectMS, r.tlsMS, r.ttfbMS} {
		app(appendOptFloat(buf, k[20+i], f))
	}
	app(appendOptText(buf, k[24], r.upstreamAddr))
	app(appendOptText(buf, k[25], r.closeReason))
	for i, n := range [...]optInt{r.datagramsUp, r.datagramsDown, r.datagramsDropped} {
		app(appendOptInt(buf, k[26+i], n))
	}
	return buf, ok
}

func appendNull(buf []byte) []byte { return binary.BigEndian.AppendUint32(buf, 0xffffffff) }

func appendUUID(buf []byte, k pgKind, x pgtype.UUID) ([]byte, bool) {
	switch {
	case !x.Valid:
		return appendNull(buf), true
	case k == kindUUID:
		return append(binary.BigEndian.AppendUint32(buf, 16), x.Bytes[:]...), true
	case k == kindText:
		return appendText(buf, k, uuid.UUID(x.Bytes).String())
	}
	return buf, false
}

func appendText(buf []byte, k pgKind, s string) ([]byte, bool) {
	if k != kindText {
		return buf, false
	}
	return append(binary.BigEndian.AppendUint32(buf, uint32(len(s))), s...), true
}

func appendOptText(buf []byte, k pgKind, o optString) ([]byte, bool) {
	if !o.ok {
		return appendNull(buf), true
	}
	return appendText(buf, k, o.s)
}

func appendTimestamp(buf []byte, k pgKind, t time.Time) ([]byte, bool) {
	if k != kindTimestamp {
		return buf, false
	}
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(buf, 8), uint64(t.UnixMicro()-pgEpoch.UnixMicro())), true
}

func appendBool(buf []byte, k pgKind, v bool) ([]byte, bool) {
	if k != kindBool {
		return buf, false
	}
	b := byte(0)
	if v {
		b = 1
	}
	return append(binary.BigEndian.AppendUint32(buf, 1), b), true
}

func appendOptFloat(buf []byte, k pgKind, o optFloat) ([]byte, bool) {
	switch {
	case !o.ok:
		return appendNull(buf), true
	case k != kindFloat8:
		return buf, false
	}
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(buf, 8), math.Float64bits(o.f)), true
}

// appendInt writes n in the column's width; validate has checked that n
// fits it.
func appendInt(buf []byte, k pgKind, n int64) ([]byte, bool) {
	switch k {
	case kindInt2:
		return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(buf, 2), uint16(n)), true
	case kindInt4:
		return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(buf, 4), uint32(n)), true
	case kindInt8:
		return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(buf, 8), uint64(n)), true
	}
	return buf, false
}
