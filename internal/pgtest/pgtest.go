// Package pgtest gives tests a fresh database on a real PostgreSQL server.
// Only test code imports it.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultAdminURL is used when PINAKA_TEST_DATABASE_URL is unset: the local
// server as scripts/deps.sh sets it up.
const DefaultAdminURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

// NewDB creates a database for one test and drops it afterwards. An
// unreachable server fails the test: a skipped database test would be a
// check that cannot fail. PINAKA_SKIP_PG=1 skips explicitly.
func NewDB(t testing.TB) (pool *pgxpool.Pool, dsn string) {
	t.Helper()
	if os.Getenv("PINAKA_SKIP_PG") == "1" {
		t.Skip("PINAKA_SKIP_PG=1")
	}
	admin := os.Getenv("PINAKA_TEST_DATABASE_URL")
	if admin == "" {
		admin = DefaultAdminURL
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatalf("PostgreSQL unreachable at PINAKA_TEST_DATABASE_URL (set PINAKA_SKIP_PG=1 to skip): %v", err)
	}
	var rnd [6]byte
	rand.Read(rnd[:])
	name := "pinaka_test_" + hex.EncodeToString(rnd[:])
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		conn.Close(ctx)
		t.Fatalf("creating test database: %v", err)
	}
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("PINAKA_TEST_DATABASE_URL must be a postgres:// URL: %v", err)
	}
	u.Path = "/" + name
	dsn = u.String()
	pool, err = pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("dropping test database: %v", err)
		}
		conn.Close(ctx)
	})
	return pool, dsn
}
