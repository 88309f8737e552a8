// Package accesslog builds one record per proxied request or tunnel, writes
// it as a JSON log line, and ships batches of records to the backend without
// ever blocking the request path or losing a record silently.
package accesslog

import (
	"math"
	"strconv"
	"time"
)

// Record is one request or tunnel, with exactly the fields of SPEC §5.
// Field names are the wire names the backend stores.
type Record struct {
	Timestamp    time.Time `json:"timestamp"` // UTC, when the request started
	TokenID      string    `json:"token_id"`
	UserID       string    `json:"user_id"`
	TokenType    string    `json:"token_type"`
	Region       string    `json:"region"`
	ProbeNode    string    `json:"probe_node"`
	ClientIP     string    `json:"client_ip"`
	Protocol     string    `json:"protocol"` // "HTTP/1.1" or "HTTP/2"
	Method       string    `json:"method"`
	TargetURL    string    `json:"target_url"` // CONNECT: host:port
	StatusCode   int       `json:"status_code"`
	RequestSize  int64     `json:"request_size"`  // bytes client → origin
	ResponseSize int64     `json:"response_size"` // bytes origin → client
	DurationMS   int64     `json:"duration_ms"`
	Success      bool      `json:"success"`
	RateLimited  bool      `json:"rate_limited"`
	Error        string    `json:"error"` // short code, empty on success
	// Suppressed counts the refusals without valid credentials from the
	// same client address that were not written since the last record of
	// that address (UNAUTHENTICATED_RECORDS_PER_MINUTE): this record
	// stands for them too. Zero, and absent from the JSON, otherwise. Not
	// part of SPEC §5's list; older collectors ignore it.
	Suppressed int64 `json:"suppressed,omitempty"`

	// Where the time went (docs/RECORDS.md, "Timings"). Not part of SPEC
	// §5's list; absent when they do not apply, and older collectors
	// ignore them.
	RequestID    string `json:"request_id,omitempty"`    // also sent to the client (RequestIDHeader)
	DNSMS        Millis `json:"dns_ms,omitzero"`         // resolving the origin's name; 0: from the cache
	ConnectMS    Millis `json:"connect_ms,omitzero"`     // TCP connect, every address tried
	TLSMS        Millis `json:"tls_ms,omitzero"`         // TLS handshake Pinaka did with the origin
	TTFBMS       Millis `json:"ttfb_ms,omitzero"`        // from the request's start to the origin's first byte
	UpstreamAddr string `json:"upstream_addr,omitempty"` // IP:port connected to (or last tried)
	CloseReason  string `json:"close_reason,omitempty"`  // tunnels: who or what ended it

	// CONNECT-UDP flows (RFC 9298) only, and then always present (0 is a
	// count): UDP datagrams relayed client → target and target → client,
	// and datagrams dropped either way (docs/RECORDS.md, "UDP flows").
	// request_size and response_size are the flow's UDP payload bytes.
	DatagramsUp      *int64 `json:"datagrams_up,omitempty"`
	DatagramsDown    *int64 `json:"datagrams_down,omitempty"`
	DatagramsDropped *int64 `json:"datagrams_dropped,omitempty"`
}

// RequestIDHeader is the response header that gives the client the
// record's request_id, on every answer of the proxy.
const RequestIDHeader = "Pinaka-Request-Id"

// Millis is a duration in a record: JSON milliseconds with microsecond
// resolution (12.345), so that loopback and LAN timings, fractions of a
// millisecond, are not all 0. The zero Millis is "not measured" and is
// left out of the JSON (omitzero); a measured 0 is written as 0.
type Millis struct {
	// v is the duration plus one nanosecond, 0 when not measured: one
	// word instead of a duration and a flag, since a tunnel's record lives
	// as long as the tunnel (measured durations are never negative and
	// are truncated to the microsecond, so the nanosecond is free).
	v time.Duration
}

// MillisOf is d as a measured Millis, truncated to the microsecond.
func MillisOf(d time.Duration) Millis {
	return Millis{v: max(d, 0).Truncate(time.Microsecond) + 1}
}

// IsZero reports whether m was not measured.
func (m Millis) IsZero() bool { return m.v == 0 }

// Duration returns the duration and whether it was measured.
func (m Millis) Duration() (time.Duration, bool) {
	if m.v == 0 {
		return 0, false
	}
	return m.v - 1, true
}

// Float is m in milliseconds (0 when not measured).
func (m Millis) Float() float64 {
	d, _ := m.Duration()
	return float64(d.Microseconds()) / 1000
}

// MarshalJSON writes milliseconds with up to three decimals.
func (m Millis) MarshalJSON() ([]byte, error) {
	if m.IsZero() {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, m.Float(), 'f', -1, 64), nil
}

// UnmarshalJSON reads milliseconds; null leaves m unmeasured.
func (m *Millis) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*m = Millis{}
		return nil
	}
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		return err
	}
	*m = MillisOf(time.Duration(math.Round(f*1000)) * time.Microsecond)
	return nil
}
