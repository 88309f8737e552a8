package accesslog

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
)

// BatchPath is where batches are POSTed, relative to BACKEND_URL.
const BatchPath = "/api/forward-proxy/logs/batch"

// Batch is the wire format of one POST to the backend. The collector decodes
// the same type, so both sides agree on it by construction.
type Batch struct {
	BatchID   string   `json:"batch_id"`
	ProbeNode string   `json:"probe_node"`
	Region    string   `json:"region"`
	Logs      []Record `json:"logs"`
}

// batch is a Batch ready to send: its body is encoded once, so every retry
// and the spool file carry exactly the same bytes and the same batch_id.
type batch struct {
	id      string
	records int
	body    []byte
}

// newBatch encodes records under a fresh batch id. The id is a UUIDv7, which
// sorts by creation time: spool files named after it list oldest first.
func newBatch(probeNode, region string, records []Record) (*batch, error) {
	id := uuid.Must(uuid.NewV7()).String()
	body, err := json.Marshal(Batch{BatchID: id, ProbeNode: probeNode, Region: region, Logs: records})
	if err != nil {
		return nil, fmt.Errorf("encoding batch %s: %w", id, err)
	}
	return &batch{id: id, records: len(records), body: body}, nil
}

// MaxBatchBytes bounds one encoded batch: half the collector's 16 MiB body
// limit, so a batch of records with long URLs is split before it is sent
// instead of being refused with 413 and dead-lettered.
const MaxBatchBytes = 8 << 20

// newBatches encodes records as one batch, or, when that would be larger
// than maxBytes, as halves split recursively (each with its own id: none of
// them was ever sent). A single record larger than maxBytes stays alone.
func newBatches(probeNode, region string, records []Record, maxBytes int) ([]*batch, error) {
	b, err := newBatch(probeNode, region, records)
	if err != nil {
		return nil, err
	}
	if len(b.body) <= maxBytes || len(records) < 2 {
		return []*batch{b}, nil
	}
	half := len(records) / 2
	first, err := newBatches(probeNode, region, records[:half], maxBytes)
	if err != nil {
		return nil, err
	}
	second, err := newBatches(probeNode, region, records[half:], maxBytes)
	if err != nil {
		return nil, err
	}
	return append(first, second...), nil
}

// decodeBatch rebuilds a batch from its encoded body (a spool file).
func decodeBatch(body []byte) (*batch, error) {
	var head struct {
		BatchID string            `json:"batch_id"`
		Logs    []json.RawMessage `json:"logs"`
	}
	if err := json.Unmarshal(body, &head); err != nil {
		return nil, fmt.Errorf("decoding batch: %w", err)
	}
	if head.BatchID == "" {
		return nil, errors.New("decoding batch: no batch_id")
	}
	return &batch{id: head.BatchID, records: len(head.Logs), body: body}, nil
}

// StatusError is a non-2xx answer from the backend.
type StatusError struct {
	Code       int
	Body       string        // start of the response body, for the log
	RetryAfter time.Duration // from a Retry-After header, 0 if none
}

func (e *StatusError) Error() string {
	if e.Body == "" {
		return fmt.Sprintf("backend answered %d", e.Code)
	}
	return fmt.Sprintf("backend answered %d: %s", e.Code, e.Body)
}

// permanent reports whether a delivery error means the backend will never
// accept this batch: a 4xx other than 408 (timeout) and 429 (rate limited).
// Network errors, 5xx and anything else unexpected (a 3xx from a
// misconfigured BACKEND_URL) are worth retrying: they are about the backend,
// not the batch, and retrying costs nothing but time.
func permanent(err error) bool {
	var se *StatusError
	if !errors.As(err, &se) {
		return false
	}
	return se.Code >= 400 && se.Code < 500 && se.Code != http.StatusRequestTimeout && se.Code != http.StatusTooManyRequests
}

// sender POSTs batches to the backend, one attempt per call.
type sender struct {
	client  *http.Client
	url     string
	apiKey  string
	timeout time.Duration // per attempt, response body included
}

func (s *sender) send(ctx context.Context, b *batch) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(b.body))
	if err != nil {
		return fmt.Errorf("building request for batch %s: %w", b.id, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "pinaka-shipper")
	if s.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+s.apiKey)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("posting batch %s: %w", b.id, err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	// Drain a little more so the connection can be reused.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	return &StatusError{
		Code:       resp.StatusCode,
		Body:       strings.TrimSpace(string(snippet)),
		RetryAfter: retryAfter(resp.Header.Get("Retry-After")),
	}
}

// timedOut reports whether a failed attempt got no answer in time (the
// attempt's deadline or a client timeout), as opposed to a refusal or an
// error status.
func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// retryAfter parses a Retry-After header (seconds or an HTTP date).
func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

// backoff is exponential backoff with jitter: the n-th wait is drawn from
// [d/2, d] with d = base·2ⁿ capped at max, so a fleet of probe nodes that lost
// the backend together does not retry in lockstep. A Retry-After from the
// backend is honoured, capped at max.
type backoff struct {
	base, max time.Duration
	n         int
}

func (b *backoff) next(err error) time.Duration {
	d := b.max
	if b.n < 30 {
		d = min(b.base<<b.n, b.max)
	}
	b.n++
	d = d/2 + rand.N(d/2+1)
	var se *StatusError
	if errors.As(err, &se) && se.RetryAfter > d {
		d = min(se.RetryAfter, b.max)
	}
	return d
}

func (b *backoff) reset() { b.n = 0 }

// sleep waits for d or until ctx is done; it reports whether d elapsed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
