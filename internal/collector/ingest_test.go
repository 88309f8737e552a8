package collector

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// The writers' path (a real collector: requests grouped into one
// transaction, binary COPY) stores every field exactly as sent, like the
// direct path TestStoresEveryColumn checks.
func TestWritersStoreEveryColumn(t *testing.T) {
	pool, dsn := testDB(t)
	url := startCollector(t, dsn, Config{Writers: 1})
	b := sampleBatch(5)
	for i := range b.Logs {
		b.Logs[i].Timestamp = time.Now().UTC().Truncate(time.Microsecond).Add(time.Duration(i) * time.Second)
	}
	b.Logs[1].Suppressed = 7
	if code, a := post(t, url, testKey, mustJSON(b)); code != 200 || a.Status != "stored" || deref(a.Stored) != 5 {
		t.Fatalf("answer %d %+v", code, a)
	}
	rows, err := pool.Query(context.Background(), `SELECT batch_id::text, "timestamp", token_id, user_id,
		token_type, region, probe_node, client_ip, protocol, method, target_url, status_code, request_size,
		response_size, duration_ms, success, rate_limited, error, suppressed FROM forward_proxy_request_logs ORDER BY "timestamp"`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	i := 0
	for rows.Next() {
		var got accesslog.Record
		var batchID string
		if err := rows.Scan(&batchID, &got.Timestamp, &got.TokenID, &got.UserID, &got.TokenType,
			&got.Region, &got.ProbeNode, &got.ClientIP, &got.Protocol, &got.Method, &got.TargetURL, &got.StatusCode,
			&got.RequestSize, &got.ResponseSize, &got.DurationMS, &got.Success, &got.RateLimited, &got.Error, &got.Suppressed); err != nil {
			t.Fatal(err)
		}
		got.Timestamp = got.Timestamp.UTC()
		if got != b.Logs[i] || batchID != b.BatchID {
			t.Errorf("row %d:\n got %+v (%s)\nwant %+v (%s)", i, got, batchID, b.Logs[i], b.BatchID)
		}
		i++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if i != 5 {
		t.Errorf("%d rows, want 5", i)
	}
}

// One group holding the same batch twice and another batch: the batch is
// stored once (the first job "stored", the second a duplicate), the other
// one too; the rejected records of a stored batch are kept, once.
func TestGroupStoresABatchOnce(t *testing.T) {
	pool, _ := migrated(t)
	ctx := context.Background()
	parts := newPartitions(pool, 0, nil)
	lim, err := loadLimits(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(body []byte) *job {
		b, err := decode(strings.NewReader(string(body)))
		if err != nil {
			t.Fatal(err)
		}
		good, bad := b.sort(lim, nil)
		return &job{b: b, good: good, bad: bad, done: make(chan jobResult, 1)}
	}
	_, withBad := withRecords(t, 3, recordJSON(map[string]any{"status_code": -1}))
	other := mustJSON(batchAt(2, time.Now()))
	group := []*job{mk(withBad), mk(other), mk(withBad)}
	stored, err := parts.storeMany(ctx, group)
	if err != nil {
		t.Fatal(err)
	}
	if !stored[0] || !stored[1] || stored[2] {
		t.Errorf("stored %v, want [true true false]", stored)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1`, group[0].b.id.String()); n != 3 {
		t.Errorf("%d records of the doubled batch, want 3", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_rejected_records WHERE batch_id = $1`, group[0].b.id.String()); n != 1 {
		t.Errorf("%d rejected records, want 1", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != 5 {
		t.Errorf("%d records, want 5", n)
	}
	// Again, as a retry: every one a duplicate, nothing written.
	again, err := parts.storeMany(ctx, []*job{mk(withBad), mk(other)})
	if err != nil || again[0] || again[1] {
		t.Errorf("retry: stored %v, %v; want all duplicates", again, err)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs`); n != 5 {
		t.Errorf("%d records after the retry, want 5", n)
	}
}

// A table with a column type the binary plan does not write (an older
// backend's NUMERIC status_code) is written through pgx's COPY instead,
// every value intact.
func TestCopyFallsBackForOtherTypes(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE forward_proxy_request_logs (id BIGSERIAL PRIMARY KEY, status_code NUMERIC(3))`); err != nil {
		t.Fatal(err)
	}
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if plan, err := loadCopyPlan(ctx, pool); err != nil || plan != nil {
		t.Fatalf("plan %v, %v; want none", plan, err)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	b := batchAt(3, time.Now())
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 3 {
		t.Fatalf("answer %d %+v", code, a)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE batch_id = $1 AND status_code = 201 AND token_id = 'tok-1'`, b.BatchID); n != 1 {
		t.Errorf("record 1 not stored as sent")
	}
	// A fresh table has a plan: the binary path is the one the other
	// tests exercise.
	fresh, _ := migrated(t)
	if plan, err := loadCopyPlan(ctx, fresh); err != nil || plan == nil {
		t.Errorf("fresh table: plan %v, %v; want one", plan, err)
	}
}

func TestLoadConfigWriters(t *testing.T) {
	env := func(v string) func(string) (string, bool) { return configWith("COLLECTOR_WRITERS", v) }
	for v, want := range map[string]int{"unset": DefaultWriters, "1": 1, "8": 8} {
		c, err := LoadConfig(env(v))
		if err != nil || c.writers() != want {
			t.Errorf("COLLECTOR_WRITERS=%q: %d, %v; want %d", v, c.writers(), err, want)
		}
	}
	for _, v := range []string{"0", "-2", "65", "two"} {
		if _, err := LoadConfig(env(v)); err == nil || !strings.Contains(err.Error(), "COLLECTOR_WRITERS") {
			t.Errorf("COLLECTOR_WRITERS=%q: %v, want an error naming it", v, err)
		}
	}
}

// configWith is a collector environment with a database and an API key,
// and name set to v ("unset": not set).
func configWith(name, v string) func(string) (string, bool) {
	return func(k string) (string, bool) {
		switch k {
		case "DATABASE_URL":
			return "postgres://u@127.0.0.1/db", true
		case "COLLECTOR_API_KEY":
			return "k", true
		case name:
			return v, v != "unset"
		}
		return "", false
	}
}
