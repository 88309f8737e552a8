package collector

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// timingRow is a stored row's timing columns; nil is NULL.
type timingRow struct {
	requestID, upstreamAddr, closeReason *string
	dns, connect, tls, ttfb              *float64
}

// The proxy's timing fields reach the table as they were sent (sub-
// millisecond values included); records without them (older proxies,
// refusals) store NULLs.
func TestTimingColumnsStored(t *testing.T) {
	pool, srv := migrated(t)
	b := sampleBatch(2)
	b.Logs[0].RequestID = "0195b4c6-5d2e-7c3a-9f00-000000000001"
	b.Logs[0].DNSMS = accesslog.MillisOf(0) // from the cache
	b.Logs[0].ConnectMS = accesslog.MillisOf(123 * time.Microsecond)
	b.Logs[0].TLSMS = accesslog.MillisOf(1500 * time.Microsecond)
	b.Logs[0].TTFBMS = accesslog.MillisOf(200456 * time.Microsecond)
	b.Logs[0].UpstreamAddr = "[2001:db8::1]:443"
	b.Logs[0].CloseReason = "origin_closed"
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("store: %d %+v", code, a)
	}
	read := func(token string) timingRow {
		var r timingRow
		if err := pool.QueryRow(context.Background(), `SELECT request_id, dns_ms, connect_ms, tls_ms, ttfb_ms, upstream_addr, close_reason
			FROM forward_proxy_request_logs WHERE token_id = $1`, token).Scan(
			&r.requestID, &r.dns, &r.connect, &r.tls, &r.ttfb, &r.upstreamAddr, &r.closeReason); err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := read("tok-0")
	if r.requestID == nil || *r.requestID != b.Logs[0].RequestID || r.upstreamAddr == nil || *r.upstreamAddr != "[2001:db8::1]:443" ||
		r.closeReason == nil || *r.closeReason != "origin_closed" {
		t.Errorf("text columns: %v %v %v", r.requestID, r.upstreamAddr, r.closeReason)
	}
	for _, c := range []struct {
		name string
		got  *float64
		want float64
	}{{"dns_ms", r.dns, 0}, {"connect_ms", r.connect, 0.123}, {"tls_ms", r.tls, 1.5}, {"ttfb_ms", r.ttfb, 200.456}} {
		if c.got == nil || *c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	r = read("tok-1")
	if r.requestID != nil || r.dns != nil || r.connect != nil || r.tls != nil || r.ttfb != nil || r.upstreamAddr != nil || r.closeReason != nil {
		t.Errorf("a record without timings stored %+v, want NULLs", r)
	}
	// A user quotes the id: the index finds the row.
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE request_id = $1`, b.Logs[0].RequestID); n != 1 {
		t.Errorf("rows with the request id: %d", n)
	}
}

// Timing fields that cannot be right are rejected with the record, like
// any other broken rule; null is fine.
func TestTimingRules(t *testing.T) {
	pool, srv := migrated(t)
	for _, tc := range []struct {
		name   string
		record string
		reason string
	}{
		{"null timings", recordJSON(map[string]any{"dns_ms": nil, "ttfb_ms": json.RawMessage("null")}), ""},
		{"negative", recordJSON(map[string]any{"connect_ms": -0.5}), "connect_ms is negative"},
		{"not a number", recordJSON(map[string]any{"ttfb_ms": "fast"}), "ttfb_ms must be a number, got string"},
		{"absurd", recordJSON(map[string]any{"tls_ms": 1e15}), "tls_ms 1e+15 is above"},
		{"NUL in request id", recordJSON(map[string]any{"request_id": "a\x00b"}), "request_id contains a NUL character"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, body := withRecords(t, 0, tc.record)
			code, a := post(t, srv.URL, testKey, body)
			if code != 200 {
				t.Fatalf("status %d %+v", code, a)
			}
			rej := rejectedRows(t, pool, b.BatchID)
			switch {
			case tc.reason == "" && len(rej) != 0:
				t.Errorf("rejected: %+v", rej)
			case tc.reason != "" && (len(rej) != 1 || !strings.Contains(rej[0].reason, tc.reason)):
				t.Errorf("rejected %+v, want one with %q", rej, tc.reason)
			}
		})
	}
}

// A database at schema version 3, with rows, gets the timing columns; its
// rows read NULL in them and new batches fill them.
func TestMigrateFromVersion3(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	old := uuid.NewString()
	stmts := []string{`DROP INDEX forward_proxy_request_logs_request_id_idx`}
	for _, c := range timingColumns {
		stmts = append(stmts, `ALTER TABLE forward_proxy_request_logs DROP COLUMN `+c.name)
	}
	stmts = append(stmts,
		`DELETE FROM forward_proxy_schema_version WHERE version >= 4`,
		`INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count) VALUES ('`+old+`', 'n', 'r', 1)`,
		`INSERT INTO forward_proxy_request_logs (batch_id, "timestamp", token_id) VALUES ('`+old+`', now(), 'v3')`)
	for _, q := range stmts {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id = 'v3' AND request_id IS NULL AND ttfb_ms IS NULL`); n != 1 {
		t.Errorf("old row: %d with NULL timings, want 1", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_schema_version WHERE version = $1`, SchemaVersion); n != 1 {
		t.Errorf("schema version %d not recorded", SchemaVersion)
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	b := sampleBatch(1)
	b.Logs[0].TTFBMS = accesslog.MillisOf(5 * time.Millisecond)
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 1 {
		t.Fatalf("store: %d %+v", code, a)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE ttfb_ms = 5`); n != 1 {
		t.Errorf("new row's ttfb_ms not stored")
	}
}
