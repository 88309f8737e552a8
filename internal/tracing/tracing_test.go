package tracing

import (
	"context"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

// Off: New creates nothing. (The request-level behaviour is tested in
// internal/proxy/tracing_test.go against a decoding OTLP receiver.)
func TestNewOff(t *testing.T) {
	tr, err := New(context.Background(), config.Tracing{Env: map[string]string{"OTEL_SERVICE_NAME": "x"}, Propagate: true}, nil)
	if tr != nil || err != nil {
		t.Fatalf("tracer %v, err %v without an endpoint", tr, err)
	}
	if err := tr.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A malformed OTEL_RESOURCE_ATTRIBUTES stops start-up with its name.
func TestNewBadResourceAttributes(t *testing.T) {
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "no-equals-sign")
	tr, err := New(context.Background(), config.Tracing{Env: map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}}, nil)
	if err == nil || !strings.Contains(err.Error(), "OTEL_RESOURCE_ATTRIBUTES") {
		t.Errorf("err %v", err)
	}
	if tr != nil {
		tr.Shutdown(context.Background())
	}
}
