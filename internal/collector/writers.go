package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// The collector's writers store the batches that arrive together in one
// transaction: one INSERT of their batch rows, one COPY of their records,
// one commit. Measured on the 2-core test machine (docs/PERFORMANCE.md,
// "Collector ingest"), eight backends each copying 100 records cost
// PostgreSQL about twice the CPU per record of two backends copying
// several batches at once (they contend for the same last pages of the
// table and its indexes), and every transaction costs a commit and four
// round trips. So requests queue for a few writers instead of each taking
// a connection of its own.
const (
	// DefaultWriters is COLLECTOR_WRITERS' default.
	DefaultWriters = 2
	// maxWriters bounds COLLECTOR_WRITERS.
	maxWriters = 64
	// groupMaxRecords and groupMaxBatches bound one transaction: a writer
	// takes what is waiting, up to these.
	groupMaxRecords = 5000
	groupMaxBatches = 64
	// groupTimeout bounds one transaction of a group.
	groupTimeout = time.Minute
)

// job is a batch waiting for a writer.
type job struct {
	b    *batch
	good []row
	bad  []rejected
	done chan jobResult // buffered: a writer never waits for a handler that left
}

type jobResult struct {
	stored bool
	err    error
}

// writers feeds queued batches to n goroutines, each storing what is
// waiting in one transaction.
type writers struct {
	parts *partitions
	log   *slog.Logger
	jobs  chan *job
}

// startWriters starts n writers that run until ctx ends; store must not
// be called after that.
func startWriters(ctx context.Context, parts *partitions, n int, log *slog.Logger) *writers {
	w := &writers{parts: parts, log: log, jobs: make(chan *job, groupMaxBatches*n)}
	for range n {
		go w.run(ctx)
	}
	return w
}

// store queues a batch and waits for its writer's answer (or for ctx: the
// request's, whose client left; the batch is then stored or not, and its
// retry finds out which).
func (w *writers) store(ctx context.Context, b *batch, good []row, bad []rejected) (bool, error) {
	j := &job{b: b, good: good, bad: bad, done: make(chan jobResult, 1)}
	select {
	case w.jobs <- j:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	select {
	case r := <-j.done:
		return r.stored, r.err
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

func (w *writers) run(ctx context.Context) {
	for {
		var first *job
		select {
		case first = <-w.jobs:
		case <-ctx.Done():
			return
		}
		group, records := []*job{first}, len(first.good)
	take:
		for len(group) < groupMaxBatches && records < groupMaxRecords {
			select {
			case j := <-w.jobs:
				group = append(group, j)
				records += len(j.good)
			default:
				break take
			}
		}
		w.storeGroup(ctx, group)
	}
}

// storeGroup stores a group in one transaction. If that fails and the
// group has several batches, each is tried alone, so that a batch that
// cannot be stored fails only itself.
func (w *writers) storeGroup(ctx context.Context, group []*job) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), groupTimeout)
	defer cancel()
	stored, err := w.parts.storeMany(ctx, group)
	if err != nil && len(group) > 1 {
		w.log.Warn("storing a group of batches failed; storing each alone", "batches", len(group), "error", err)
		for _, j := range group {
			s, err := w.parts.storeMany(ctx, []*job{j})
			j.done <- jobResult{stored: s[0], err: err}
		}
		return
	}
	for i, j := range group {
		j.done <- jobResult{stored: stored[i], err: err}
	}
}

// insertBatches inserts the batch rows of a group, in batch_id order (two
// transactions inserting some of the same ids then wait for each other in
// the same order, never in a cycle), and returns the ids it inserted: the
// others were stored before, or by a transaction that committed first.
const insertBatches = `INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count, rejected_count)
	SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[]) ORDER BY 1
	ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id`

// storeMany stores the batches of group in one transaction and says, for
// each, whether it was stored now (false: a duplicate). A batch_id twice
// in the group is stored once.
func (p *partitions) storeMany(ctx context.Context, group []*job) ([]bool, error) {
	var days []time.Time
	seen := map[time.Time]bool{}
	for _, j := range group {
		for _, r := range j.good {
			if d := dayOf(r.ts); !seen[d] {
				seen[d] = true
				days = append(days, d)
			}
		}
	}
	if err := p.ensure(ctx, days); err != nil {
		return make([]bool, len(group)), fmt.Errorf("creating partitions: %w", err)
	}
	plan, err := p.copyPlan(ctx)
	if err != nil {
		return make([]bool, len(group)), err
	}
	order := make([]int, len(group))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return slices.Compare(group[a].b.id[:], group[b].b.id[:]) })
	var ids []pgtype.UUID
	var nodes, regions []string
	var counts, rejectedCounts []int32
	first := map[uuid.UUID]int{} // batch_id → its first job
	for _, i := range order {
		b := group[i].b
		if _, dup := first[b.id]; dup {
			continue
		}
		first[b.id] = i
		ids = append(ids, pgtype.UUID{Bytes: b.id, Valid: true})
		nodes, regions = append(nodes, b.probeNode), append(regions, b.region)
		counts, rejectedCounts = append(counts, int32(len(b.logs))), append(rejectedCounts, int32(len(group[i].bad)))
	}
	stored := make([]bool, len(group))
	err = pgx.BeginFunc(ctx, p.pool, func(tx pgx.Tx) error {
		clear(stored)
		rows, err := tx.Query(ctx, insertBatches, ids, nodes, regions, counts, rejectedCounts)
		if err != nil {
			return fmt.Errorf("inserting %d batch rows: %w", len(ids), err)
		}
		inserted, err := pgx.CollectRows(rows, pgx.RowTo[pgtype.UUID])
		if err != nil {
			return fmt.Errorf("inserting %d batch rows: %w", len(ids), err)
		}
		var segs []segment
		var bad []keptAside
		want := 0
		for _, id := range inserted {
			i := first[id.Bytes]
			stored[i] = true
			segs = append(segs, segment{id: id, rows: group[i].good})
			want += len(group[i].good)
			for _, r := range group[i].bad {
				bad = append(bad, keptAside{b: group[i].b, r: r})
			}
		}
		n, err := copySegments(ctx, tx, plan, segs)
		if err != nil {
			return fmt.Errorf("copying %d records of %d batches: %w", want, len(segs), err)
		}
		if n != int64(want) {
			return fmt.Errorf("copying %d batches: %d of %d records written", len(segs), n, want)
		}
		if len(bad) == 0 {
			return nil
		}
		n, err = tx.CopyFrom(ctx, pgx.Identifier{"forward_proxy_rejected_records"},
			[]string{"batch_id", "probe_node", "position", "reason", "record"},
			pgx.CopyFromSlice(len(bad), func(i int) ([]any, error) {
				k := bad[i]
				return []any{pgtype.UUID{Bytes: k.b.id, Valid: true}, k.b.probeNode, k.r.position, k.r.reason, k.r.raw}, nil
			}))
		if err != nil {
			return fmt.Errorf("copying %d rejected records: %w", len(bad), err)
		}
		if n != int64(len(bad)) {
			return fmt.Errorf("copying rejected records: %d of %d written", n, len(bad))
		}
		return nil
	})
	if err != nil {
		p.forget()
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("storing %d batches took longer than %s: %w", len(group), groupTimeout, err)
		}
		return make([]bool, len(group)), err
	}
	return stored, nil
}

// keptAside is a rejected record with its batch.
type keptAside struct {
	b *batch
	r rejected
}
