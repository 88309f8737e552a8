package collector

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// A flow's counts reach the table as sent, 0 included; records that are
// not flows store NULLs.
func TestUDPColumnsStored(t *testing.T) {
	pool, srv := migrated(t)
	b := sampleBatch(2)
	up, down, dropped := int64(7), int64(0), int64(2)
	b.Logs[0].DatagramsUp, b.Logs[0].DatagramsDown, b.Logs[0].DatagramsDropped = &up, &down, &dropped
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 2 {
		t.Fatalf("store: %d %+v", code, a)
	}
	read := func(token string) [3]*int64 {
		var r [3]*int64
		if err := pool.QueryRow(context.Background(), `SELECT datagrams_up, datagrams_down, datagrams_dropped
			FROM forward_proxy_request_logs WHERE token_id = $1`, token).Scan(&r[0], &r[1], &r[2]); err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := read("tok-0")
	if r[0] == nil || *r[0] != 7 || r[1] == nil || *r[1] != 0 || r[2] == nil || *r[2] != 2 {
		t.Errorf("flow's counts stored as %v %v %v, want 7 0 2", r[0], r[1], r[2])
	}
	if r := read("tok-1"); r[0] != nil || r[1] != nil || r[2] != nil {
		t.Errorf("a record that is no flow stored %v, want NULLs", r)
	}
}

// Counts that cannot be right reject their record.
func TestUDPRules(t *testing.T) {
	pool, srv := migrated(t)
	for _, tc := range []struct {
		name   string
		record string
		reason string
	}{
		{"negative", recordJSON(map[string]any{"datagrams_up": -1}), "datagrams_up is negative"},
		{"not a number", recordJSON(map[string]any{"datagrams_down": "many"}), "datagrams_down must be an integer, got string"},
		{"fraction", recordJSON(map[string]any{"datagrams_dropped": 1.5}), "datagrams_dropped must be an integer"},
		{"fine", recordJSON(map[string]any{"datagrams_up": 1, "datagrams_down": 1, "datagrams_dropped": 0}), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, body := withRecords(t, 0, tc.record)
			if code, a := post(t, srv.URL, testKey, body); code != 200 {
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

// A database at schema version 5, with rows, gets the UDP columns; its
// rows read NULL in them and new batches fill them.
func TestMigrateFromVersion5(t *testing.T) {
	pool, _ := testDB(t)
	ctx := context.Background()
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	old := uuid.NewString()
	var stmts []string
	for _, c := range udpColumns {
		stmts = append(stmts, `ALTER TABLE forward_proxy_request_logs DROP COLUMN `+c.name)
	}
	stmts = append(stmts,
		`DELETE FROM forward_proxy_schema_version WHERE version >= 6`,
		`INSERT INTO forward_proxy_batches (batch_id, probe_node, region, record_count) VALUES ('`+old+`', 'n', 'r', 1)`,
		`INSERT INTO forward_proxy_request_logs (batch_id, "timestamp", token_id) VALUES ('`+old+`', now(), 'v5')`)
	for _, q := range stmts {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if err := Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE token_id = 'v5' AND datagrams_up IS NULL`); n != 1 {
		t.Errorf("old row: %d with NULL datagrams_up, want 1", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_schema_version WHERE version = 6`); n != 1 {
		t.Error("schema version 6 not recorded")
	}
	srv := httptest.NewServer(NewHandler(pool, testKey, testLog()))
	defer srv.Close()
	b := sampleBatch(1)
	n := int64(42)
	b.Logs[0].DatagramsDown = &n
	if code, a := post(t, srv.URL, testKey, mustJSON(b)); code != 200 || deref(a.Stored) != 1 {
		t.Fatalf("store: %d %+v", code, a)
	}
	if n := count(t, pool, `SELECT count(*) FROM forward_proxy_request_logs WHERE datagrams_down = 42 AND datagrams_up IS NULL`); n != 1 {
		t.Errorf("new row's datagrams_down not stored")
	}
}
