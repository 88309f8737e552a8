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

// store writes a batch (see store in handler.go) after making sure a
// partition holds each day its records fall on.
func (p *partitions) store(ctx context.Context, b *batch, good []row, bad []rejected) (bool, error) {
	var days []time.Time
	seen := map[time.Time]bool{}
	for _, r := range good {
		d := dayOf(r[0].(time.Time))
		if !seen[d] {
			seen[d] = true
			days = append(days, d)
		}
	}
	if err := p.ensure(ctx, days); err != nil {
		return false, fmt.Errorf("creating partitions for batch %s: %w", b.id, err)
	}
	plan, err := p.copyPlan(ctx)
	if err != nil {
		return false, err
	}
	stored, err := store(ctx, p.pool, b, good, bad, plan)
	if err != nil {
		p.forget()
	}
	return stored, err
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

// copyRecords writes rows, each prefixed with id, into the records table
// in tx. It returns the number of rows written.
func copyRecords(ctx context.Context, tx pgx.Tx, plan *copyPlan, id pgtype.UUID, rows []row) (int64, error) {
	return copySegments(ctx, tx, plan, []segment{{id: id, rows: rows}})
}

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
		for _, r := range s.rows {
			all = append(all, append([]any{s.id}, r...))
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
	buf = append(buf[:0], copyHeader...)
	for _, s := range segs {
		for _, r := range s.rows {
			if len(r)+1 != len(p.kinds) {
				return nil, false
			}
			buf = binary.BigEndian.AppendUint16(buf, uint16(len(p.kinds)))
			var ok bool
			if buf, ok = appendValue(buf, p.kinds[0], s.id); !ok {
				return nil, false
			}
			for i, v := range r {
				if buf, ok = appendValue(buf, p.kinds[i+1], v); !ok {
					return nil, false
				}
			}
		}
	}
	return binary.BigEndian.AppendUint16(buf, 0xffff), true
}

func appendValue(buf []byte, k pgKind, v any) ([]byte, bool) {
	field := func(b []byte) []byte {
		return append(binary.BigEndian.AppendUint32(buf, uint32(len(b))), b...)
	}
	if v == nil {
		return binary.BigEndian.AppendUint32(buf, 0xffffffff), true
	}
	var n int64
	switch x := v.(type) {
	case *string: // the optional timing fields (timing.go)
		if x == nil {
			return binary.BigEndian.AppendUint32(buf, 0xffffffff), true
		}
		return appendValue(buf, k, *x)
	case *float64:
		if x == nil {
			return binary.BigEndian.AppendUint32(buf, 0xffffffff), true
		}
		if k != kindFloat8 {
			return nil, false
		}
		return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(buf, 8), math.Float64bits(*x)), true
	case pgtype.UUID:
		switch {
		case !x.Valid:
			return binary.BigEndian.AppendUint32(buf, 0xffffffff), true
		case k == kindUUID:
			return field(x.Bytes[:]), true
		case k == kindText:
			return field([]byte(uuid.UUID(x.Bytes).String())), true
		}
		return nil, false
	case string:
		if k != kindText {
			return nil, false
		}
		buf = binary.BigEndian.AppendUint32(buf, uint32(len(x)))
		return append(buf, x...), true
	case time.Time:
		if k != kindTimestamp {
			return nil, false
		}
		buf = binary.BigEndian.AppendUint32(buf, 8)
		return binary.BigEndian.AppendUint64(buf, uint64(x.UnixMicro()-pgEpoch.UnixMicro())), true
	case bool:
		if k != kindBool {
			return nil, false
		}
		b := byte(0)
		if x {
			b = 1
		}
		return append(binary.BigEndian.AppendUint32(buf, 1), b), true
	case int64:
		n = x
	case int:
		n = int64(x)
	case int32:
		n = int64(x)
	default:
		return nil, false
	}
	// validate has checked that n fits the column.
	switch k {
	case kindInt2:
		return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(buf, 2), uint16(n)), true
	case kindInt4:
		return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(buf, 4), uint32(n)), true
	case kindInt8:
		return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(buf, 8), uint64(n)), true
	}
	return nil, false
}
