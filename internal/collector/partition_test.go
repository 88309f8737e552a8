package collector

import (
	"context"
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// partitionNames lists the partitions of forward_proxy_request_logs.
func partitionNames(t *testing.T, pool *pgxpool.Pool) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
		WHERE i.inhparent = 'forward_proxy_request_logs'::regclass ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func relkind(t *testing.T, pool *pgxpool.Pool, table string) string {
	t.Helper()
	var k string
	if err := pool.QueryRow(context.Background(), `SELECT relkind::text FROM pg_class WHERE oid = $1::regclass`, table).Scan(&k); err != nil {
		t.Fatal(err)
	}
	return k
}

// batchAt is a batch of n records on the day of ts.
func batchAt(n int, ts time.Time) accesslog.Batch {
	b := sampleBatch(n)
	for i := range b.Logs {
		b.Logs[i].Timestamp = ts.UTC().Add(time.Duration(i) * time.Second)
	}
	return b
}

// partitionOf is the partition each record of a batch is in.
func partitionsOfBatch(t *testing.T, pool *pgxpool.Pool, batchID string) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT DISTINCT tableoid::regclass::text FROM forward_proxy_request_logs
		WHERE batch_id = $1 ORDER BY 1`, batchID)
	if err != nil {
		t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// A fresh database gets a partitioned table with today's and the next
// partitionsAhead days' partitions; records land in their day's.
func TestPartitionsCreatedAhead(t *testing.T) {
	pool, srv := migrated(t)
	if k := relkind(t, pool, logsTable); k != "p" {
		t.Fatalf("forward_proxy_request_logs relkind %q, want p (partitioned)", k)
	}
	now := time.Now()
	var want []string
	for i := range partitionsAhead + 1 {
		want = append(want, partitionName(dayOf(now).AddDate(0, 0, i)))
	}
	got := partitionNames(t, pool)
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("partition %s missing; have %v", w, got)
		}
	}
	// Migrate again: nothing changes.
	if err := Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	if again := partitionNames(t, pool); !slices.Equal(again, got) {
		t.Errorf("partitions after a second Migrate %v, want %v", again, got)
	}
	// A record of tomorrow and one of today: each in its day's partition.
	b := batchAt(1, now)
	tomorrow := batchAt(1, now.Add(day))
	b.Logs = append(b.Logs, tomorrow.Logs...)
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("answer %d %+v", code, a)
	}
	wantParts := []string{partitionName(dayOf(now)), partitionName(dayOf(now.Add(day)))}
	slices.Sort(wantParts)
	if got := partitionsOfBatch(t, pool, b.BatchID); !slices.Equal(got, wantParts) {
		t.Errorf("records in %v, want %v", got, wantParts)
	}
}

// A record of a day without a partition (a late spool) gets one created;
// one too far ahead of the clock is kept aside, not given a partition.
func TestPartitionOnDemandAndFuture(t *testing.T) {
	pool, srv := migrated(t)
	old := time.Now().AddDate(0, 0, -40)
	b := batchAt(2, old)
	future := batchAt(1, time.Now().Add((futureDays+2)*day))
	b.Logs = append(b.Logs, future.Logs...)
	code, a := post(t, srv.URL, testKey, mustJSON(b))
	if code != 200 || deref(a.Stored) != 2 || deref(a.Rejected) != 1 {
		t.Fatalf("answer %d %+v (stored %v rejected %v), want 2 and 1", code, a, deref(a.Stored), deref(a.Rejected))
	}
	if got := partitionsOfBatch(t, pool, b.BatchID); !slices.Equal(got, []string{partitionName(dayOf(old))}) {
		t.Errorf("records in %v, want [%s]", got, partitionName(dayOf(old)))
	}
	rej := rejectedRows(t, pool, b.BatchID)
	if len(rej) != 1 || rej[0].position != 2 || !strings.Contains(rej[0].reason, "days ahead of the collector's clock") {
		t.Errorf("rejected %+v", rej)
	}
	for _, n := range partitionNames(t, pool) {
		if n == partitionName(dayOf(future.Logs[0].Timestamp)) {
			t.Errorf("a partition was created for the future record: %s", n)
		}
	}
}

// RECORDS_RETENTION_DAYS: a round of maintenance drops the partitions whose
// whole day is older than the retention, with their records, and the batch
// and rejected rows received before it; records already older than that
// are kept aside instead of stored. The clock is the test's.
func TestRetentionDropsADay(t *testing.T) {
	pool, _ := migrated(t)
	ctx := context.Background()
	// The handler reads the clock on its own goroutines.
	var clockNanos atomic.Int64
	setClock := func(t time.Time) { clockNanos.Store(t.UnixNano()) }
	setClock(time.Now())
	parts := newPartitions(pool, 3, func() time.Time { return time.Unix(0, clockNanos.Load()) })
	srv := httptest.NewServer(newHandlerParts(pool, testKey, testLog(), nil, newCollectorMetrics(), parts, nil))
	defer srv.Close()

	// Records of five days ago, posted while they were young (the clock
	// stands five days back), and records of today.
	real := time.Unix(0, clockNanos.Load())
	setClock(real.AddDate(0, 0, -5))
	oldBatch := batchAt(3, real.AddDate(0, 0, -5))
	if code, a := post(t, srv.URL, testKey, mustJSON(oldBatch)); code != 200 || deref(a.Stored) != 3 {
		t.Fatalf("old batch: %d %+v", code, a)
	}
	setClock(real)
	newBatch := batchAt(2, real)
	if code, a := post(t, srv.URL, testKey, mustJSON(newBatch)); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("new batch: %d %+v", code, a)
	}
	oldPart := partitionName(dayOf(oldBatch.Logs[0].Timestamp))
	if !slices.Contains(partitionNames(t, pool), oldPart) {
		t.Fatalf("partition %s was not created", oldPart)
	}
	// A batch and a rejected record received four days ago, one of two
	// days ago (received_at is the database's clock: set by hand).
	for _, q := range []string{
		`UPDATE forward_proxy_batches SET received_at = now() - interval '4 days' WHERE batch_id = '` + oldBatch.BatchID + `'`,
		`INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count, received_at)
			VALUES ('` + uuid.NewString() + `', 'n', 'r', 0, now() - interval '2 days')`,
		`INSERT INTO forward_proxy_rejected_records (batch_id, probe_node, position, reason, record, received_at)
			VALUES ('` + oldBatch.BatchID + `', 'n', 9, 'x', '{}', now() - interval '4 days')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}

	res, skipped, err := parts.maintain(ctx)
	if err != nil || skipped {
		t.Fatalf("maintain: %+v skipped %v err %v", res, skipped, err)
	}
	if !slices.Equal(res.dropped, []string{oldPart}) {
		t.Errorf("dropped %v, want [%s]", res.dropped, oldPart)
	}
	if slices.Contains(partitionNames(t, pool), oldPart) {
		t.Errorf("partition %s still there", oldPart)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1`, oldBatch.BatchID); n != 0 {
		t.Errorf("%d records of the old day left", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1`, newBatch.BatchID); n != 2 {
		t.Errorf("%d records of today, want 2", n)
	}
	if res.batches != 1 || res.rejectedRows != 1 {
		t.Errorf("pruned %d batch rows and %d rejected records, want 1 and 1", res.batches, res.rejectedRows)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_batches`); n != 2 {
		t.Errorf("%d batch rows left, want 2 (today's and the one of two days ago)", n)
	}
	// Today's partitions and those ahead are kept (and exist).
	for i := range partitionsAhead + 1 {
		if !slices.Contains(partitionNames(t, pool), partitionName(dayOf(real).AddDate(0, 0, i))) {
			t.Errorf("partition of today+%d missing after maintenance", i)
		}
	}
	// A record older than the retention is kept aside, not stored into
	// a partition that the next round would drop.
	late := batchAt(1, real.AddDate(0, 0, -5))
	code, a := post(t, srv.URL, testKey, mustJSON(late))
	if code != 200 || deref(a.Stored) != 0 || deref(a.Rejected) != 1 {
		t.Fatalf("late batch: %d %+v", code, a)
	}
	if rej := rejectedRows(t, pool, late.BatchID); len(rej) != 1 || !strings.Contains(rej[0].reason, "RECORDS_RETENTION_DAYS") {
		t.Errorf("rejected %+v", rej)
	}
	if slices.Contains(partitionNames(t, pool), oldPart) {
		t.Errorf("partition %s created again for a record older than the retention", oldPart)
	}
	// Without a retention nothing is dropped.
	keep := newPartitions(pool, 0, func() time.Time { return real.AddDate(1, 0, 0) })
	before := partitionNames(t, pool)
	if res, _, err := keep.maintain(ctx); err != nil || len(res.dropped) != 0 {
		t.Errorf("maintain without retention: %+v %v", res, err)
	}
	for _, n := range before {
		if !slices.Contains(partitionNames(t, pool), n) {
			t.Errorf("partition %s dropped without a retention", n)
		}
	}
}

// unpartitionedSchema makes the schema a version 4 collector made (the
// statements of schema.go before partitioning).
func unpartitionedSchema(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	ctx := context.Background()
	// Version 4 (the timing columns) left the table unpartitioned too.
	stmts := append(append(append([]string(nil), schema...), indexes...), revocationSchema...)
	stmts = append(stmts, timingSchema()...)
	// Not version 4's, but the rows below are stored by today's code,
	// which writes them; version 6 only adds columns, which partitioning
	// carries over like the others.
	stmts = append(stmts, udpSchema()...)
	stmts = append(stmts, `ALTER TABLE forward_proxy_batches ADD COLUMN IF NOT EXISTS rejected_count INTEGER NOT NULL DEFAULT 0`,
		`INSERT INTO forward_proxy_schema_version (version) VALUES (4)`)
	for _, s := range stmts {
		if _, err := pool.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", firstLine(s), err)
		}
	}
}

// An unpartitioned table with rows (version 4) is partitioned in place
// when a collector starts: every row, id and batch_id kept, the batches
// still idempotent, new records in day partitions, ids continuing.
func TestMigratesUnpartitionedTableInPlace(t *testing.T) {
	pool, dsn := testDB(t)
	ctx := context.Background()
	unpartitionedSchema(t, pool)
	if k := relkind(t, pool, logsTable); k != "r" {
		t.Fatalf("setup: relkind %q", k)
	}
	// Two stored batches, of two days long ago and yesterday, stored by
	// the version 4 code path (the handler's store on the plain table).
	yesterday := time.Now().Add(-day)
	b1, b2 := batchAt(3, time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)), batchAt(2, yesterday)
	lim, err := loadLimits(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []accesslog.Batch{b1, b2} {
		d, err := decode(strings.NewReader(string(mustJSON(b))))
		if err != nil {
			t.Fatal(err)
		}
		good, bad := d.sort(lim, nil)
		if ok, err := store(ctx, pool, d, good, bad, nil); err != nil || !ok {
			t.Fatalf("storing into the unpartitioned table: %v %v", ok, err)
		}
	}
	type oldRow struct {
		id      int64
		batch   string
		token   string
		ts      time.Time
		success bool
	}
	read := func(where string) []oldRow {
		rows, err := pool.Query(ctx, `SELECT id, batch_id::text, token_id, "timestamp", success FROM forward_proxy_request_logs `+where+` ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (oldRow, error) {
			var o oldRow
			err := r.Scan(&o.id, &o.batch, &o.token, &o.ts, &o.success)
			return o, err
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	before := read("")
	if len(before) != 5 {
		t.Fatalf("setup: %d rows", len(before))
	}

	url := startCollector(t, dsn, Config{})

	if k := relkind(t, pool, logsTable); k != "p" {
		t.Fatalf("after start: relkind %q, want p", k)
	}
	if after := read(""); !slices.Equal(after, before) {
		t.Errorf("rows after migration:\n%v\nwant\n%v", after, before)
	}
	names := partitionNames(t, pool)
	if !slices.Contains(names, legacyTable) {
		t.Errorf("no legacy partition in %v", names)
	}
	if got := read(`WHERE tableoid = 'forward_proxy_request_logs_legacy'::regclass`); len(got) != 5 {
		t.Errorf("%d rows in the legacy partition, want 5", len(got))
	}
	// The legacy partition ends at the day after its newest record; the
	// day partitions go on from there.
	for i := range partitionsAhead + 1 {
		d := dayOf(time.Now()).AddDate(0, 0, i)
		if !slices.Contains(names, partitionName(d)) {
			t.Errorf("partition %s missing in %v", partitionName(d), names)
		}
	}
	// The idempotency keys survived: both old batches are duplicates.
	for _, b := range []accesslog.Batch{b1, b2} {
		if code, a := post(t, url, testKey, mustJSON(b)); code != 200 || a.Status != "duplicate" {
			t.Errorf("old batch posted again: %d %+v, want duplicate", code, a)
		}
	}
	// New records: stored in today's partition, ids after the old ones.
	b3 := batchAt(2, time.Now())
	if code, a := post(t, url, testKey, mustJSON(b3)); code != 200 || a.Status != "stored" {
		t.Fatalf("new batch: %d %+v", code, a)
	}
	if got := partitionsOfBatch(t, pool, b3.BatchID); !slices.Equal(got, []string{partitionName(dayOf(time.Now()))}) {
		t.Errorf("new records in %v", got)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1 AND id > $2`, b3.BatchID, before[4].id); n != 2 {
		t.Errorf("%d new rows with ids after %d, want 2", n, before[4].id)
	}
	// The indexes are the partitioned table's, under their names.
	for _, idx := range []string{"forward_proxy_request_logs_timestamp_idx", "forward_proxy_request_logs_token_id_idx", "forward_proxy_request_logs_batch_id_idx"} {
		if k := relkind(t, pool, idx); k != "I" {
			t.Errorf("index %s relkind %q, want I (partitioned index)", idx, k)
		}
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_schema_version WHERE version = $1`, SchemaVersion); n != 1 {
		t.Errorf("schema version %d not recorded", SchemaVersion)
	}
	// And a second start changes nothing.
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if after := read(`WHERE batch_id <> '` + b3.BatchID + `'`); !slices.Equal(after, before) {
		t.Errorf("rows after a second Migrate differ")
	}
}

// A table made by another backend, with an identity id, narrower columns
// and a row without a timestamp, is partitioned too and takes batches.
func TestMigratesForeignTable(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	for _, q := range []string{
		`CREATE TABLE forward_proxy_request_logs (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
			token_id VARCHAR(50), status_code SMALLINT, created_at TIMESTAMPTZ NOT NULL DEFAULT now())`,
		`INSERT INTO forward_proxy_request_logs (token_id, status_code) VALUES ('rust-1', 200), ('rust-2', 404)`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if k := relkind(t, pool, logsTable); k != "p" {
		t.Fatalf("relkind %q", k)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id LIKE 'rust-%' AND "timestamp" IS NOT NULL`); n != 2 {
		t.Errorf("%d old rows with a timestamp, want 2", n)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	b := batchAt(2, time.Now())
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("answer %d %+v", code, a)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1 AND id > 2 AND created_at IS NOT NULL`, b.BatchID); n != 2 {
		t.Errorf("%d new rows with new ids and created_at, want 2", n)
	}
}

// Two collectors on one database, every batch posted to both at once (and
// twice to each): each batch is stored exactly once, answered "stored"
// exactly once. The batches' records fall on days without partitions, so
// the two also race to create the same partitions.
func TestTwoCollectorsStoreEachBatchOnce(t *testing.T) {
	pool, dsn := testDB(t)
	urls := []string{startCollector(t, dsn, Config{}), startCollector(t, dsn, Config{})}
	const batches, size = 40, 20
	bodies := make([][]byte, batches)
	ids := make([]string, batches)
	for i := range bodies {
		b := batchAt(size, time.Now().AddDate(0, 0, -20-i%5))
		bodies[i], ids[i] = mustJSON(b), b.BatchID
	}
	var mu sync.Mutex
	stored := map[string]int{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range bodies {
		for _, u := range append(urls, urls...) {
			wg.Go(func() {
				<-start
				code, a := post(t, u, testKey, bodies[i])
				if code != 200 || (a.Status != "stored" && a.Status != "duplicate") {
					t.Errorf("batch %d: %d %+v", i, code, a)
					return
				}
				if a.Status == "stored" {
					mu.Lock()
					stored[a.BatchID]++
					mu.Unlock()
				}
			})
		}
	}
	close(start)
	wg.Wait()
	for _, id := range ids {
		if stored[id] != 1 {
			t.Errorf("batch %s answered stored %d times", id, stored[id])
		}
		if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1`, id); n != size {
			t.Errorf("batch %s: %d rows, want %d", id, n, size)
		}
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != batches*size {
		t.Errorf("%d rows, want %d", n, batches*size)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_batches`); n != batches {
		t.Errorf("%d batch rows, want %d", n, batches)
	}
}

func TestLoadConfigRetention(t *testing.T) {
	env := func(v string) func(string) (string, bool) { return configWith("RECORDS_RETENTION_DAYS", v) }
	for v, want := range map[string]int{"unset": 0, "": 0, "0": 0, "30": 30, " 7 ": 7} {
		c, err := LoadConfig(env(v))
		if err != nil || c.RetentionDays != want {
			t.Errorf("RECORDS_RETENTION_DAYS=%q: %d, %v; want %d", v, c.RetentionDays, err, want)
		}
	}
	for _, v := range []string{"-1", "30d", "1.5", "100001", "many"} {
		if _, err := LoadConfig(env(v)); err == nil || !strings.Contains(err.Error(), "RECORDS_RETENTION_DAYS") {
			t.Errorf("RECORDS_RETENTION_DAYS=%q: %v, want an error naming it", v, err)
		}
	}
}

func TestParseBound(t *testing.T) {
	for in, want := range map[string]time.Time{
		"MINVALUE":                 {},
		"'2025-03-04 00:00:00+00'": time.Date(2025, 3, 4, 0, 0, 0, 0, time.UTC),
		"'2025-03-04 02:00:00+02'": time.Date(2025, 3, 4, 0, 0, 0, 0, time.UTC),
	} {
		got, err := parseBound(in)
		if err != nil || !got.Equal(want) {
			t.Errorf("parseBound(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseBound("'tomorrow'"); err == nil {
		t.Error("parseBound accepted 'tomorrow'")
	}
}

// The version 4 code path: one batch per transaction into the plain
// table, kept here to build the tables the migration starts from.

// store writes a batch in one transaction. The batch row goes first: if its
// batch_id is already there (a retry, or a concurrent twin that committed
// first) nothing is written and stored is false. The rejected records are
// written in the same transaction, so a retried batch stores neither its
// good nor its rejected records twice.
//
// plan (nil: pgx's encoding) writes the records in binary COPY (ingest.go).
func store(ctx context.Context, pool *pgxpool.Pool, b *batch, good []row, bad []rejected, plan *copyPlan) (stored bool, err error) {
	pgID := pgtype.UUID{Bytes: b.id, Valid: true}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count, rejected_count)
			VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING`,
			pgID, b.probeNode, b.region, len(b.logs), len(bad))
		if err != nil {
			return fmt.Errorf("inserting batch %s: %w", b.id, err)
		}
		if tag.RowsAffected() == 0 {
			return nil
		}
		stored = true
		n, err := copyRecords(ctx, tx, plan, pgID, good)
		if err != nil {
			return fmt.Errorf("copying %d records of batch %s: %w", len(good), b.id, err)
		}
		if n != int64(len(good)) {
			return fmt.Errorf("copying batch %s: %d of %d records written", b.id, n, len(good))
		}
		if len(bad) == 0 {
			return nil
		}
		n, err = tx.CopyFrom(ctx, pgx.Identifier{"forward_proxy_rejected_records"},
			[]string{"batch_id", "probe_node", "position", "reason", "record"},
			pgx.CopyFromSlice(len(bad), func(i int) ([]any, error) {
				return []any{pgID, b.probeNode, bad[i].position, bad[i].reason, bad[i].raw}, nil
			}))
		if err != nil {
			return fmt.Errorf("copying %d rejected records of batch %s: %w", len(bad), b.id, err)
		}
		if n != int64(len(bad)) {
			return fmt.Errorf("copying rejected records of batch %s: %d of %d written", b.id, n, len(bad))
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	return stored, nil
}

// copyRecords writes rows, each prefixed with id, into the records table
// in tx. It returns the number of rows written.
func copyRecords(ctx context.Context, tx pgx.Tx, plan *copyPlan, id pgtype.UUID, rows []row) (int64, error) {
	return copySegments(ctx, tx, plan, []segment{{id: id, rows: rows}})
}
