package collector

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Records are stored in forward_proxy_request_logs, range-partitioned by
// day (UTC) on "timestamp": retention drops a day with DROP TABLE instead
// of a DELETE that bloats the table, and every index stays the size of a
// day. Idempotency stays on forward_proxy_batches (not partitioned, batch_id
// its primary key), written in the same transaction as the records: a
// unique key on a partitioned table must contain the partition key, so the
// records table itself cannot say "this batch_id once".
const (
	logsTable   = "forward_proxy_request_logs"
	legacyTable = logsTable + "_legacy"

	// partitionsAhead: the collector keeps partitions for today and the next
	// partitionsAhead days (UTC), at start and every maintenanceEvery, so
	// that ingest never waits for one in normal operation. A record of a
	// day without a partition (a late spool, a skewed clock) gets its
	// partition created on demand.
	partitionsAhead = 7
	// futureDays: a record more than this many days ahead of the
	// collector's clock is kept aside, not stored: a partition per day a
	// broken clock invents would be unbounded.
	futureDays = partitionsAhead + 1
	// pastDaysUnlimited bounds the age of a record whose day needs a new
	// partition when RECORDS_RETENTION_DAYS is unset (with it, the bound
	// is the retention): older records are kept aside. Ten years: no spool
	// waits that long, and a broken clock cannot make more partitions.
	pastDaysUnlimited = 3650

	maintenanceEvery = time.Hour
	// partitionLockID serialises partition creation and retention across
	// collectors on one database.
	partitionLockID = migrateLockID + 1
	// maintenanceLockTimeout bounds how long creating or dropping a
	// partition may wait for the table lock (and so how long it may hold
	// up ingest queued behind it); it is tried again later.
	maintenanceLockTimeout = "5s"
	// pruneChunk is how many batch and rejected-record rows one DELETE of
	// retention removes, so each statement stays short.
	pruneChunk = 10000
)

const day = 24 * time.Hour

// dayOf is the start (UTC) of t's day.
func dayOf(t time.Time) time.Time {
	return t.UTC().Truncate(day)
}

// partitionName is the name of the partition of the day starting at d.
func partitionName(d time.Time) string {
	return logsTable + "_p" + d.Format("20060102")
}

// migratePartitioned turns forward_proxy_request_logs into a table
// partitioned by day when it is not one yet (schema version 4), then
// makes sure today's and the next partitionsAhead days' partitions exist.
// It runs in Migrate's transaction, under its lock: the conversion is all
// or nothing.
//
// An existing table is kept whole as one partition, forward_proxy_request_logs_legacy,
// covering everything before the day after its newest record: no row is
// copied, ids, batch_ids (so the batches' idempotency) and indexes stay.
// An empty one (a fresh database) is replaced.
func migratePartitioned(ctx context.Context, tx pgx.Tx, now time.Time) error {
	// Retention deletes batch rows by age.
	if _, err := tx.Exec(ctx, `CREATE INDEX IF NOT EXISTS forward_proxy_batches_received_at_idx ON forward_proxy_batches (received_at)`); err != nil {
		return fmt.Errorf("indexing forward_proxy_batches: %w", err)
	}
	var kind string
	if err := tx.QueryRow(ctx, `SELECT relkind::text FROM pg_class WHERE oid = $1::regclass`, logsTable).Scan(&kind); err != nil {
		return fmt.Errorf("reading the kind of %s: %w", logsTable, err)
	}
	if kind == "r" {
		if err := convertToPartitioned(ctx, tx); err != nil {
			return fmt.Errorf("partitioning %s: %w", logsTable, err)
		}
	}
	_, err := createPartitions(ctx, tx, daysAhead(now))
	return err
}

// daysAhead is today and the partitionsAhead days after it.
func daysAhead(now time.Time) []time.Time {
	d := dayOf(now)
	days := make([]time.Time, 0, partitionsAhead+1)
	for i := range partitionsAhead + 1 {
		days = append(days, d.AddDate(0, 0, i))
	}
	return days
}

