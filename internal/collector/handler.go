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
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// MaxBodyBytes caps a batch body. A default batch of 100 records is about
// 40 KiB; the cap leaves room for large LOG_BATCH_SIZE values while keeping
// one request from exhausting memory.
const MaxBodyBytes = 16 << 20

// handler serves the batch endpoint and /healthz.
type handler struct {
	pool   *pgxpool.Pool
	apiKey []byte // empty: no authentication (COLLECTOR_INSECURE_NO_AUTH), or node certificates only
	log    *slog.Logger
	// tls is nil over plain HTTP; with a client CA it names the node
	// each request comes from.
	tls *serverTLS
	m   *collectorMetrics

	// limits are read from the database on the first batch (the handler
	// is built without a context to query with) and kept: Migrate runs
	// before the handler serves and never narrows a column.
	limitsMu sync.Mutex
	limits   *columnLimits

	revCache revocationCache

	// parts is the view of the records table's partitions (partition.go).
	parts *partitions
	// writers, when not nil, store batches in groups (writers.go); else
	// each request stores its batch in a transaction of its own.
	writers *writers
}

// NewHandler serves POST accesslog.BatchPath, GET revocation.Path and GET
// /healthz. An empty
// apiKey disables authentication; Run only allows that when asked.
func NewHandler(pool *pgxpool.Pool, apiKey string, log *slog.Logger) http.Handler {
	return newHandler(pool, apiKey, log, nil, newCollectorMetrics())
}

// newHandler is NewHandler with the collector's TLS (nil: plain HTTP) and
// metrics, which it also serves at GET /metrics.
func newHandler(pool *pgxpool.Pool, apiKey string, log *slog.Logger, t *serverTLS, m *collectorMetrics) http.Handler {
	return newHandlerParts(pool, apiKey, log, t, m, newPartitions(pool, 0, nil), nil)
}

// newHandlerParts is newHandler with the partitions' view (retention,
// clock) and the writers (nil: none).
func newHandlerParts(pool *pgxpool.Pool, apiKey string, log *slog.Logger, t *serverTLS, m *collectorMetrics, parts *partitions, w *writers) http.Handler {
	h := &handler{pool: pool, apiKey: []byte(apiKey), log: log, tls: t, m: m, parts: parts, writers: w}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+accesslog.BatchPath, h.batch)
	mux.HandleFunc("GET "+revocation.Path, h.revocations)
	mux.HandleFunc("GET /healthz", h.healthz)
	mux.Handle("GET /metrics", m.handler())
	return mux
}

// answer is every response body: status is stored, duplicate, rejected,
// unauthorized, forbidden (another node's records), error or ok. A stored batch says how many records it had,
// how many were stored and how many were kept aside in
// forward_proxy_rejected_records (records = stored + rejected).
type answer struct {
	Status   string `json:"status"`
	Reason   string `json:"reason,omitempty"`
	BatchID  string `json:"batch_id,omitempty"`
	Records  int    `json:"records,omitempty"`
	Stored   *int   `json:"stored,omitempty"`
	Rejected *int   `json:"rejected,omitempty"`
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

// authorized is the one check of a caller, for every endpoint: the
// bearer API key (none with COLLECTOR_INSECURE_NO_AUTH).
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
// (dead-letter it), 5xx means try again later. A batch is refused only when
// it is not a batch (not JSON, wrong shape, too large): records that cannot
// be stored are kept aside and the rest of the batch is stored, because a
// 4xx would make the shipper dead-letter every other record with them.
func (h *handler) batch(w http.ResponseWriter, r *http.Request) {
	if !h.authorized(r) {
		h.m.batchesRefused.WithLabelValues(refusedUnauthorized).Inc()
		w.Header().Set("WWW-Authenticate", `Bearer realm="pinaka-collector"`)
		reply(w, http.StatusUnauthorized, answer{Status: "unauthorized", Reason: "missing or wrong bearer API key"})
		return
	}
	data, err := readBody(http.MaxBytesReader(w, r.Body, MaxBodyBytes), r.ContentLength)
	var b *batch
	if err == nil {
		b, err = parseBatch(data)
	}
	if err != nil {
		code := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			code = http.StatusRequestEntityTooLarge
		}
		h.m.batchesRefused.WithLabelValues(refusedInvalid).Inc()
		h.log.Warn("batch rejected", "remote", r.RemoteAddr, "status", code, "reason", err.Error())
		reply(w, code, answer{Status: "rejected", Reason: err.Error()})
		return
	}
	if h.tls.requireNode() && !h.sameNode(w, r, b) {
		return
	}
	limits, err := h.columnLimits(r.Context())
	if err != nil {
		h.log.Error("storing batch", "batch_id", b.id, "records", len(b.logs), "error", err)
		reply(w, http.StatusServiceUnavailable, answer{Status: "error", Reason: "storage unavailable", BatchID: b.id.String()})
		return
	}
	good, bad := b.sort(limits, h.parts.window)
	var stored bool
	if h.writers != nil {
		stored, err = h.writers.store(r.Context(), b, good, bad)
	} else {
		stored, err = h.parts.store(r.Context(), b, good, bad)
	}
	if err != nil {
		h.log.Error("storing batch", "batch_id", b.id, "records", len(b.logs), "error", err)
		reply(w, http.StatusServiceUnavailable, answer{Status: "error", Reason: "storage unavailable", BatchID: b.id.String()})
		return
	}
	if !stored {
		h.log.Info("duplicate batch ignored", "batch_id", b.id, "probe_node", b.probeNode)
		reply(w, http.StatusOK, answer{Status: "duplicate", BatchID: b.id.String()})
		return
	}
	if len(bad) > 0 {
		// One line per batch, not per record: the records and every
		// reason are in forward_proxy_rejected_records.
		h.log.Warn("records rejected", "batch_id", b.id, "probe_node", b.probeNode, "stored", len(good),
			"rejected", len(bad), "first_position", bad[0].position, "first_reason", bad[0].reason)
	}
	h.log.Debug("batch stored", "batch_id", b.id, "probe_node", b.probeNode, "stored", len(good), "rejected", len(bad))
	nGood, nBad := len(good), len(bad)
	reply(w, http.StatusOK, answer{Status: "stored", BatchID: b.id.String(), Records: len(b.logs), Stored: &nGood, Rejected: &nBad})
}

