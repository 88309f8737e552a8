package accesslog

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// BenchmarkRecord is the per-request cost of a record: the JSON log line,
// and with a backend the non-blocking enqueue (batches go to a real
// loopback backend that accepts them, off the measured path).
func BenchmarkRecord(b *testing.B) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer backend.Close()
	r := Record{
		Timestamp: time.Now().UTC(), TokenID: "tok-1", UserID: "user-1", TokenType: "manual",
		ClientIP: "203.0.113.7", Protocol: "HTTP/2", Method: "CONNECT", TargetURL: "example.com:443",
		StatusCode: 200, RequestSize: 1234, ResponseSize: 56789, DurationMS: 42, Success: true,
	}
	for _, c := range []struct{ name, url string }{{"log-only", ""}, {"shipping", backend.URL}} {
		b.Run(c.name, func(b *testing.B) {
			s, err := New(Options{
				Log:        slog.New(slog.NewJSONHandler(io.Discard, nil)),
				BackendURL: c.url, BatchSize: 100, BatchInterval: time.Second,
				QueueSize: 1 << 20, ProbeNode: "node", Region: "us-east", Metrics: metrics.New(),
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				s.Record(r)
			}
			b.StopTimer()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := s.Close(ctx); err != nil {
				b.Fatal(err)
			}
		})
	}
}
