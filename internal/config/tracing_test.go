package config

import (
	"strings"
	"testing"
)

// Tracing is on only with an OTLP endpoint, and not when the SDK is
// disabled; the OTEL_* variables set (also from .env) are gathered.
func TestTracingEnabled(t *testing.T) {
	for _, tc := range []struct {
		vars map[string]string
		on   bool
	}{
		{nil, false},
		{map[string]string{"OTEL_SERVICE_NAME": "x", "TRACE_PROPAGATE": "true"}, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otel.example/v1/traces"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, false},
	} {
		c, err := Load(lookupOf(tc.vars), true)
		if err != nil {
			t.Fatalf("%v: %v", tc.vars, err)
		}
		if c.Tracing.Enabled() != tc.on {
			t.Errorf("%v: enabled %v, want %v", tc.vars, c.Tracing.Enabled(), tc.on)
		}
		for k, v := range tc.vars {
			if strings.HasPrefix(k, "OTEL_") && !strings.EqualFold(c.Tracing.Env[k], v) {
				t.Errorf("%v: Env[%s] = %q", tc.vars, k, c.Tracing.Env[k])
			}
		}
	}
	c, _ := Load(lookupOf(map[string]string{"TRACE_PROPAGATE": "yes"}), true)
	if !c.Tracing.Propagate {
		t.Error("TRACE_PROPAGATE=yes not read")
	}
}

func TestTracingInvalidValuesNameTheVariable(t *testing.T) {
	for name, value := range map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT":        "127.0.0.1:4318",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "grpc://x",
		"OTEL_EXPORTER_OTLP_PROTOCOL":        "grpc",
		"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
		"OTEL_TRACES_SAMPLER":                "sometimes",
		"OTEL_TRACES_EXPORTER":               "jaeger",
		"TRACE_PROPAGATE":                    "perhaps",
	} {
		_, err := Load(lookupOf(map[string]string{name: value}), true)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s=%q: error %v does not name the variable", name, value, err)
		}
	}
	_, err := Load(lookupOf(map[string]string{"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}), true)
	if err == nil || !strings.Contains(err.Error(), "OTEL_TRACES_SAMPLER_ARG") {
		t.Errorf("ratio 1.5: %v", err)
	}
}