func convertToPartitioned(ctx context.Context, tx pgx.Tx) error {
	exec := func(sql string, args ...any) error {
		if _, err := tx.Exec(ctx, sql, args...); err != nil {
			return fmt.Errorf("running %q: %w", firstLine(sql), err)
		}
		return nil
	}
	legacy := pgx.Identifier{legacyTable}.Sanitize()
	parent := pgx.Identifier{logsTable}.Sanitize()
	if err := exec(`LOCK TABLE ` + parent + ` IN ACCESS EXCLUSIVE MODE`); err != nil {
		return err
	}
	var hasRows bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+parent+`)`).Scan(&hasRows); err != nil {
		return fmt.Errorf("looking for rows: %w", err)
	}
	if err := exec(`ALTER TABLE ` + parent + ` RENAME TO ` + legacy); err != nil {
		return err
	}
	// The old table's indexes keep their names through the rename; the
	// partitioned table's indexes take those names (Migrate creates them
	// with IF NOT EXISTS), so the old ones move aside. ATTACH then adopts
	// them as the legacy partition's indexes instead of building new ones.
	rows, err := tx.Query(ctx, `SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
		WHERE i.indrelid = $1::regclass`, legacyTable)
	if err != nil {
		return fmt.Errorf("listing indexes: %w", err)
	}
	idx, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("listing indexes: %w", err)
	}
	for _, name := range idx {
		rest, ok := strings.CutPrefix(name, logsTable)
		if !ok || strings.HasPrefix(rest, "_legacy") {
			continue
		}
		if err := exec(`ALTER INDEX ` + pgx.Identifier{name}.Sanitize() + ` RENAME TO ` +
			pgx.Identifier{truncateIdent(legacyTable + rest)}.Sanitize()); err != nil {
			return err
		}
	}
	// A range partition holds no NULL key. Rows from before "timestamp"
	// existed (it was added nullable to an older table) take the time they
	// were received, else now.
	if hasRows {
		if err := exec(`UPDATE ` + legacy + ` SET "timestamp" = coalesce(received_at, now()) WHERE "timestamp" IS NULL`); err != nil {
			return err
		}
	}
	if err := exec(`ALTER TABLE ` + legacy + ` ALTER COLUMN "timestamp" SET NOT NULL`); err != nil {
		return err
	}
	// An identity id (a table made by another backend) cannot be copied
	// to a partitioned table here: it becomes a plain column fed by a
	// sequence that starts after the largest id.
	var identity bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::regclass
		AND attname = 'id' AND attidentity <> '' AND NOT attisdropped)`, legacyTable).Scan(&identity); err != nil {
		return fmt.Errorf("reading the id column: %w", err)
	}
	if identity {
		if err := exec(`ALTER TABLE ` + legacy + ` ALTER COLUMN id DROP IDENTITY`); err != nil {
			return err
		}
		if err := exec(`CREATE SEQUENCE IF NOT EXISTS forward_proxy_request_logs_id_seq`); err != nil {
			return err
		}
		if err := exec(`SELECT setval('forward_proxy_request_logs_id_seq', coalesce((SELECT max(id) FROM ` + legacy + `), 0) + 1, false)`); err != nil {
			return err
		}
		if err := exec(`ALTER TABLE ` + legacy + ` ALTER COLUMN id SET DEFAULT nextval('forward_proxy_request_logs_id_seq')`); err != nil {
			return err
		}
	}
	// The same columns, types, NOT NULLs and defaults (id's sequence
	// included), whatever the old table had: ATTACH requires them.
	if err := exec(`CREATE TABLE ` + parent + ` (LIKE ` + legacy + ` INCLUDING DEFAULTS) PARTITION BY RANGE ("timestamp")`); err != nil {
		return err
	}
	var seq *string
	if err := tx.QueryRow(ctx, `SELECT pg_get_serial_sequence($1, 'id')`, legacyTable).Scan(&seq); err != nil {
		// No id column: nothing to hand over.
		seq = nil
	}
	if identity {
		s := "forward_proxy_request_logs_id_seq"
		seq = &s
	}
	if seq != nil {
		if err := exec(`ALTER SEQUENCE ` + *seq + ` OWNED BY ` + parent + `.id`); err != nil {
			return err
		}
	}
	for _, s := range append(indexes[:len(indexes):len(indexes)], timingIndex) {
		if err := exec(s); err != nil {
			return err
		}
	}
	if !hasRows {
		return exec(`DROP TABLE ` + legacy)
	}
	var newest time.Time
	if err := tx.QueryRow(ctx, `SELECT max("timestamp") FROM `+legacy).Scan(&newest); err != nil {
		return fmt.Errorf("reading the newest record: %w", err)
	}
	upper := dayOf(newest).Add(day)
	return exec(`ALTER TABLE ` + parent + ` ATTACH PARTITION ` + legacy + ` FOR VALUES FROM (MINVALUE) TO (` + tsLiteral(upper) + `)`)
}

// truncateIdent keeps a name within PostgreSQL's 63 bytes.
func truncateIdent(s string) string {
	if len(s) > 63 {
		return s[:63]
	}
	return s
}

// tsLiteral is t as a SQL timestamptz literal in UTC.
func tsLiteral(t time.Time) string {
	return "'" + t.UTC().Format("2006-01-02 15:04:05") + "+00'"
}

// span is one partition's range [from, to); a zero from is MINVALUE, a
// zero to MAXVALUE.
type span struct {
	name     string
	from, to time.Time
}

func (s span) covers(d time.Time) bool {
	return (s.from.IsZero() || !d.Before(s.from)) && (s.to.IsZero() || d.Before(s.to))
}

var boundRE = regexp.MustCompile(`^FOR VALUES FROM \((.+)\) TO \((.+)\)$`)

// parseBound reads one side of a range bound as pg_get_expr prints it
// with TimeZone UTC: MINVALUE, MAXVALUE or a quoted timestamptz.
func parseBound(s string) (time.Time, error) {
	if s == "MINVALUE" || s == "MAXVALUE" {
		return time.Time{}, nil
	}
	s = strings.Trim(s, "'")
	for _, layout := range []string{"2006-01-02 15:04:05.999999-07", "2006-01-02 15:04:05.999999-07:00"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("unexpected partition bound %q", s)
}

// listPartitions reads the partitions of forward_proxy_request_logs and
// their ranges. A DEFAULT partition (an operator's) is left out: it covers
// no day of its own and is never dropped.
func listPartitions(ctx context.Context, tx pgx.Tx) ([]span, error) {
	if _, err := tx.Exec(ctx, `SET LOCAL TimeZone = 'UTC'`); err != nil {
		return nil, fmt.Errorf("setting the time zone: %w", err)
	}
	rows, err := tx.Query(ctx, `SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
		FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = $1::regclass`, logsTable)
	if err != nil {
		return nil, fmt.Errorf("listing the partitions of %s: %w", logsTable, err)
	}
	var spans []span
	var name, bound string
	_, err = pgx.ForEachRow(rows, []any{&name, &bound}, func() error {
		if bound == "DEFAULT" {
			return nil
		}
		m := boundRE.FindStringSubmatch(bound)
		if m == nil {
			return fmt.Errorf("partition %s: unexpected bound %q", name, bound)
		}
		from, err := parseBound(m[1])
		if err != nil {
			return fmt.Errorf("partition %s: %w", name, err)
		}
		to, err := parseBound(m[2])
		if err != nil {
			return fmt.Errorf("partition %s: %w", name, err)
		}
		spans = append(spans, span{name: name, from: from, to: to})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing the partitions of %s: %w", logsTable, err)
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].from.Before(spans[j].from) })
	return spans, nil
}

func covered(spans []span, d time.Time) bool {
	for _, s := range spans {
		if s.covers(d) {
			return true
		}
	}
	return false
}

// createPartitions creates the day partitions of days that no partition
// covers, in tx, under partitionLockID, and returns the partitions after.
// A partition is created apart and then attached: ATTACH takes a lock that
// lets the COPYs of other batches go on, where CREATE TABLE ... PARTITION
// OF would stop them while it waits.
func createPartitions(ctx context.Context, tx pgx.Tx, days []time.Time) ([]span, error) {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(partitionLockID)); err != nil {
		return nil, fmt.Errorf("taking the partition lock: %w", err)
	}
	if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '`+maintenanceLockTimeout+`'`); err != nil {
		return nil, fmt.Errorf("setting lock_timeout: %w", err)
	}
	spans, err := listPartitions(ctx, tx)
	if err != nil {
		return nil, err
	}
	for _, d := range days {
		d = dayOf(d)
		if covered(spans, d) {
			continue
		}
		name := pgx.Identifier{partitionName(d)}.Sanitize()
		for _, q := range []string{
			`CREATE TABLE ` + name + ` (LIKE ` + logsTable + ` INCLUDING DEFAULTS)`,
			`ALTER TABLE ` + logsTable + ` ATTACH PARTITION ` + name + ` FOR VALUES FROM (` + tsLiteral(d) + `) TO (` + tsLiteral(d.Add(day)) + `)`,
		} {
			if _, err := tx.Exec(ctx, q); err != nil {
				return nil, fmt.Errorf("creating partition %s: %w", partitionName(d), err)
			}
		}
		spans = append(spans, span{name: partitionName(d), from: d, to: d.Add(day)})
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].from.Before(spans[j].from) })
	return spans, nil
}

