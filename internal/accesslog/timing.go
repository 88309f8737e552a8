package accesslog

import "log/slog"

// appendTimingAttrs adds the request id, timing and UDP flow fields that
// are set, as the wire format does (omitempty, omitzero).
func appendTimingAttrs(attrs []slog.Attr, r *Record) []slog.Attr {
	if r.RequestID != "" {
		attrs = append(attrs, slog.String("request_id", r.RequestID))
	}
	for _, f := range []struct {
		name string
		v    Millis
	}{{"dns_ms", r.DNSMS}, {"connect_ms", r.ConnectMS}, {"tls_ms", r.TLSMS}, {"ttfb_ms", r.TTFBMS}} {
		if !f.v.IsZero() {
			attrs = append(attrs, slog.Float64(f.name, f.v.Float()))
		}
	}
	if r.UpstreamAddr != "" {
		attrs = append(attrs, slog.String("upstream_addr", r.UpstreamAddr))
	}
	if r.CloseReason != "" {
		attrs = append(attrs, slog.String("close_reason", r.CloseReason))
	}
	for _, f := range []struct {
		name string
		v    *int64
	}{{"datagrams_up", r.DatagramsUp}, {"datagrams_down", r.DatagramsDown}, {"datagrams_dropped", r.DatagramsDropped}} {
		if f.v != nil {
			attrs = append(attrs, slog.Int64(f.name, *f.v))
		}
	}
	return attrs
}
