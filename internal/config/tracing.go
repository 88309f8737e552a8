package config

import (
	"net/url"
	"strconv"
	"strings"
)

// Tracing is the OpenTelemetry part of the configuration (internal/tracing).
// The SDK reads the standard OTEL_* variables itself; they are gathered here
// too so that those written in the .env file count like the environment's,
// and so that a malformed one stops start-up with its name.
type Tracing struct {
	// Env holds the OTEL_* variables that are set (environment or .env).
	Env map[string]string
	// Propagate sends a W3C traceparent to origins and continues a
	// client's (TRACE_PROPAGATE).
	Propagate bool
}

// Enabled reports whether traces are exported: an OTLP endpoint is set and
// the SDK is not disabled.
func (t Tracing) Enabled() bool {
	if t.Env["OTEL_SDK_DISABLED"] == "true" || t.Env["OTEL_TRACES_EXPORTER"] == "none" {
		return false
	}
	return t.Env["OTEL_EXPORTER_OTLP_ENDPOINT"] != "" || t.Env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] != ""
}

// tracingVars are the standard variables the trace SDK, its OTLP/HTTP
// exporter and its batch span processor read.
var tracingVars = []string{
	"OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
	"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
	"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
	"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
	"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
	"OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
	"OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
	"OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
	"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
	"OTEL_EXPORTER_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
	"OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_EXPORT_TIMEOUT", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
}

// parseTracing reads TRACE_PROPAGATE and the OTEL_* variables, checking the
// ones whose mistakes the SDK would only log (or ignore) at run time.
func (p *parser) parseTracing() Tracing {
	t := Tracing{Env: map[string]string{}, Propagate: p.bool("TRACE_PROPAGATE", false)}
	for _, name := range tracingVars {
		if v := p.str(name, ""); v != "" {
			t.Env[name] = v
		}
	}
	for _, name := range []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"} {
		if v := t.Env[name]; v != "" {
			u, err := url.Parse(v)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				p.fail(name, "must be an http:// or https:// URL, got %q", v)
			}
		}
	}
	// Only the OTLP/HTTP protobuf exporter is built in.
	for _, name := range []string{"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"} {
		if v := t.Env[name]; v != "" && v != "http/protobuf" {
			p.fail(name, "must be http/protobuf (the only OTLP protocol built in), got %q", v)
		}
	}
	if v := t.Env["OTEL_TRACES_EXPORTER"]; v != "" && v != "otlp" && v != "none" {
		p.fail("OTEL_TRACES_EXPORTER", "must be otlp or none, got %q", v)
	}
	switch s := t.Env["OTEL_TRACES_SAMPLER"]; s {
	case "", "always_on", "always_off", "parentbased_always_on", "parentbased_always_off":
	case "traceidratio", "parentbased_traceidratio":
		if arg, ok := t.Env["OTEL_TRACES_SAMPLER_ARG"]; ok {
			if f, err := strconv.ParseFloat(arg, 64); err != nil || f < 0 || f > 1 {
				p.fail("OTEL_TRACES_SAMPLER_ARG", "must be a number between 0 and 1, got %q", arg)
			}
		}
	default:
		p.fail("OTEL_TRACES_SAMPLER", "must be one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio; got %q", s)
	}
	if v := t.Env["OTEL_SDK_DISABLED"]; v != "" {
		t.Env["OTEL_SDK_DISABLED"] = strings.ToLower(v)
	}
	return t
}