// partitions is a collector's view of the partitions of
// forward_proxy_request_logs: the days it can store without DDL, and the
// window of days it accepts at all.
type partitions struct {
	pool          *pgxpool.Pool
	retentionDays int // 0: keep everything
	now           func() time.Time

	mu    sync.Mutex
	spans []span // nil: not read yet, or stale
	// plan is the binary COPY plan (ingest.go), read once planLoaded is
	// false.
	plan       *copyPlan
	planLoaded bool
}

func newPartitions(pool *pgxpool.Pool, retentionDays int, now func() time.Time) *partitions {
	if now == nil {
		now = time.Now
	}
	return &partitions{pool: pool, retentionDays: retentionDays, now: now}
}

// cutoff is the start of the oldest instant kept: a partition whose range
// ends at or before it is dropped, and a record before it is not stored.
// Zero when everything is kept.
func (p *partitions) cutoff(now time.Time) time.Time {
	if p.retentionDays <= 0 {
		return time.Time{}
	}
	return now.Add(-time.Duration(p.retentionDays) * day)
}

// window says whether a record of time ts may be stored now, and if not,
// why (the reason kept with the record in forward_proxy_rejected_records).
// A record older than the retention would be dropped with its partition
// at once; one from the far future or the far past would need a partition
// of its own for nothing.
func (p *partitions) window(ts time.Time) string {
	now := p.now()
	if ts.After(dayOf(now).Add(futureDays * day)) {
		return fmt.Sprintf("timestamp is more than %d days ahead of the collector's clock", futureDays)
	}
	if c := p.cutoff(now); !c.IsZero() {
		if !dayOf(ts).Add(day).After(c) {
			return fmt.Sprintf("timestamp is older than RECORDS_RETENTION_DAYS (%d days)", p.retentionDays)
		}
		return ""
	}
	if ts.Before(dayOf(now).Add(-pastDaysUnlimited*day)) && !p.coveredCached(ts) {
		return fmt.Sprintf("timestamp is more than %d days old", pastDaysUnlimited)
	}
	return ""
}

