package collector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// revocationSchema holds the revoked token ids the proxies poll. The
// version row changes in the transaction of every change to the table
// (row triggers, so that a statement touching no row changes nothing):
// a reader's snapshot always pairs a version with the rows it stands for,
// which a sequence, outside transactions, would not. Changes made with
// plain SQL bump it too.
var revocationSchema = []string{
	`CREATE TABLE IF NOT EXISTS forward_proxy_revocations (
		token_id   ` + tokenIDType + ` PRIMARY KEY,
		revoked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
		until      TIMESTAMPTZ,
		reason     TEXT
	)`,
	`CREATE INDEX IF NOT EXISTS forward_proxy_revocations_until_idx ON forward_proxy_revocations (until)`,
	`CREATE TABLE IF NOT EXISTS forward_proxy_revocations_version (
		id         BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
		version    BIGINT NOT NULL,
		changed_at TIMESTAMPTZ NOT NULL DEFAULT now()
	)`,
	`INSERT INTO forward_proxy_revocations_version (id, version) VALUES (true, 1) ON CONFLICT DO NOTHING`,
	`CREATE OR REPLACE FUNCTION forward_proxy_revocations_bump() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		UPDATE forward_proxy_revocations_version SET version = version + 1, changed_at = now();
		RETURN NULL;
	END $$`,
	`DROP TRIGGER IF EXISTS forward_proxy_revocations_bump ON forward_proxy_revocations`,
	`CREATE TRIGGER forward_proxy_revocations_bump AFTER INSERT OR UPDATE OR DELETE ON forward_proxy_revocations
		FOR EACH ROW EXECUTE FUNCTION forward_proxy_revocations_bump()`,
	`DROP TRIGGER IF EXISTS forward_proxy_revocations_bump_truncate ON forward_proxy_revocations`,
	`CREATE TRIGGER forward_proxy_revocations_bump_truncate AFTER TRUNCATE ON forward_proxy_revocations
		FOR EACH STATEMENT EXECUTE FUNCTION forward_proxy_revocations_bump()`,
}

// Revocation is one row of forward_proxy_revocations.
type Revocation struct {
	TokenID   string
	RevokedAt time.Time
	Until     *time.Time // nil: until removed
	Reason    string
}

// Expired reports whether r no longer applies at now (it is not served).
func (r Revocation) Expired(now time.Time) bool { return r.Until != nil && !r.Until.After(now) }