// columnLimits returns the limits of forward_proxy_request_logs' columns,
// reading them on first use.
func (h *handler) columnLimits(ctx context.Context) (*columnLimits, error) {
	h.limitsMu.Lock()
	defer h.limitsMu.Unlock()
	if h.limits == nil {
		l, err := loadLimits(ctx, h.pool)
		if err != nil {
			return nil, err
		}
		h.limits = l
	}
	return h.limits, nil
}

// batch is a request body that is a batch: its records are still raw,
// each to be validated on its own.
type batch struct {
	id        uuid.UUID
	probeNode string
	region    string
	logs      []json.RawMessage
	// rows, when not nil, are the records as onePass read them, and
	// clean says which it read without a doubt (onepass.go); sort checks
	// those with fieldLimits.valid and gives every other to validate.
	rows  []row
	clean []bool
}

// rejected is a record kept aside, with why.
type rejected struct {
	position int    // index in the batch's logs
	reason   string // every rule it broke, "; "-separated
	raw      string // the record as received (invalid UTF-8 replaced: the column is TEXT)
}

// decode reads a batch body (see parseBatch).
func decode(body io.Reader) (*batch, error) {
	data, err := readBody(body, -1)
	if err != nil {
		return nil, err
	}
	return parseBatch(data)
}

// preallocBody bounds what readBody allocates on the word of a
// Content-Length before the bytes arrive; larger bodies grow as they come.
const preallocBody = 1 << 20

// readBody reads a request body, of size bytes if known (-1 if not).
func readBody(body io.Reader, size int64) ([]byte, error) {
	var data []byte
	var err error
	if size >= 0 && size <= preallocBody {
		// One allocation of the right size, not ReadAll's doublings. A
		// body shorter than its Content-Length is the same error as
		// ReadAll's.
		data = make([]byte, size)
		if _, err = io.ReadFull(body, data); err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	} else {
		data, err = io.ReadAll(body)
	}
	if err != nil {
		if mbe, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, fmt.Errorf("body larger than %d bytes: %w", mbe.Limit, err)
		}
		return nil, fmt.Errorf("reading body: %w", err)
	}
	return data, nil
}

// decodeEnvelope reads the envelope of a batch. Only what makes the body
// not a batch is an error here; the records are checked one by one by
// sort. Unknown fields are ignored so a newer proxy can talk to an older
// collector.
func decodeEnvelope(data []byte) (*batch, error) {
	var raw struct {
		BatchID   *string            `json:"batch_id"`
		ProbeNode string             `json:"probe_node"`
		Region    string             `json:"region"`
		Logs      *[]json.RawMessage `json:"logs"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("bad JSON: %v", err)
	}
	if raw.BatchID == nil || *raw.BatchID == "" {
		return nil, errors.New("missing batch_id")
	}
	id, err := uuid.Parse(*raw.BatchID)
	if err != nil {
		return nil, fmt.Errorf("batch_id %q is not a UUID", *raw.BatchID)
	}
	if raw.Logs == nil {
		return nil, errors.New("missing logs")
	}
	// The batch row needs these; they come from the proxy's configuration,
	// not from clients.
	for _, f := range []struct{ name, v string }{{"probe_node", raw.ProbeNode}, {"region", raw.Region}} {
		if strings.IndexByte(f.v, 0) >= 0 {
			return nil, fmt.Errorf("%s contains a NUL character", f.name)
		}
	}
	return &batch{id: id, probeNode: raw.ProbeNode, region: raw.Region, logs: *raw.Logs}, nil
}

// sort validates every record: good rows to store, bad ones to keep aside.
// window (nil: none) says why a valid record's timestamp cannot be stored
// now ("" if it can).
func (b *batch) sort(limits *columnLimits, window func(time.Time) string) (good []row, bad []rejected) {
	if b.rows != nil {
		good = b.rows[:0] // in place: good[j] is written after rows[i], j <= i, is read
	} else {
		good = make([]row, 0, len(b.logs))
	}
	for i, raw := range b.logs {
		if b.rows != nil && b.clean[i] && limits.fields.valid(&b.rows[i]) &&
			(window == nil || window(b.rows[i].ts) == "") {
			good = append(good, b.rows[i])
			continue
		}
		r, why := limits.validate(raw)
		if why == nil && window != nil {
			if w := window(r.ts); w != "" {
				why = []string{w}
			}
		}
		if why != nil {
			bad = append(bad, rejected{position: i, reason: strings.Join(why, "; "), raw: printable(string(raw))})
			continue
		}
		good = append(good, r)
	}
	b.rows, b.clean = nil, nil
	return good, bad
}
