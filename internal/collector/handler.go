package collector

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// MaxBodyBytes caps a batch body. A default batch of 100 records is about
// 40 KiB; the cap leaves room for large LOG_BATCH_SIZE values while keeping
// one request from exhausting memory.
const MaxBodyBytes = 16 << 20

// MaxTokenIDLen is the length of the token_id column, VARCHAR(50).
const MaxTokenIDLen = 50

// handler serves the batch endpoint and /healthz.
type handler struct {
	pool   *pgxpool.Pool
	apiKey []byte // empty: no authentication (COLLECTOR_INSECURE_NO_AUTH)
	log    *slog.Logger
}

// NewHandler serves POST accesslog.BatchPath and GET /healthz. An empty
// apiKey disables authentication; Run only allows that when asked.
func NewHandler(pool *pgxpool.Pool, apiKey string, log *slog.Logger) http.Handler {
	h := &handler{pool: pool, apiKey: []byte(apiKey), log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+accesslog.BatchPath, h.batch)
	mux.HandleFunc("GET /healthz", h.healthz)
	return mux
}

// answer is every response body: status is stored, duplicate, rejected,
// unauthorized, error or ok.
type answer struct {
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	BatchID string `json:"batch_id,omitempty"`
	Records int    `json:"records,omitempty"`
}

func reply(w http.ResponseWriter, code int, a answer) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(a)
}

func (h *handler) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := h.pool.Ping(ctx); err != nil {
		h.log.Warn("health check: database unreachable", "error", err)
		reply(w, http.StatusServiceUnavailable, answer{Status: "error", Reason: "database unreachable"})
		return
	}
	reply(w, http.StatusOK, answer{Status: "ok"})
}

func (h *handler) authorized(r *http.Request) bool {
	if len(h.apiKey) == 0 {
		return true
	}
	scheme, key, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(key)), h.apiKey) == 1
}