// Revoke adds tokenID to the revoked ids, or updates its until and reason
// (revoked_at stays the first revocation's). until nil means until
// removed. A table already holding revocation.MaxEntries ids takes no new
// one: the proxies would refuse the whole list.
func Revoke(ctx context.Context, pool *pgxpool.Pool, tokenID string, until *time.Time, reason string) error {
	if err := revocation.CheckTokenID(tokenID); err != nil {
		return err
	}
	if strings.IndexByte(reason, 0) >= 0 || len(reason) > 1024 {
		return errors.New("reason must be at most 1024 bytes without NUL characters")
	}
	var why *string
	if reason != "" {
		why = &reason
	}
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// Serialises revokers against the count below.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLockID+1)); err != nil {
			return fmt.Errorf("locking the revocation table: %w", err)
		}
		var exists bool
		var n int
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM forward_proxy_revocations WHERE token_id = $1),
			(SELECT count(*) FROM forward_proxy_revocations)`, tokenID).Scan(&exists, &n); err != nil {
			return fmt.Errorf("counting revocations: %w", err)
		}
		if !exists && n >= revocation.MaxEntries {
			return fmt.Errorf("the revocation table holds %d ids, the most the proxies accept; remove expired or old entries first", n)
		}
		_, err := tx.Exec(ctx, `INSERT INTO forward_proxy_revocations (token_id, until, reason) VALUES ($1, $2, $3)
			ON CONFLICT (token_id) DO UPDATE SET until = EXCLUDED.until,
				reason = COALESCE(EXCLUDED.reason, forward_proxy_revocations.reason)`, tokenID, until, why)
		if err != nil {
			return fmt.Errorf("revoking %q: %w", tokenID, err)
		}
		return nil
	})
}

// Unrevoke removes tokenID from the revoked ids; found is false if it was
// not there.
func Unrevoke(ctx context.Context, pool *pgxpool.Pool, tokenID string) (found bool, err error) {
	if err := revocation.CheckTokenID(tokenID); err != nil {
		return false, err
	}
	tag, err := pool.Exec(ctx, `DELETE FROM forward_proxy_revocations WHERE token_id = $1`, tokenID)
	if err != nil {
		return false, fmt.Errorf("removing %q: %w", tokenID, err)
	}
	return tag.RowsAffected() > 0, nil
}

// ListRevocations returns every row, expired ones included, oldest first.
func ListRevocations(ctx context.Context, pool *pgxpool.Pool) ([]Revocation, error) {
	rows, err := pool.Query(ctx, `SELECT token_id, revoked_at, until, COALESCE(reason, '')
		FROM forward_proxy_revocations ORDER BY revoked_at, token_id`)
	if err != nil {
		return nil, fmt.Errorf("listing revocations: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Revocation, error) {
		var r Revocation
		err := row.Scan(&r.TokenID, &r.RevokedAt, &r.Until, &r.Reason)
		return r, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing revocations: %w", err)
	}
	return out, nil
}

// PruneRevocations deletes the entries whose until has passed: they are
// not served any more, and the table stays small.
func PruneRevocations(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	tag, err := pool.Exec(ctx, `DELETE FROM forward_proxy_revocations WHERE until <= now()`)
	if err != nil {
		return 0, fmt.Errorf("pruning expired revocations: %w", err)
	}
	return tag.RowsAffected(), nil
}

// pruneEvery is how often the collector deletes expired revocations.
// Until then they are only left out of the list it serves.
const pruneEvery = time.Hour

// runPruner prunes expired revocations every pruneEvery until ctx ends.
func runPruner(ctx context.Context, pool *pgxpool.Pool, log *slog.Logger) {
	t := time.NewTicker(pruneEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n, err := PruneRevocations(ctx, pool); err != nil {
			log.Warn("pruning expired revocations", "error", err)
		} else if n > 0 {
			log.Info("expired revocations pruned", "count", n)
		}
	}
}

// revocationQueryTimeout bounds the queries of one list request.
const revocationQueryTimeout = 30 * time.Second

// revocationCache is the last list served, by ETag: a fleet polling the
// same version costs one query each, not one list each.
type revocationCache struct {
	mu   sync.Mutex
	etag string
	body []byte
}

// revocations serves revocation.Path: the ids revoked now (until unset or
// in the future), with a version and a strong ETag, and 304 to an
// If-None-Match that still matches. The ETag is the table's version plus
// the latest until already passed, so it changes both when the table
// changes and when an entry expires. Everything is read in one snapshot.
func (h *handler) revocations(w http.ResponseWriter, r *http.Request) {
	if !h.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="pinaka-collector"`)
		reply(w, http.StatusUnauthorized, answer{Status: "unauthorized", Reason: "missing or wrong bearer API key"})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), revocationQueryTimeout)
	defer cancel()
	var etag string
	var body []byte
	var tooMany int
	err := pgx.BeginTxFunc(ctx, h.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var version int64
		var passed *time.Time
		if err := tx.QueryRow(ctx, `SELECT v.version,
				(SELECT max(until) FROM forward_proxy_revocations WHERE until <= now())
			FROM forward_proxy_revocations_version v`).Scan(&version, &passed); err != nil {
			return fmt.Errorf("reading the revocation version: %w", err)
		}
		var mark int64
		if passed != nil {
			mark = passed.UnixMicro()
		}
		etag = fmt.Sprintf(`"v%d-%d"`, version, mark)
		if etagMatches(r.Header.Get("If-None-Match"), etag) {
			return nil
		}
		h.revCache.mu.Lock()
		if h.revCache.etag == etag {
			body = h.revCache.body
		}
		h.revCache.mu.Unlock()
		if body != nil {
			return nil
		}
		rows, err := tx.Query(ctx, `SELECT token_id FROM forward_proxy_revocations
			WHERE until IS NULL OR until > now() ORDER BY token_id LIMIT $1`, revocation.MaxEntries+1)
		if err != nil {
			return fmt.Errorf("listing revocations: %w", err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return fmt.Errorf("listing revocations: %w", err)
		}
		if len(ids) > revocation.MaxEntries {
			tooMany = len(ids)
			return nil
		}
		var b strings.Builder
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(revocation.Document{Version: version, Count: len(ids), TokenIDs: ids}); err != nil {
			return fmt.Errorf("encoding revocations: %w", err)
		}
		if b.Len() > revocation.MaxBodyBytes {
			tooMany = len(ids)
			return nil
		}
		body = []byte(b.String())
		h.revCache.mu.Lock()
		h.revCache.etag, h.revCache.body = etag, body
		h.revCache.mu.Unlock()
		return nil
	})
	switch {
	case err != nil:
		h.log.Error("serving revocations", "error", err)
		reply(w, http.StatusServiceUnavailable, answer{Status: "error", Reason: "storage unavailable"})
		return
	case tooMany > 0:
		// Never a truncated list: a node would un-revoke what is cut.
		h.log.Error("revocation list too large to serve; proxies keep their last list", "count", tooMany,
			"max_entries", revocation.MaxEntries, "max_bytes", revocation.MaxBodyBytes)
		reply(w, http.StatusInternalServerError, answer{Status: "error",
			Reason: fmt.Sprintf("more than %d revoked ids or %d bytes", revocation.MaxEntries, revocation.MaxBodyBytes)})
		return
	}
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-cache")
	if body == nil {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

// etagMatches is If-None-Match's weak comparison (RFC 9110 §13.1.2).
func etagMatches(header, etag string) bool {
	if header == "" {
		return false
	}
	for _, c := range strings.Split(header, ",") {
		c = strings.TrimSpace(c)
		if c == "*" || strings.TrimPrefix(c, "W/") == etag {
			return true
		}
	}
	return false
}
