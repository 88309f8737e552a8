package collector

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
)

// startCollector runs a real collector (serve: Migrate, the maintenance
// loop, the HTTP server) on a loopback port against dsn, and stops it when
// the test ends. It returns the collector's base URL.
func startCollector(tb testing.TB, dsn string, cfg Config) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	cfg.APIKey = testKey
	cfg.DatabaseURL = dsn
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 5 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, testLog(), ln) }()
	url := "http://" + ln.Addr().String()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		select {
		case err := <-done:
			cancel()
			tb.Fatalf("collector stopped at start: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			tb.Fatalf("collector never healthy: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	tb.Cleanup(func() {
		http.DefaultClient.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("collector: %v", err)
		}
	})
	return url
}

// batchTemplate is a batch body of n realistic records with a placeholder
// batch_id: body splices a fresh id in without encoding the batch again, so
// the senders cost the machine little next to the collector.
type batchTemplate struct{ prefix, suffix []byte }

const placeholderID = "00000000-0000-0000-0000-000000000000"

func newBatchTemplate(n int, ts time.Time) batchTemplate {
	b := accesslog.Batch{BatchID: placeholderID, ProbeNode: "bench-node-1", Region: "eu-west"}
	for i := range n {
		b.Logs = append(b.Logs, accesslog.Record{
			Timestamp:    ts.Add(time.Duration(i) * time.Millisecond).UTC(),
			TokenID:      fmt.Sprintf("tok-%d", i%37),
			UserID:       fmt.Sprintf("user-%d", i%11),
			TokenType:    "session",
			Region:       "eu-west",
			ProbeNode:    "bench-node-1",
			ClientIP:     "203.0.113.77",
			Protocol:     "HTTP/2",
			Method:       "GET",
			TargetURL:    fmt.Sprintf("https://www.example.com/assets/app-%d.js", i),
			StatusCode:   200,
			RequestSize:  812,
			ResponseSize: 48213 + int64(i),
			DurationMS:   int64(i % 400),
			Success:      true,
		})
	}
	body := mustJSON(b)
	i := bytes.Index(body, []byte(placeholderID))
	return batchTemplate{prefix: body[:i], suffix: body[i+len(placeholderID):]}
}

func (t batchTemplate) body(id string) []byte {
	out := make([]byte, 0, len(t.prefix)+len(id)+len(t.suffix))
	return append(append(append(out, t.prefix...), id...), t.suffix...)
}

// BenchmarkCollectorIngest measures records stored per second: senders
// (BENCH_COLLECTOR_SENDERS, 8) POST batches of BENCH_COLLECTOR_BATCH (100)
// records (collector writers: BENCH_COLLECTOR_WRITERS, DefaultWriters), each with a new batch_id, to a real collector on the local
// PostgreSQL, over HTTP on loopback; an operation is one batch, answered
// "stored". `make bench-collector` runs it; see docs/PERFORMANCE.md.
func BenchmarkCollectorIngest(b *testing.B) {
	senders := envInt(b, "BENCH_COLLECTOR_SENDERS", 8)
	size := envInt(b, "BENCH_COLLECTOR_BATCH", 100)
	pool, dsn := pgtest.NewDB(b)
	if v := os.Getenv("BENCH_COLLECTOR_DSN_PARAMS"); v != "" {
		dsn += "&" + v
	}
	url := startCollector(b, dsn, Config{Writers: envInt(b, "BENCH_COLLECTOR_WRITERS", DefaultWriters)}) + accesslog.BatchPath
	tmpl := newBatchTemplate(size, time.Now())
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: senders}}
	defer client.CloseIdleConnections()

	var next, failed atomic.Int64
	commitsBefore := commits(b, pool)
	pgBefore := backendCPU(b, pool)
	procBefore := processCPU()
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range senders {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(tmpl.body(uuid.Must(uuid.NewV7()).String())))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+testKey)
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				ok := resp.StatusCode == 200
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if !ok {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	proc := processCPU() - procBefore
	pg := backendCPU(b, pool) - pgBefore
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d of %d batches not stored", n, b.N)
	}
	// Batches per transaction: the writers' groups (writers.go), which
	// PostgreSQL's CPU per record depends on.
	if c := commits(b, pool) - commitsBefore; c > 0 {
		b.ReportMetric(float64(b.N)/float64(c), "batches/commit")
	}
	records := float64(b.N * size)
	b.ReportMetric(records/elapsed.Seconds(), "records/s")
	// CPU per record is what the machine's load does not change much: the
	// Go process (collector and senders) and the database's backends.
	b.ReportMetric(float64(proc.Microseconds())/records, "go-cpu-µs/record")
	b.ReportMetric(float64(pg.Microseconds())/records, "pg-cpu-µs/record")
}

// commits is how many transactions have committed in pool's database.
// Backends report their counts when idle, at most a second late, so it
// waits that long first.
func commits(tb testing.TB, pool *pgxpool.Pool) int64 {
	time.Sleep(1100 * time.Millisecond)
	var n int64
	if err := pool.QueryRow(context.Background(),
		`SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// processCPU is the user and system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// backendCPU is the CPU time used so far by the PostgreSQL backends
// connected to pool's database, other than pool's own, read from /proc
// (the server is local). It is 0 where /proc cannot be read.
func backendCPU(tb testing.TB, pool *pgxpool.Pool) time.Duration {
	rows, err := pool.Query(context.Background(),
		`SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`)
	if err != nil {
		tb.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		tb.Fatal(err)
	}
	var total time.Duration
	for _, pid := range pids {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the parenthesised command: state is field 3, utime
		// and stime are fields 14 and 15, in clock ticks (100 a second).
		f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(u+s) * 10 * time.Millisecond
	}
	return total
}

func envInt(tb testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		tb.Fatalf("%s must be a positive integer, got %q", name, v)
	}
	return n
}
