package collector

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// getRevocations GETs the list with key and an optional If-None-Match.
func getRevocations(t *testing.T, url, key, inm string) (int, string, revocation.Document) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url+revocation.Path, nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	if inm != "" {
		req.Header.Set("If-None-Match", inm)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var d revocation.Document
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &d); err != nil {
			t.Fatalf("200 with a body that is not a list: %v: %s", err, body)
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("served list does not validate: %v", err)
		}
	}
	return resp.StatusCode, resp.Header.Get("ETag"), d
}

func TestRevocationsEndpoint(t *testing.T) {
	pool, srv := migrated(t)
	ctx := context.Background()

	if code, _, _ := getRevocations(t, srv.URL, "", ""); code != http.StatusUnauthorized {
		t.Errorf("without the API key: %d", code)
	}
	if code, _, _ := getRevocations(t, srv.URL, "wrong", ""); code != http.StatusUnauthorized {
		t.Errorf("with a wrong API key: %d", code)
	}

	code, etag0, d := getRevocations(t, srv.URL, testKey, "")
	if code != 200 || etag0 == "" || d.Count != 0 || d.TokenIDs == nil {
		t.Fatalf("empty table: %d etag %q %+v", code, etag0, d)
	}
	if code, etag, _ := getRevocations(t, srv.URL, testKey, etag0); code != http.StatusNotModified || etag != etag0 {
		t.Errorf("unchanged, conditional: %d etag %q", code, etag)
	}
	if code, _, _ := getRevocations(t, srv.URL, testKey, `"v0-0", W/`+etag0); code != http.StatusNotModified {
		t.Errorf("If-None-Match list with a weak match: %d", code)
	}

	future := time.Now().Add(time.Hour)
	if err := Revoke(ctx, pool, "tok-a", nil, "leaked"); err != nil {
		t.Fatal(err)
	}
	if err := Revoke(ctx, pool, "tok-b", &future, ""); err != nil {
		t.Fatal(err)
	}
	code, etag1, d := getRevocations(t, srv.URL, testKey, etag0)
	if code != 200 || etag1 == etag0 || d.Version <= 0 || d.Count != 2 || d.TokenIDs[0] != "tok-a" || d.TokenIDs[1] != "tok-b" {
		t.Fatalf("after two revocations: %d etag %q→%q %+v", code, etag0, etag1, d)
	}
	v1 := d.Version

	// An entry whose until has passed is not served, and the ETag moves
	// although the table did not change.
	past := time.Now().Add(-time.Minute)
	if _, err := pool.Exec(ctx, `INSERT INTO forward_proxy_revocations (token_id, until) VALUES ('tok-old', $1)`, future); err != nil {
		t.Fatal(err)
	}
	_, etag2, d := getRevocations(t, srv.URL, testKey, "")
	if d.Count != 3 {
		t.Fatalf("three live entries: %+v", d)
	}
	// Let it expire "by time": move its until into the past without going
	// through the trigger, as the clock would.
	if _, err := pool.Exec(ctx, `ALTER TABLE forward_proxy_revocations DISABLE TRIGGER forward_proxy_revocations_bump`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE forward_proxy_revocations SET until = $1 WHERE token_id = 'tok-old'`, past); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `ALTER TABLE forward_proxy_revocations ENABLE TRIGGER forward_proxy_revocations_bump`); err != nil {
		t.Fatal(err)
	}
	code, etag3, d := getRevocations(t, srv.URL, testKey, etag2)
	if code != 200 || etag3 == etag2 || d.Count != 2 || d.Version != v1+1 {
		t.Fatalf("after expiry: %d etag %q→%q %+v (version before %d)", code, etag2, etag3, d, v1)
	}
	for _, id := range d.TokenIDs {
		if id == "tok-old" {
			t.Errorf("expired entry served")
		}
	}
	if code, _, _ := getRevocations(t, srv.URL, testKey, etag3); code != http.StatusNotModified {
		t.Errorf("conditional after expiry: %d", code)
	}

	// Removing bumps the version; removing what is not there does not.
	if found, err := Unrevoke(ctx, pool, "tok-a"); err != nil || !found {
		t.Fatal(found, err)
	}
	_, etag4, d := getRevocations(t, srv.URL, testKey, "")
	if d.Count != 1 || d.TokenIDs[0] != "tok-b" || d.Version <= v1+1 {
		t.Fatalf("after removal: %+v", d)
	}
	if found, err := Unrevoke(ctx, pool, "tok-a"); err != nil || found {
		t.Fatalf("second removal: %v %v", found, err)
	}
	if code, _, _ := getRevocations(t, srv.URL, testKey, etag4); code != http.StatusNotModified {
		t.Errorf("a removal that removed nothing changed the list: %d", code)
	}

	// Pruning deletes expired entries only.
	n, err := PruneRevocations(ctx, pool)
	if err != nil || n != 1 {
		t.Fatalf("prune: %d %v", n, err)
	}
	rs, err := ListRevocations(ctx, pool)
	if err != nil || len(rs) != 1 || rs[0].TokenID != "tok-b" || rs[0].Until == nil {
		t.Fatalf("after prune: %+v %v", rs, err)
	}
}

func TestRevokeValidatesAndUpdates(t *testing.T) {
	pool, _ := migrated(t)
	ctx := context.Background()
	for _, bad := range []string{"", string(make([]byte, 51)), "a\x00", "a\nb", "\xff"} {
		if err := Revoke(ctx, pool, bad, nil, ""); err == nil {
			t.Errorf("Revoke(%q) accepted", bad)
		}
	}
	if err := Revoke(ctx, pool, "t", nil, "x\x00"); err == nil {
		t.Error("a reason with NUL accepted")
	}
	until := time.Now().Add(time.Hour).Truncate(time.Microsecond)
	if err := Revoke(ctx, pool, "t", nil, "first"); err != nil {
		t.Fatal(err)
	}
	if err := Revoke(ctx, pool, "t", &until, ""); err != nil {
		t.Fatal(err)
	}
	rs, err := ListRevocations(ctx, pool)
	if err != nil || len(rs) != 1 || rs[0].Until == nil || !rs[0].Until.Equal(until) || rs[0].Reason != "first" {
		t.Fatalf("revoking again updates until and keeps the reason: %+v %v", rs, err)
	}
}

// A snapshot pairs the version with its rows: a change committed after
// a reader's snapshot began is in neither.
func TestRevocationVersionIsTransactional(t *testing.T) {
	pool, _ := migrated(t)
	ctx := context.Background()
	var v0 int64
	pool.QueryRow(ctx, `SELECT version FROM forward_proxy_revocations_version`).Scan(&v0)
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO forward_proxy_revocations (token_id) VALUES ('x')`); err != nil {
		t.Fatal(err)
	}
	var outside int64
	pool.QueryRow(ctx, `SELECT version FROM forward_proxy_revocations_version`).Scan(&outside)
	if outside != v0 {
		t.Errorf("an uncommitted change is visible in the version: %d → %d", v0, outside)
	}
	tx.Rollback(ctx)
	var after int64
	pool.QueryRow(ctx, `SELECT version FROM forward_proxy_revocations_version`).Scan(&after)
	if after != v0 {
		t.Errorf("a rolled-back change moved the version: %d → %d", v0, after)
	}
}
