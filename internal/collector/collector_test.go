package collector

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/pgtest"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
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

func TestRejectsBadBatches(t *testing.T) {
	pool, srv := migrated(t)
	withRecord := func(edit func(r map[string]any)) []byte {
		var m map[string]any
		json.Unmarshal(mustJSON(sampleBatch(2)), &m)
		edit(m["logs"].([]any)[1].(map[string]any))
		return mustJSON(m)
	}
	big := sampleBatch(1)
	big.Logs[0].TargetURL = strings.Repeat("x", MaxBodyBytes)
	for _, tc := range []struct {
		name   string
		body   []byte
		code   int
		reason string
	}{
		{"not JSON", []byte(`{"batch_id":`), 400, "bad JSON"},
		{"missing batch_id", []byte(`{"probe_node":"n","logs":[]}`), 400, "missing batch_id"},
		{"batch_id not a UUID", []byte(`{"batch_id":"b-1","logs":[]}`), 400, "not a UUID"},
		{"missing logs", mustJSON(map[string]any{"batch_id": uuid.NewString()}), 400, "missing logs"},
		{"wrong type", withRecord(func(r map[string]any) { r["status_code"] = "200" }), 400, "bad record fields: logs.status_code"},
		{"no timestamp", withRecord(func(r map[string]any) { delete(r, "timestamp") }), 400, "logs[1].timestamp is missing"},
		{"long token_id", withRecord(func(r map[string]any) { r["token_id"] = strings.Repeat("t", 51) }), 400, "logs[1].token_id is 51 characters"},
		{"NUL", withRecord(func(r map[string]any) { r["target_url"] = "a\x00b" }), 400, "logs[1].target_url contains a NUL"},
		{"negative size", withRecord(func(r map[string]any) { r["response_size"] = -1 }), 400, "response_size is negative"},
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
	// A token id of 50 multi-byte characters fits VARCHAR(50).
	ok := sampleBatch(1)
	ok.Logs[0].TokenID = strings.Repeat("é", 50)
	if code, a := post(t, srv.URL, testKey, mustJSON(ok)); code != 200 {
		t.Errorf("50-character token_id: %d %+v", code, a)
	}
}

func TestStoresEveryColumn(t *testing.T) {
	pool, srv := migrated(t)
	b := sampleBatch(3)
	before := time.Now()
	code, a := post(t, srv.URL, testKey, mustJSON(b))
	if code != 200 || a.Status != "stored" || a.Records != 3 || a.BatchID != b.BatchID {
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
	if typ != "character varying" || length != 50 {
		t.Errorf("token_id is %s(%d)", typ, length)
	}
	// The upgraded table takes batches.
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	if code, a := post(t, srv.URL, testKey, mustJSON(sampleBatch(2))); code != 200 || a.Status != "stored" {
		t.Errorf("store into upgraded table: %d %+v", code, a)
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

	m := metrics.New()
	dir := t.TempDir()
	s, err := accesslog.New(accesslog.Options{
		Log:           testLog(),
		BackendURL:    srv.URL,
		BackendAPIKey: testKey,
		BatchSize:     25,
		BatchInterval: time.Hour,
		SpoolDir:      dir,
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
