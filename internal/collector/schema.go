package collector

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// SchemaVersion is the version Migrate records in
// forward_proxy_schema_version.
const SchemaVersion = 1

// migrateLockID serialises Migrate across collectors starting together
// (CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin).
const migrateLockID = 0x70696e616b61 // "pinaka"

// logColumns are the record columns of forward_proxy_request_logs, in COPY
// order, with the type used when adding a column to an older table. They are
// added nullable so the ALTER works on a table that already has rows (for
// example one created by the Rust implementation's backend).
var logColumns = []struct{ name, typ string }{
	{"batch_id", "UUID"},
	{"timestamp", "TIMESTAMPTZ"},
	{"token_id", "VARCHAR(50)"},
	{"user_id", "TEXT"},
	{"token_type", "TEXT"},
	{"region", "TEXT"},
	{"probe_node", "TEXT"},
	{"client_ip", "TEXT"},
	{"protocol", "TEXT"},
	{"method", "TEXT"},
	{"target_url", "TEXT"},
	{"status_code", "INTEGER"},
	{"request_size", "BIGINT"},
	{"response_size", "BIGINT"},
	{"duration_ms", "BIGINT"},
	{"success", "BOOLEAN"},
	{"rate_limited", "BOOLEAN"},
	{"error", "TEXT"},
}

var schema = []string{
	`CREATE TABLE IF NOT EXISTS forward_proxy_schema_version (
		version    INTEGER PRIMARY KEY,
		applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
	)`,
	// One row per stored batch: its primary key makes a batch idempotent.
	`CREATE TABLE IF NOT EXISTS forward_proxy_batches (
		batch_id     UUID PRIMARY KEY,
		probe_node   TEXT NOT NULL,
		region       TEXT NOT NULL,
		record_count INTEGER NOT NULL,
		received_at  TIMESTAMPTZ NOT NULL DEFAULT now()
	)`,
	// token_id is VARCHAR(50) with no foreign key: records of unknown or
	// deleted tokens are stored too.
	`CREATE TABLE IF NOT EXISTS forward_proxy_request_logs (
		id            BIGSERIAL PRIMARY KEY,
		batch_id      UUID NOT NULL,
		received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
		"timestamp"   TIMESTAMPTZ NOT NULL,
		token_id      VARCHAR(50),
		user_id       TEXT,
		token_type    TEXT,
		region        TEXT,
		probe_node    TEXT,
		client_ip     TEXT,
		protocol      TEXT,
		method        TEXT,
		target_url    TEXT,
		status_code   INTEGER,
		request_size  BIGINT,
		response_size BIGINT,
		duration_ms   BIGINT,
		success       BOOLEAN,
		rate_limited  BOOLEAN,
		error         TEXT
	)`,
}

var indexes = []string{
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_timestamp_idx ON forward_proxy_request_logs ("timestamp")`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_token_id_idx ON forward_proxy_request_logs (token_id, "timestamp")`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_batch_id_idx ON forward_proxy_request_logs (batch_id)`,
}

// Migrate creates or upgrades the schema. It is idempotent and safe to run
// from several collectors at once.
func Migrate(ctx context.Context, pool *pgxpool.Pool) error {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLockID)); err != nil {
			return fmt.Errorf("taking the migration lock: %w", err)
		}
		stmts := append([]string(nil), schema...)
		stmts = append(stmts, `ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS received_at TIMESTAMPTZ DEFAULT now()`)
		for _, c := range logColumns {
			stmts = append(stmts, fmt.Sprintf(`ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS %s %s`,
				pgx.Identifier{c.name}.Sanitize(), c.typ))
		}
		stmts = append(stmts, indexes...)
		for _, s := range stmts {
			if _, err := tx.Exec(ctx, s); err != nil {
				return fmt.Errorf("running %q: %w", firstLine(s), err)
			}
		}
		if _, err := tx.Exec(ctx, `INSERT INTO forward_proxy_schema_version (version) VALUES ($1) ON CONFLICT DO NOTHING`, SchemaVersion); err != nil {
			return fmt.Errorf("recording schema version: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("migrating the collector schema: %w", err)
	}
	return nil
}

func firstLine(s string) string {
	for i, r := range s {
		if r == '\n' {
			return s[:i]
		}
	}
	return s
}
