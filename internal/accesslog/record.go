// Package accesslog builds one record per proxied request or tunnel, writes
// it as a JSON log line, and ships batches of records to the backend without
// ever blocking the request path or losing a record silently.
package accesslog

import "time"

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
}