func (p *partitions) coveredCached(ts time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.spans != nil && covered(p.spans, dayOf(ts))
}

// ensure makes sure a partition holds each of days, creating the missing
// ones in a transaction of their own (so that a batch's transaction never
// holds a lock on the table's definition).
func (p *partitions) ensure(ctx context.Context, days []time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.spans != nil {
		missing := false
		for _, d := range days {
			missing = missing || !covered(p.spans, d)
		}
		if !missing {
			return nil
		}
	}
	return pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		spans, err := createPartitions(ctx, tx, days)
		if err != nil {
			return err
		}
		p.spans = spans
		return nil
	})
}

// forget marks the view stale: after a failed write, a partition may have
// been dropped by another collector's retention.
func (p *partitions) forget() {
	p.mu.Lock()
	p.spans = nil
	p.planLoaded = false
	p.mu.Unlock()
}

// maintenanceResult is what one maintenance round did.
type maintenanceResult struct {
	created, dropped      []string
	batches, rejectedRows int64
}

// maintain creates the partitions ahead and applies the retention: it
// drops the partitions whose range ends at or before the cutoff, and
// deletes the batch rows and rejected records received before it. It runs
// under partitionLockID; a collector that finds another one at it skips
// the round (skipped true).
func (p *partitions) maintain(ctx context.Context) (res maintenanceResult, skipped bool, err error) {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	err = pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		var got bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock($1)`, int64(partitionLockID)).Scan(&got); err != nil {
			return fmt.Errorf("taking the partition lock: %w", err)
		}
		if !got {
			skipped = true
			return nil
		}
		before, err := listPartitions(ctx, tx)
		if err != nil {
			return err
		}
		spans, err := createPartitions(ctx, tx, daysAhead(now))
		if err != nil {
			return err
		}
		for _, s := range spans {
			if !covered(before, s.from) {
				res.created = append(res.created, s.name)
			}
		}
		cut := p.cutoff(now)
		if cut.IsZero() {
			p.spans = spans
			return nil
		}
		kept := spans[:0:0]
		for _, s := range spans {
			if s.to.IsZero() || s.to.After(cut) {
				kept = append(kept, s)
				continue
			}
			if _, err := tx.Exec(ctx, `DROP TABLE `+pgx.Identifier{s.name}.Sanitize()); err != nil {
				return fmt.Errorf("dropping partition %s: %w", s.name, err)
			}
			res.dropped = append(res.dropped, s.name)
		}
		p.spans = kept
		return nil
	})
	if err != nil || skipped {
		p.spans = nil
		return res, skipped, err
	}
	if cut := p.cutoff(now); !cut.IsZero() {
		// Outside the DDL transaction, in chunks: these are ordinary
		// rows, and a long DELETE would hold back vacuum.
		res.batches, err = pruneRows(ctx, p.pool, "forward_proxy_batches", "batch_id", cut)
		if err != nil {
			return res, false, err
		}
		res.rejectedRows, err = pruneRows(ctx, p.pool, "forward_proxy_rejected_records", "id", cut)
		if err != nil {
			return res, false, err
		}
	}
	return res, false, nil
}

// pruneRows deletes the rows of table received before cut, pruneChunk at a
// time.
func pruneRows(ctx context.Context, pool *pgxpool.Pool, table, key string, cut time.Time) (int64, error) {
	t, k := pgx.Identifier{table}.Sanitize(), pgx.Identifier{key}.Sanitize()
	var total int64
	for {
		tag, err := pool.Exec(ctx, `DELETE FROM `+t+` WHERE `+k+` IN (SELECT `+k+` FROM `+t+
			` WHERE received_at < $1 LIMIT $2)`, cut, pruneChunk)
		if err != nil {
			return total, fmt.Errorf("pruning %s: %w", table, err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < pruneChunk {
			return total, nil
		}
	}
}

// runMaintenance runs maintain every maintenanceEvery until ctx ends.
// Migrate has already created the partitions ahead at start; the first
// round applies the retention at once.
func runMaintenance(ctx context.Context, p *partitions, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}, failures interface{ Inc() }) {
	t := time.NewTicker(maintenanceEvery)
	defer t.Stop()
	for {
		res, skipped, err := p.maintain(ctx)
		switch {
		case errors.Is(err, context.Canceled):
			return
		case err != nil:
			failures.Inc()
			log.Warn("partition maintenance failed; trying again later", "error", err)
		case skipped:
		case len(res.created)+len(res.dropped) > 0 || res.batches+res.rejectedRows > 0:
			log.Info("partition maintenance", "created", res.created, "dropped", res.dropped,
				"batch_rows_pruned", res.batches, "rejected_records_pruned", res.rejectedRows,
				"retention_days", p.retentionDays)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
