package collector

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/pgtest"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

const testKey = "collector-key"

func testDB(t *testing.T) (*pgxpool.Pool, string) { return pgtest.NewDB(t) }

func testLog() *slog.Logger {
	return slog.New(slog.NewJSONHandler(io.Discard, nil))
}

// migrated is a fresh migrated database with the collector handler in front.
func migrated(t *testing.T) (*pgxpool.Pool, *httptest.Server) {
	t.Helper()
	pool, _ := testDB(t)
	if err := Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	t.Cleanup(srv.Close)
	return pool, srv
}

func post(t *testing.T, url, key string, body []byte) (int, answer) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url+accesslog.BatchPath, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var a answer
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		t.Fatalf("answer to %d is not JSON: %v", resp.StatusCode, err)
	}
	return resp.StatusCode, a
}

func sampleBatch(n int) accesslog.Batch {
	b := accesslog.Batch{BatchID: uuid.NewString(), ProbeNode: "node-1", Region: "eu-west"}
	for i := range n {
		b.Logs = append(b.Logs, accesslog.Record{
			Timestamp:    time.Date(2025, 3, 4, 5, 6, 7, 123456000, time.UTC).Add(time.Duration(i) * time.Second),
			TokenID:      fmt.Sprintf("tok-%d", i),
			UserID:       "user-ü",
			TokenType:    "access",
			Region:       "eu-west",
			ProbeNode:    "node-1",
			ClientIP:     "2001:db8::7",
			Protocol:     "HTTP/1.1",
			Method:       "CONNECT",
			TargetURL:    "example.com:443",
			StatusCode:   200 + i,
			RequestSize:  1 << 40,
			ResponseSize: int64(i),
			DurationMS:   int64(10 * i),
			Success:      i%2 == 0,
			RateLimited:  i%2 == 1,
			Error:        fmt.Sprintf("err-%d", i),
		})
	}
	return b
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func count(t *testing.T, pool *pgxpool.Pool, query string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

func TestLoadConfig(t *testing.T) {
	env := func(kv ...string) func(string) (string, bool) {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	c, err := LoadConfig(env("DATABASE_URL", "postgres://u@127.0.0.1/db", "COLLECTOR_API_KEY", "k"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr != "127.0.0.1:8080" || c.APIKey != "k" || c.ShutdownTimeout != 30*time.Second || c.InsecureNoAuth {
		t.Errorf("defaults: %+v", c)
	}
	c, err = LoadConfig(env("DATABASE_URL", "postgres://u@127.0.0.1/db", "BACKEND_API_KEY", "shared", "SHUTDOWN_TIMEOUT", "5"))
	if err != nil || c.APIKey != "shared" || c.ShutdownTimeout != 5*time.Second {
		t.Errorf("BACKEND_API_KEY fallback: %+v, %v", c, err)
	}
	if _, err := LoadConfig(env("DATABASE_URL", "postgres://u@127.0.0.1/db", "COLLECTOR_INSECURE_NO_AUTH", "true")); err != nil {
		t.Errorf("insecure mode refused: %v", err)
	}
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"COLLECTOR_API_KEY", "k"}, "DATABASE_URL"},
		{[]string{"DATABASE_URL", "postgres://u@127.0.0.1/db"}, "COLLECTOR_API_KEY"},
		{[]string{"DATABASE_URL", "postgres://u@127.0.0.1/db", "COLLECTOR_API_KEY", "k", "COLLECTOR_ADDR", "8080"}, "COLLECTOR_ADDR"},
		{[]string{"DATABASE_URL", "postgres://u@127.0.0.1/db", "COLLECTOR_INSECURE_NO_AUTH", "maybe"}, "COLLECTOR_INSECURE_NO_AUTH"},
		{[]string{"DATABASE_URL", "postgres://u@127.0.0.1/db", "COLLECTOR_API_KEY", "k", "SHUTDOWN_TIMEOUT", "soon"}, "SHUTDOWN_TIMEOUT"},
		{[]string{"DATABASE_URL", "mysql://what", "COLLECTOR_API_KEY", "k"}, "DATABASE_URL"},
	} {
		if _, err := LoadConfig(env(tc.env...)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("LoadConfig(%v) = %v, want an error naming %s", tc.env, err, tc.want)
		}
	}
}

func TestUnauthorized(t *testing.T) {
	pool, srv := migrated(t)
	body := mustJSON(sampleBatch(1))
	for _, key := range []string{"", "wrong", testKey + "x"} {
		if code, a := post(t, srv.URL, key, body); code != http.StatusUnauthorized || a.Status != "unauthorized" {
			t.Errorf("key %q: %d %+v", key, code, a)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, srv.URL+accesslog.BatchPath, bytes.NewReader(body))
	req.SetBasicAuth("x", testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("Basic auth: %d", resp.StatusCode)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != 0 {
		t.Errorf("%d rows stored without authorization", n)
	}
	if code, _ := post(t, srv.URL, testKey, body); code != http.StatusOK {
		t.Errorf("right key: %d", code)
	}
}

// Only a body that is not a batch is refused (4xx, which the shipper
// dead-letters); nothing of it is stored.
func TestRejectsBadBatches(t *testing.T) {
	pool, srv := migrated(t)
	big := sampleBatch(1)
	big.Logs[0].TargetURL = strings.Repeat("x", MaxBodyBytes)
	id := uuid.NewString()
	for _, tc := range []struct {
		name   string
		body   []byte
		code   int
		reason string
	}{
		{"not JSON", []byte(`{"batch_id":`), 400, "bad JSON"},
		{"not an object", []byte(`[]`), 400, "bad JSON"},
		{"missing batch_id", []byte(`{"probe_node":"n","logs":[]}`), 400, "missing batch_id"},
		{"batch_id not a UUID", []byte(`{"batch_id":"b-1","logs":[]}`), 400, "not a UUID"},
		{"missing logs", mustJSON(map[string]any{"batch_id": id}), 400, "missing logs"},
		{"logs not an array", mustJSON(map[string]any{"batch_id": id, "logs": map[string]any{}}), 400, "bad JSON"},
		{"probe_node wrong type", mustJSON(map[string]any{"batch_id": id, "probe_node": 5, "logs": []any{}}), 400, "bad JSON"},
		{"NUL in probe_node", mustJSON(map[string]any{"batch_id": id, "probe_node": "n\x00", "logs": []any{}}), 400, "probe_node contains a NUL"},
		{"too large", mustJSON(big), 413, "body larger than"},
	} {
		code, a := post(t, srv.URL, testKey, tc.body)
		if code != tc.code || a.Status != "rejected" || !strings.Contains(a.Reason, tc.reason) {
			t.Errorf("%s: %d %+v, want %d with reason containing %q", tc.name, code, a, tc.code, tc.reason)
		}
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_batches`); n != 0 {
		t.Errorf("%d batches stored from rejected requests", n)
	}
}

// withRecords is sampleBatch(good) as JSON with extra raw records appended
// to logs, byte for byte (so a test can send what json.Marshal never
// writes, such as invalid UTF-8).
func withRecords(t *testing.T, good int, extra ...string) (accesslog.Batch, []byte) {
	t.Helper()
	b := sampleBatch(good)
	if b.Logs == nil {
		b.Logs = []accesslog.Record{}
	}
	body := mustJSON(b)
	if len(extra) == 0 {
		return b, body
	}
	i := bytes.LastIndex(body, []byte("]}"))
	sep := ","
	if good == 0 {
		sep = ""
	}
	out := append([]byte(nil), body[:i]...)
	out = append(out, sep+strings.Join(extra, ",")...)
	return b, append(out, body[i:]...)
}

// recordJSON is a valid record as JSON with some fields replaced (nil
// deletes a field); v is marshalled unless it is a json.RawMessage.
func recordJSON(edits map[string]any) string {
	var m map[string]any
	json.Unmarshal(mustJSON(sampleBatch(1).Logs[0]), &m)
	m["token_id"] = "edited"
	for k, v := range edits {
		if v == nil {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
	return string(mustJSON(m))
}

type rejectedRow struct {
	position int
	reason   string
	record   string
}

func rejectedRows(t *testing.T, pool *pgxpool.Pool, batchID string) []rejectedRow {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT position, reason, record FROM forward_proxy_rejected_records
		WHERE batch_id = $1 ORDER BY position`, batchID)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (rejectedRow, error) {
		var x rejectedRow
		return x, r.Scan(&x.position, &x.reason, &x.record)
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Issue 12: one record the table cannot hold must not sink its batch. A
// batch with good records, a 60-character token_id and a NUL byte is
// stored: the good records in forward_proxy_request_logs, the other two in
// forward_proxy_rejected_records with their reasons, the answer is 200 and
// counts both, and a re-post stores nothing twice.
func TestBadRecordsKeptAsideRestStored(t *testing.T) {
	pool, srv := migrated(t)
	long := strings.Repeat("t", 60)
	b, body := withRecords(t, 3,
		recordJSON(map[string]any{"token_id": long}),
		recordJSON(map[string]any{"token_id": "nul\x00byte"}))
	code, a := post(t, srv.URL, testKey, body)
	if code != 200 || a.Status != "stored" || a.Records != 5 || a.Stored == nil || *a.Stored != 3 || a.Rejected == nil || *a.Rejected != 2 {
		t.Fatalf("answer %d %+v (stored %v, rejected %v), want 200 stored 3 rejected 2", code, a, deref(a.Stored), deref(a.Rejected))
	}
	got := func() []string {
		rows, err := pool.Query(context.Background(), `SELECT token_id FROM forward_proxy_request_logs WHERE batch_id = $1 ORDER BY id`, b.BatchID)
		if err != nil {
			t.Fatal(err)
		}
		ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}
	if ids := got(); strings.Join(ids, ",") != "tok-0,tok-1,tok-2" {
		t.Errorf("stored token_ids %q, want the three good records", ids)
	}
	want := []rejectedRow{
		{3, "token_id is 60 characters, at most 50", long},
		{4, "token_id contains a NUL character", `nul\u0000byte`},
	}
	rej := rejectedRows(t, pool, b.BatchID)
	if len(rej) != len(want) {
		t.Fatalf("rejected rows %+v, want %d", rej, len(want))
	}
	for i, w := range want {
		if rej[i].position != w.position || rej[i].reason != w.reason || !strings.Contains(rej[i].record, w.record) {
			t.Errorf("rejected row %d = %+v, want position %d, reason %q, record containing %q", i, rej[i], w.position, w.reason, w.record)
		}
	}
	// The raw record is queryable as JSON, as RECORDS.md shows: PostgreSQL
	// refuses to unescape \u0000 in JSON operators, so the query replaces
	// it first.
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_rejected_records
		WHERE replace(record, '\u0000', '\ufffd')::json->>'token_id' = $1`, long); n != 1 {
		t.Errorf("querying the kept records as JSON finds %d rows, want 1", n)
	}
	if n := count(t, pool, `SELECT rejected_count FROM forward_proxy_batches WHERE batch_id = $1`, b.BatchID); n != 2 {
		t.Errorf("rejected_count %d, want 2", n)
	}

	code, a = post(t, srv.URL, testKey, body)
	if code != 200 || a.Status != "duplicate" {
		t.Fatalf("re-post: %d %+v, want 200 duplicate", code, a)
	}
	if ids := got(); len(ids) != 3 {
		t.Errorf("after re-post %d stored rows, want 3", len(ids))
	}
	if rej := rejectedRows(t, pool, b.BatchID); len(rej) != 2 {
		t.Errorf("after re-post %d rejected rows, want 2", len(rej))
	}
}

func deref(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}

// Every rule of validate, each broken by one record of a batch whose
// other record is good: the bad record is kept aside with the reason, the
// good one stored.
func TestRecordRules(t *testing.T) {
	pool, srv := migrated(t)
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	for _, tc := range []struct {
		name   string
		record string
		reason string // "" means the record is stored
	}{
		{"valid", recordJSON(nil), ""},
		{"50 multi-byte characters fit VARCHAR(50)", recordJSON(map[string]any{"token_id": strings.Repeat("é", 50)}), ""},
		{"unknown field ignored", recordJSON(map[string]any{"from_the_future": 1}), ""},
		{"not an object", `5`, "record is not a JSON object, got number"},
		{"a string", `"x"`, "record is not a JSON object, got string"},
		{"null", `null`, "timestamp is missing"},
		{"wrong type", recordJSON(map[string]any{"status_code": "200"}), "status_code must be an integer, got string"},
		{"fraction", recordJSON(map[string]any{"duration_ms": 1.5}), "duration_ms must be an integer, got number 1.5"},
		{"overflow", recordJSON(map[string]any{"request_size": raw("1e30")}), "request_size must be an integer, got number 1e30"},
		{"bool as string", recordJSON(map[string]any{"success": "yes"}), "success must be true or false, got string"},
		{"no timestamp", recordJSON(map[string]any{"timestamp": nil}), "timestamp is missing"},
		{"null timestamp", recordJSON(map[string]any{"timestamp": raw("null")}), "timestamp is missing"},
		{"bad timestamp", recordJSON(map[string]any{"timestamp": "yesterday"}), "timestamp is not an RFC 3339 time"},
		{"numeric timestamp", recordJSON(map[string]any{"timestamp": 1700000000}), "timestamp is not an RFC 3339 time"},
		{"zero timestamp", recordJSON(map[string]any{"timestamp": "0001-01-01T00:00:00Z"}), "timestamp is the zero time"},
		{"token_id 51 characters", recordJSON(map[string]any{"token_id": strings.Repeat("t", 51)}), "token_id is 51 characters, at most 50"},
		{"NUL in target_url", recordJSON(map[string]any{"target_url": "a\x00b"}), "target_url contains a NUL character"},
		{"NUL in user_id", recordJSON(map[string]any{"user_id": "\x00"}), "user_id contains a NUL character"},
		{"invalid UTF-8", strings.Replace(recordJSON(nil), `"user-ü"`, "\"user-\xff\"", 1), "record contains invalid UTF-8"},
		{"negative size", recordJSON(map[string]any{"response_size": -1}), "response_size is negative"},
		{"negative duration", recordJSON(map[string]any{"duration_ms": -5}), "duration_ms is negative"},
		{"status above 999", recordJSON(map[string]any{"status_code": 1000}), "status_code 1000 is above 999"},
		{"negative status", recordJSON(map[string]any{"status_code": -1}), "status_code is negative"},
		{"negative suppressed", recordJSON(map[string]any{"suppressed": -1}), "suppressed is negative"},
		{"suppressed beyond INTEGER", recordJSON(map[string]any{"suppressed": int64(1) << 31}), "suppressed 2147483648 is above 2147483647"},
		{"every broken rule is listed", recordJSON(map[string]any{"token_id": strings.Repeat("t", 51), "method": "G\x00T", "request_size": -1}),
			"token_id is 51 characters, at most 50; method contains a NUL character; request_size is negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, body := withRecords(t, 1, tc.record)
			code, a := post(t, srv.URL, testKey, body)
			wantStored, wantRejected := 2, 0
			if tc.reason != "" {
				wantStored, wantRejected = 1, 1
			}
			if code != 200 || a.Status != "stored" || deref(a.Stored) != wantStored || deref(a.Rejected) != wantRejected {
				t.Fatalf("answer %d %+v (stored %v, rejected %v), want stored %d rejected %d", code, a,
					deref(a.Stored), deref(a.Rejected), wantStored, wantRejected)
			}
			if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1`, b.BatchID); n != wantStored {
				t.Errorf("%d rows stored, want %d", n, wantStored)
			}
			rej := rejectedRows(t, pool, b.BatchID)
			if tc.reason == "" {
				if len(rej) != 0 {
					t.Errorf("rejected: %+v", rej)
				}
				return
			}
			if len(rej) != 1 || rej[0].position != 1 || rej[0].reason != tc.reason {
				t.Fatalf("rejected rows %+v, want one at position 1 with reason %q", rej, tc.reason)
			}
			if want := strings.ToValidUTF8(tc.record, "\uFFFD"); rej[0].record != want {
				t.Errorf("kept record %q, want %q", rej[0].record, want)
			}
		})
	}
}

// suppressed is stored; a record without it (an older proxy) stores 0.
func TestSuppressedStored(t *testing.T) {
	pool, srv := migrated(t)
	b, body := withRecords(t, 0,
		recordJSON(map[string]any{"token_id": "s-7", "suppressed": 7}),
		recordJSON(map[string]any{"token_id": "s-none", "suppressed": nil}))
	if code, a := post(t, srv.URL, testKey, body); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("answer %d %+v", code, a)
	}
	for id, want := range map[string]int{"s-7": 7, "s-none": 0} {
		if n := count(t, pool, `SELECT suppressed FROM forward_proxy_request_logs WHERE batch_id = $1 AND token_id = $2`, b.BatchID, id); n != want {
			t.Errorf("%s: suppressed %d, want %d", id, n, want)
		}
	}
}

// The limits come from the table as it is: a table upgraded from an older
// backend with a narrower column rejects what does not fit it, instead of
// failing the COPY (503, retried forever) for the whole batch.
func TestLimitsFollowTheTable(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE forward_proxy_request_logs (
		id BIGSERIAL PRIMARY KEY, token_id VARCHAR(50), method VARCHAR(7), status_code SMALLINT)`); err != nil {
		t.Fatal(err)
	}
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	b, body := withRecords(t, 1,
		recordJSON(map[string]any{"method": "OPTIONS"}),
		recordJSON(map[string]any{"method": "PROPFIND"}))
	if code, a := post(t, srv.URL, testKey, body); code != 200 || deref(a.Stored) != 2 || deref(a.Rejected) != 1 {
		t.Fatalf("answer %d %+v (stored %v, rejected %v), want stored 2 rejected 1", code, a, deref(a.Stored), deref(a.Rejected))
	}
	if rej := rejectedRows(t, pool, b.BatchID); len(rej) != 1 || rej[0].reason != "method is 8 characters, at most 7" {
		t.Errorf("rejected %+v", rej)
	}
}

func TestStoresEveryColumn(t *testing.T) {
	pool, srv := migrated(t)
	b := sampleBatch(3)
	before := time.Now()
	code, a := post(t, srv.URL, testKey, mustJSON(b))
	if code != 200 || a.Status != "stored" || a.Records != 3 || deref(a.Stored) != 3 || deref(a.Rejected) != 0 || a.BatchID != b.BatchID {
		t.Fatalf("answer %d %+v", code, a)
	}
	rows, err := pool.Query(context.Background(), `SELECT batch_id::text, received_at, "timestamp", token_id, user_id,
		token_type, region, probe_node, client_ip, protocol, method, target_url, status_code, request_size,
		response_size, duration_ms, success, rate_limited, error FROM forward_proxy_request_logs ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	i := 0
	for rows.Next() {
		var got accesslog.Record
		var batchID string
		var received time.Time
		if err := rows.Scan(&batchID, &received, &got.Timestamp, &got.TokenID, &got.UserID, &got.TokenType,
			&got.Region, &got.ProbeNode, &got.ClientIP, &got.Protocol, &got.Method, &got.TargetURL, &got.StatusCode,
			&got.RequestSize, &got.ResponseSize, &got.DurationMS, &got.Success, &got.RateLimited, &got.Error); err != nil {
			t.Fatal(err)
		}
		got.Timestamp = got.Timestamp.UTC()
		if got != b.Logs[i] {
			t.Errorf("row %d:\n got %+v\nwant %+v", i, got, b.Logs[i])
		}
		if batchID != b.BatchID {
			t.Errorf("row %d batch_id %s, want %s", i, batchID, b.BatchID)
		}
		if received.Before(before.Add(-time.Minute)) {
			t.Errorf("row %d received_at %v", i, received)
		}
		i++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if i != 3 {
		t.Errorf("%d rows, want 3", i)
	}
	var probe, region string
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT probe_node, region, record_count FROM forward_proxy_batches WHERE batch_id = $1`,
		b.BatchID).Scan(&probe, &region, &n); err != nil {
		t.Fatal(err)
	}
	if probe != "node-1" || region != "eu-west" || n != 3 {
		t.Errorf("batch row %s %s %d", probe, region, n)
	}
}

func TestDuplicateStoredOnce(t *testing.T) {
	pool, srv := migrated(t)
	body := mustJSON(sampleBatch(4))
	if code, a := post(t, srv.URL, testKey, body); code != 200 || a.Status != "stored" {
		t.Fatalf("first: %d %+v", code, a)
	}
	if code, a := post(t, srv.URL, testKey, body); code != 200 || a.Status != "duplicate" {
		t.Fatalf("second: %d %+v", code, a)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != 4 {
		t.Errorf("%d rows, want 4", n)
	}
}

func TestConcurrentDuplicatesStoredOnce(t *testing.T) {
	pool, srv := migrated(t)
	body := mustJSON(sampleBatch(50))
	const senders = 8
	var wg sync.WaitGroup
	var stored, dup atomic.Int32
	start := make(chan struct{})
	for range senders {
		wg.Go(func() {
			<-start
			code, a := post(t, srv.URL, testKey, body)
			switch {
			case code == 200 && a.Status == "stored":
				stored.Add(1)
			case code == 200 && a.Status == "duplicate":
				dup.Add(1)
			default:
				t.Errorf("answer %d %+v", code, a)
			}
		})
	}
	close(start)
	wg.Wait()
	if stored.Load() != 1 || dup.Load() != senders-1 {
		t.Errorf("stored %d, duplicate %d; want 1 and %d", stored.Load(), dup.Load(), senders-1)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != 50 {
		t.Errorf("%d rows, want 50", n)
	}
}

// Migrate runs twice without harm and upgrades a table created by an older
// backend (a few columns, existing rows).
func TestMigrateIdempotentAndUpgrades(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE forward_proxy_request_logs (
		id BIGSERIAL PRIMARY KEY, token_id VARCHAR(50), target_url TEXT, status_code INTEGER)`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO forward_proxy_request_logs (token_id, target_url, status_code) VALUES ('old', 'x', 200)`); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := Migrate(ctx, pool); err != nil {
			t.Fatalf("Migrate #%d: %v", i+1, err)
		}
	}
	var cols []string
	rows, _ := pool.Query(ctx, `SELECT column_name FROM information_schema.columns WHERE table_name = 'forward_proxy_request_logs'`)
	cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range append([]string{"id", "received_at"}, func() []string {
		var n []string
		for _, c := range logColumns {
			n = append(n, c.name)
		}
		return n
	}()...) {
		found := false
		for _, have := range cols {
			found = found || have == c
		}
		if !found {
			t.Errorf("column %s missing after migration (have %v)", c, cols)
		}
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id = 'old'`); n != 1 {
		t.Errorf("old row lost")
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_schema_version WHERE version = $1`, SchemaVersion); n != 1 {
		t.Errorf("schema version rows = %d", n)
	}
	var typ string
	var length int
	if err := pool.QueryRow(ctx, `SELECT data_type, character_maximum_length FROM information_schema.columns
		WHERE table_name = 'forward_proxy_request_logs' AND column_name = 'token_id'`).Scan(&typ, &length); err != nil {
		t.Fatal(err)
	}
	if typ != "character varying" || length != auth.MaxIDLen {
		t.Errorf("token_id is %s(%d), want VARCHAR(auth.MaxIDLen)", typ, length)
	}
	// The upgraded table takes batches.
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	if code, a := post(t, srv.URL, testKey, mustJSON(sampleBatch(2))); code != 200 || a.Status != "stored" {
		t.Errorf("store into upgraded table: %d %+v", code, a)
	}
}

// A database migrated by a version 1 collector (no rejected-records table,
// no rejected_count, no suppressed), with rows, is upgraded in place;
// existing rows read 0 in the new columns.
func TestMigrateFromVersion1(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	old := uuid.NewString()
	for _, q := range []string{
		`DROP TABLE forward_proxy_rejected_records`,
		`ALTER TABLE forward_proxy_batches DROP COLUMN rejected_count`,
		`ALTER TABLE forward_proxy_request_logs DROP COLUMN suppressed`,
		`DELETE FROM forward_proxy_schema_version`,
		`INSERT INTO forward_proxy_schema_version (version) VALUES (1)`,
		`INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count) VALUES ('` + old + `', 'n', 'r', 1)`,
		`INSERT INTO forward_proxy_request_logs (batch_id, "timestamp", token_id) VALUES ('` + old + `', now(), 'v1')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	for i := range 2 {
		if err := Migrate(ctx, pool); err != nil {
			t.Fatalf("Migrate #%d: %v", i+1, err)
		}
	}
	if n := count(t, pool, `SELECT suppressed FROM forward_proxy_request_logs WHERE token_id = 'v1'`); n != 0 {
		t.Errorf("old row's suppressed = %d, want 0", n)
	}
	if n := count(t, pool, `SELECT rejected_count FROM forward_proxy_batches WHERE batch_id = $1`, old); n != 0 {
		t.Errorf("old batch's rejected_count = %d, want 0", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_schema_version WHERE version IN (1, $1)`, SchemaVersion); n != 2 {
		t.Errorf("schema versions: %d rows, want 1 and %d", n, SchemaVersion)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	_, body := withRecords(t, 1, recordJSON(map[string]any{"token_id": strings.Repeat("t", 60)}))
	if code, a := post(t, srv.URL, testKey, body); code != 200 || deref(a.Stored) != 1 || deref(a.Rejected) != 1 {
		t.Errorf("store into upgraded schema: %d %+v", code, a)
	}
}

func TestNoForeignKeys(t *testing.T) {
	pool, _ := migrated(t)
	if n := count(t, pool, `SELECT count(*) FROM information_schema.table_constraints
		WHERE table_name = 'forward_proxy_request_logs' AND constraint_type = 'FOREIGN KEY'`); n != 0 {
		t.Errorf("%d foreign keys", n)
	}
}

func TestHealthz(t *testing.T) {
	_, srv := migrated(t)
	resp, err := http.Get(srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/healthz = %d", resp.StatusCode)
	}
	resp, err = http.Get(srv.URL + accesslog.BatchPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET batch endpoint = %d", resp.StatusCode)
	}
}

// Shipper → collector → PostgreSQL, with the first attempts failing: one
// with a 503 before storing, one after storing (a lost response). Every
// record is in the table exactly once.
func TestEndToEnd(t *testing.T) {
	pool, _ := testDB(t)
	if err := Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	collector := NewHandler(pool, testKey, testLog())
	var mu sync.Mutex
	attempts := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var b accesslog.Batch
		json.Unmarshal(body, &b)
		mu.Lock()
		attempts[b.BatchID]++
		n := attempts[b.BatchID]
		mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(body))
		switch n {
		case 1:
			http.Error(w, "warming up", http.StatusServiceUnavailable)
		case 2:
			collector.ServeHTTP(httptest.NewRecorder(), r) // stored, answer lost
			http.Error(w, "lost", http.StatusBadGateway)
		default:
			collector.ServeHTTP(w, r)
		}
	}))
	defer srv.Close()

	// No spool: the retries happen in memory (with a spool, a batch goes
	// to disk after its first failed attempt; accesslog's tests cover that).
	s, _ := testShipper(t, srv.URL, 25, "")
	const n = 110
	for i := range n {
		s.Record(accesslog.Record{Timestamp: time.Now(), TokenID: fmt.Sprintf("e2e-%d", i), Method: "GET", Protocol: "HTTP/2"})
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); got != n {
		t.Errorf("%d rows, want %d", got, n)
	}
	if got := count(t, pool, `SELECT count(DISTINCT token_id) FROM forward_proxy_request_logs`); got != n {
		t.Errorf("%d distinct records, want %d", got, n)
	}
	if got := count(t, pool, `SELECT count(*) FROM forward_proxy_batches WHERE probe_node = 'node-e2e' AND region = 'us-east'`); got != 5 {
		t.Errorf("%d batches, want 5", got)
	}
	mu.Lock()
	for id, a := range attempts {
		if a != 3 {
			t.Errorf("batch %s sent %d times, want 3", id, a)
		}
	}
	mu.Unlock()
}

// The shipper, posting a batch with records the table cannot hold (as the
// proxy did for a 60-character or NUL token_id before auth refused them),
// gets a 2xx: nothing is dead-lettered or retried, every good record is
// stored and the bad ones are kept aside.
func TestShipperDoesNotDeadLetterBadRecords(t *testing.T) {
	pool, srv := migrated(t)
	dir := t.TempDir()
	s, m := testShipper(t, srv.URL, 10, dir)
	for i := range 8 {
		s.Record(accesslog.Record{Timestamp: time.Now(), TokenID: fmt.Sprintf("good-%d", i), Method: "GET", Protocol: "HTTP/2"})
	}
	s.Record(accesslog.Record{Timestamp: time.Now(), TokenID: strings.Repeat("t", 60), Method: "GET", Protocol: "HTTP/2"})
	s.Record(accesslog.Record{Timestamp: time.Now(), TokenID: "nul\x00", Method: "GET", Protocol: "HTTP/2"})
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := promtest.ToFloat64(m.BatchesDeadLetter); n != 0 {
		t.Errorf("%v batches dead-lettered", n)
	}
	if n := promtest.ToFloat64(m.BatchesRetried); n != 0 {
		t.Errorf("%v batch attempts retried", n)
	}
	if n := promtest.ToFloat64(m.BatchesSent); n != 1 {
		t.Errorf("%v batches sent, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(dir, accesslog.DeadLetterFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("dead-letter file: %v", err)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id LIKE 'good-%'`); n != 8 {
		t.Errorf("%d good records stored, want 8", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_rejected_records WHERE probe_node = 'node-e2e'`); n != 2 {
		t.Errorf("%d records kept aside, want 2", n)
	}
}

// serve migrates, answers on its listener, and stops when ctx ends.
func TestServe(t *testing.T) {
	_, dsn := testDB(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, Config{APIKey: testKey, DatabaseURL: dsn, ShutdownTimeout: 5 * time.Second}, testLog(), ln)
	}()
	url := "http://" + ln.Addr().String()
	waitHealthy := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(waitHealthy) {
			t.Fatalf("collector never healthy: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if code, a := post(t, url, testKey, mustJSON(sampleBatch(2))); code != 200 || a.Status != "stored" {
		t.Errorf("POST: %d %+v", code, a)
	}
	// The client's pool may hold a connection it dialed for a request that
	// another connection served (net/http dials while it waits); the
	// server counts a connection that never carried a request as new, not
	// idle, for 5 s, and Shutdown would wait that long for it. Close them.
	http.DefaultClient.CloseIdleConnections()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("serve returned %v after ctx was cancelled", err)
	}
}

func TestRunRefusesWithoutKey(t *testing.T) {
	err := Run(context.Background(), Config{Addr: "127.0.0.1:0", DatabaseURL: "postgres://127.0.0.1/x"}, testLog())
	if err == nil || !strings.Contains(err.Error(), "COLLECTOR_API_KEY") {
		t.Errorf("Run without a key = %v", err)
	}
}

// testShipper is the proxy's real shipper aimed at url as node-e2e in
// us-east, with fast retries; spoolDir "" means no spool.
func testShipper(t *testing.T, url string, batchSize int, spoolDir string) (*accesslog.Shipper, *metrics.Metrics) {
	t.Helper()
	m := metrics.New()
	s, err := accesslog.New(accesslog.Options{
		Log:           testLog(),
		BackendURL:    url,
		BackendAPIKey: testKey,
		BatchSize:     batchSize,
		BatchInterval: time.Hour,
		SpoolDir:      spoolDir,
		ProbeNode:     "node-e2e",
		Region:        "us-east",
		Metrics:       m,
		RetryBase:     time.Millisecond,
		RetryMax:      5 * time.Millisecond,
		MaxAttempts:   5,
	})
	if err != nil {
		t.Fatal(err)
	}
	return s, m
}
