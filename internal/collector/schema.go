package collector

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// SchemaVersion is the version Migrate records in
// forward_proxy_schema_version. 2 added forward_proxy_rejected_records,
// forward_proxy_batches.rejected_count and
// forward_proxy_request_logs.suppressed; 3 the revocation tables
// (revocationSchema); 4 the timing columns of forward_proxy_request_logs
// (timingSchema); 5 forward_proxy_request_logs partitioned by day
// (migratePartitioned); 6 the CONNECT-UDP flow columns (udpSchema).
const SchemaVersion = 6

// tokenIDType is the token_id column: as long as the longest token_id the
// proxy accepts (SPEC §5 says VARCHAR(50)).
var tokenIDType = fmt.Sprintf("VARCHAR(%d)", auth.MaxIDLen)

// migrateLockID serialises Migrate across collectors starting together
// (CREATE TABLE IF NOT EXISTS is not safe against a concurrent twin).
const migrateLockID = 0x70696e616b61 // "pinaka"

// logColumns are the record columns of forward_proxy_request_logs, in COPY
// order (batch_id, then validate's row), with the type used when adding a
// column to an older table. They are added nullable so the ALTER works on a
// table that already has rows (for example one created by the Rust
// implementation's backend).
var logColumns = []struct{ name, typ string }{
	{"batch_id", "UUID"},
	{"timestamp", "TIMESTAMPTZ"},
	{"token_id", tokenIDType},
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
	// Rows stored before the column existed read 0: each stood for itself.
	{"suppressed", "INTEGER DEFAULT 0"},
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
	// Records of a stored batch that failed validate, kept as received.
	// They are written in the batch's transaction, so the batch row makes
	// them idempotent too; the unique key says so in the schema. record is
	// TEXT, not JSON or JSONB: jsonb refuses \u0000, the likeliest reason a
	// record is here, and a value the table refuses would cost the batch.
	`CREATE TABLE IF NOT EXISTS forward_proxy_rejected_records (
		id          BIGSERIAL PRIMARY KEY,
		batch_id    UUID NOT NULL,
		probe_node  TEXT NOT NULL,
		position    INTEGER NOT NULL,
		reason      TEXT NOT NULL,
		record      TEXT NOT NULL,
		received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
		UNIQUE (batch_id, position)
	)`,
	// token_id is VARCHAR(50) with no foreign key: records of unknown or
	// deleted tokens are stored too.
	`CREATE TABLE IF NOT EXISTS forward_proxy_request_logs (
		id            BIGSERIAL PRIMARY KEY,
		batch_id      UUID NOT NULL,
		received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
		"timestamp"   TIMESTAMPTZ NOT NULL,
		token_id      ` + tokenIDType + `,
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
		error         TEXT,
		suppressed    INTEGER DEFAULT 0
	)`,
}

var indexes = []string{
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_timestamp_idx ON forward_proxy_request_logs ("timestamp")`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_token_id_idx ON forward_proxy_request_logs (token_id, "timestamp")`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_request_logs_batch_id_idx ON forward_proxy_request_logs (batch_id)`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_rejected_records_received_at_idx ON forward_proxy_rejected_records (received_at)`,
}

// Migrate creates or upgrades the schema. It is idempotent and safe to run
// from several collectors at once.
func Migrate(ctx context.Context, pool *pgxpool.Pool) error {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLockID)); err != nil {
			return fmt.Errorf("taking the migration lock: %w", err)
		}
		stmts := append([]string(nil), schema...)
		stmts = append(stmts,
			`ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS received_at TIMESTAMPTZ DEFAULT now()`,
			`ALTER TABLE forward_proxy_batches ADD COLUMN IF NOT EXISTS rejected_count INTEGER NOT NULL DEFAULT 0`)
		for _, c := range logColumns {
			stmts = append(stmts, fmt.Sprintf(`ALTER TABLE forward_proxy_request_logs ADD COLUMN IF NOT EXISTS %s %s`,
				pgx.Identifier{c.name}.Sanitize(), c.typ))
		}
		stmts = append(stmts, indexes...)
		stmts = append(stmts, revocationSchema...)
		stmts = append(stmts, timingSchema()...)
		stmts = append(stmts, udpSchema()...)
		for _, s := range stmts {
			if _, err := tx.Exec(ctx, s); err != nil {
				return fmt.Errorf("running %q: %w", firstLine(s), err)
			}
		}
		if err := migratePartitioned(ctx, tx, time.Now()); err != nil {
			return err
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