// batch stores one batch. Status codes are chosen for the shipper: 200 means
// stored (or stored before), 4xx means this batch will never be accepted
// (dead-letter it), 5xx means try again later.
func (h *handler) batch(w http.ResponseWriter, r *http.Request) {
	if !h.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="pinaka-collector"`)
		reply(w, http.StatusUnauthorized, answer{Status: "unauthorized", Reason: "missing or wrong bearer API key"})
		return
	}
	b, id, err := decode(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err != nil {
		code := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			code = http.StatusRequestEntityTooLarge
		}
		h.log.Warn("batch rejected", "remote", r.RemoteAddr, "status", code, "reason", err.Error())
		reply(w, code, answer{Status: "rejected", Reason: err.Error()})
		return
	}
	stored, err := store(r.Context(), h.pool, id, b)
	if err != nil {
		h.log.Error("storing batch", "batch_id", id, "records", len(b.Logs), "error", err)
		reply(w, http.StatusServiceUnavailable, answer{Status: "error", Reason: "storage unavailable", BatchID: id.String()})
		return
	}
	if !stored {
		h.log.Info("duplicate batch ignored", "batch_id", id, "probe_node", b.ProbeNode)
		reply(w, http.StatusOK, answer{Status: "duplicate", BatchID: id.String()})
		return
	}
	h.log.Debug("batch stored", "batch_id", id, "probe_node", b.ProbeNode, "records", len(b.Logs))
	reply(w, http.StatusOK, answer{Status: "stored", BatchID: id.String(), Records: len(b.Logs)})
}

// decode reads and validates a batch. Unknown fields are ignored so a newer
// proxy can talk to an older collector; everything that would make the
// insert fail (and so be retried forever) is refused here instead.
func decode(body io.Reader) (*accesslog.Batch, uuid.UUID, error) {
	var raw struct {
		BatchID *string            `json:"batch_id"`
		Logs    *[]json.RawMessage `json:"logs"`
	}
	data, err := io.ReadAll(body)
	if err != nil {
		if mbe, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, uuid.Nil, fmt.Errorf("body larger than %d bytes: %w", mbe.Limit, err)
		}
		return nil, uuid.Nil, fmt.Errorf("reading body: %w", err)
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, uuid.Nil, fmt.Errorf("bad JSON: %v", err)
	}
	if raw.BatchID == nil || *raw.BatchID == "" {
		return nil, uuid.Nil, errors.New("missing batch_id")
	}
	id, err := uuid.Parse(*raw.BatchID)
	if err != nil {
		return nil, uuid.Nil, fmt.Errorf("batch_id %q is not a UUID", *raw.BatchID)
	}
	if raw.Logs == nil {
		return nil, uuid.Nil, errors.New("missing logs")
	}
	var b accesslog.Batch
	if err := json.Unmarshal(data, &b); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, uuid.Nil, fmt.Errorf("bad record fields: %s must be %s, got %s", te.Field, te.Type, te.Value)
		}
		return nil, uuid.Nil, fmt.Errorf("bad record fields: %v", err)
	}
	if err := checkText("probe_node", b.ProbeNode); err != nil {
		return nil, uuid.Nil, err
	}
	if err := checkText("region", b.Region); err != nil {
		return nil, uuid.Nil, err
	}
	for i := range b.Logs {
		if err := checkRecord(&b.Logs[i]); err != nil {
			return nil, uuid.Nil, fmt.Errorf("bad record fields: logs[%d].%w", i, err)
		}
	}
	return &b, id, nil
}

func checkRecord(r *accesslog.Record) error {
	if r.Timestamp.IsZero() {
		return errors.New("timestamp is missing")
	}
	if n := utf8.RuneCountInString(r.TokenID); n > MaxTokenIDLen {
		return fmt.Errorf("token_id is %d characters, at most %d", n, MaxTokenIDLen)
	}
	for _, f := range []struct{ name, v string }{
		{"token_id", r.TokenID}, {"user_id", r.UserID}, {"token_type", r.TokenType}, {"region", r.Region},
		{"probe_node", r.ProbeNode}, {"client_ip", r.ClientIP}, {"protocol", r.Protocol}, {"method", r.Method},
		{"target_url", r.TargetURL}, {"error", r.Error},
	} {
		if err := checkText(f.name, f.v); err != nil {
			return err
		}
	}
	switch {
	case r.StatusCode < 0 || r.StatusCode > 999:
		return fmt.Errorf("status_code %d out of range", r.StatusCode)
	case r.RequestSize < 0:
		return errors.New("request_size is negative")
	case r.ResponseSize < 0:
		return errors.New("response_size is negative")
	case r.DurationMS < 0:
		return errors.New("duration_ms is negative")
	}
	return nil
}

// checkText refuses NUL, which PostgreSQL text cannot hold.
func checkText(name, v string) error {
	if strings.IndexByte(v, 0) >= 0 {
		return fmt.Errorf("%s contains a NUL character", name)
	}
	return nil
}

// store writes a batch in one transaction. The batch row goes first: if its
// batch_id is already there (a retry, or a concurrent twin that committed
// first) nothing is written and stored is false.
func store(ctx context.Context, pool *pgxpool.Pool, id uuid.UUID, b *accesslog.Batch) (stored bool, err error) {
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count)
			VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO NOTHING`,
			pgtype.UUID{Bytes: id, Valid: true}, b.ProbeNode, b.Region, len(b.Logs))
		if err != nil {
			return fmt.Errorf("inserting batch %s: %w", id, err)
		}
		if tag.RowsAffected() == 0 {
			return nil
		}
		stored = true
		cols := make([]string, len(logColumns))
		for i, c := range logColumns {
			cols[i] = c.name
		}
		pgID := pgtype.UUID{Bytes: id, Valid: true}
		n, err := tx.CopyFrom(ctx, pgx.Identifier{"forward_proxy_request_logs"}, cols,
			pgx.CopyFromSlice(len(b.Logs), func(i int) ([]any, error) {
				r := &b.Logs[i]
				return []any{pgID, r.Timestamp, r.TokenID, r.UserID, r.TokenType, r.Region, r.ProbeNode,
					r.ClientIP, r.Protocol, r.Method, r.TargetURL, r.StatusCode, r.RequestSize, r.ResponseSize,
					r.DurationMS, r.Success, r.RateLimited, r.Error}, nil
			}))
		if err != nil {
			return fmt.Errorf("copying %d records of batch %s: %w", len(b.Logs), id, err)
		}
		if n != int64(len(b.Logs)) {
			return fmt.Errorf("copying batch %s: %d of %d records written", id, n, len(b.Logs))
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	return stored, nil
}
