package collector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// record is one element of a batch's logs as the collector reads it: the
// wire names of accesslog.Record, plus fields that newer proxies send
// (suppressed). The collector decodes records itself, one at a time, so
// that a record of the wrong shape is rejected alone, and so that its
// schema follows the JSON on the wire, not the proxy's Go type.
type record struct {
	Timestamp    json.RawMessage `json:"timestamp"` // parsed by validate, which names the problem
	TokenID      string          `json:"token_id"`
	UserID       string          `json:"user_id"`
	TokenType    string          `json:"token_type"`
	Region       string          `json:"region"`
	ProbeNode    string          `json:"probe_node"`
	ClientIP     string          `json:"client_ip"`
	Protocol     string          `json:"protocol"`
	Method       string          `json:"method"`
	TargetURL    string          `json:"target_url"`
	StatusCode   int64           `json:"status_code"`
	RequestSize  int64           `json:"request_size"`
	ResponseSize int64           `json:"response_size"`
	DurationMS   int64           `json:"duration_ms"`
	Success      bool            `json:"success"`
	RateLimited  bool            `json:"rate_limited"`
	Error        string          `json:"error"`
	// Suppressed counts further credential-less refusals from the same
	// client IP that this record stands for (absent: 0).
	Suppressed int64 `json:"suppressed"`
	timingFields
	udpFields
}

// row is a valid record, ready for COPY: typed fields rather than a
// []any, so that neither decoding nor encoding boxes a value (an
// allocation each, 25 a record). appendTo writes it in storedColumns order.
type row struct {
	ts                                    time.Time
	tokenID, userID, tokenType, region    string
	probeNode, clientIP, protocol, method string
	targetURL, errText                    string
	statusCode, requestSize, responseSize int64
	durationMS, suppressed                int64
	success, rateLimited                  bool
	requestID, upstreamAddr, closeReason  optString
	dnsMS, connectMS, tlsMS, ttfbMS       optFloat
	// CONNECT-UDP flows' counts (udp.go).
	datagramsUp, datagramsDown, datagramsDropped optInt
}

// optString and optFloat are the nullable timing columns: ok false is NULL.
type optString struct {
	s  string
	ok bool
}

type optFloat struct {
	f  float64
	ok bool
}

func optStr(p *string) optString {
	if p == nil {
		return optString{}
	}
	return optString{*p, true}
}

func optF(p *float64) optFloat {
	if p == nil {
		return optFloat{}
	}
	return optFloat{*p, true}
}

// values is the row in storedColumns order (after batch_id), for pgx's
// CopyFrom: the path of a table whose types the binary plan does not know.
func (r *row) values() []any {
	opt := func(o optString) any {
		if !o.ok {
			return nil
		}
		return o.s
	}
	optf := func(o optFloat) any {
		if !o.ok {
			return nil
		}
		return o.f
	}
	return []any{r.ts, r.tokenID, r.userID, r.tokenType, r.region, r.probeNode, r.clientIP, r.protocol, r.method,
		r.targetURL, r.statusCode, r.requestSize, r.responseSize, r.durationMS, r.success, r.rateLimited, r.errText,
		r.suppressed, opt(r.requestID), optf(r.dnsMS), optf(r.connectMS), optf(r.tlsMS), optf(r.ttfbMS),
		opt(r.upstreamAddr), opt(r.closeReason), r.datagramsUp.value(), r.datagramsDown.value(), r.datagramsDropped.value()}
}

// columnLimits is what the columns of forward_proxy_request_logs can hold,
// read from the database rather than assumed: a table upgraded from an
// older backend may have narrower columns than the ones Migrate creates,
// and Migrate never changes an existing column.
type columnLimits struct {
	maxChars map[string]int   // VARCHAR(n) and CHAR(n) columns: n characters
	maxInt   map[string]int64 // SMALLINT, INTEGER and BIGINT columns: their largest value
	// fields are the same limits for onePass's rows (onepass.go).
	fields fieldLimits
}

// loadLimits reads the column types of forward_proxy_request_logs.
func loadLimits(ctx context.Context, pool *pgxpool.Pool) (*columnLimits, error) {
	rows, err := pool.Query(ctx, `SELECT column_name, data_type, coalesce(character_maximum_length, 0)
		FROM information_schema.columns
		WHERE table_schema = current_schema() AND table_name = 'forward_proxy_request_logs'`)
	if err != nil {
		return nil, fmt.Errorf("reading the columns of forward_proxy_request_logs: %w", err)
	}
	l := &columnLimits{maxChars: map[string]int{}, maxInt: map[string]int64{}}
	var name, typ string
	var chars int
	_, err = pgx.ForEachRow(rows, []any{&name, &typ, &chars}, func() error {
		switch typ {
		case "character varying", "character":
			if chars > 0 {
				l.maxChars[name] = chars
			}
		case "smallint":
			l.maxInt[name] = math.MaxInt16
		case "integer":
			l.maxInt[name] = math.MaxInt32
		case "bigint":
			l.maxInt[name] = math.MaxInt64
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading the columns of forward_proxy_request_logs: %w", err)
	}
	if len(l.maxInt) == 0 {
		return nil, errors.New("table forward_proxy_request_logs not found (has Migrate run?)")
	}
	l.fields = newFieldLimits(l)
	return l, nil
}

// validate decodes one record and checks it against every rule a record
// must pass to be stored. It returns the row to store, or every rule the
// record breaks; nothing that passes can make the COPY fail, so one bad
// record never costs the others of its batch.
func (l *columnLimits) validate(raw json.RawMessage) (row, []string) {
	var r record
	if err := json.Unmarshal(raw, &r); err != nil {
		return row{}, []string{decodeReason(err)}
	}
	var why []string
	rule := func(ok bool, format string, args ...any) {
		if !ok {
			why = append(why, fmt.Sprintf(format, args...))
		}
	}

	// The record as a whole. encoding/json would store invalid UTF-8 as
	// U+FFFD without a word; refusing keeps the loss visible.
	rule(utf8.Valid(raw), "record contains invalid UTF-8")

	// timestamp: required, RFC 3339, TIMESTAMPTZ.
	var ts time.Time
	tsErr := ts.UnmarshalJSON(r.Timestamp) // null leaves ts zero
	switch {
	case len(r.Timestamp) == 0 || string(r.Timestamp) == "null":
		rule(false, "timestamp is missing")
	case tsErr != nil:
		rule(false, "timestamp is not an RFC 3339 time")
	default:
		rule(!ts.IsZero(), "timestamp is the zero time")
	}

	// Text columns: PostgreSQL text cannot hold NUL; VARCHAR(n) holds n
	// characters (token_id is VARCHAR(auth.MaxIDLen) unless an older table
	// says otherwise).
	for _, f := range []struct{ column, v string }{
		{"token_id", r.TokenID},
		{"user_id", r.UserID},
		{"token_type", r.TokenType},
		{"region", r.Region},
		{"probe_node", r.ProbeNode},
		{"client_ip", r.ClientIP},
		{"protocol", r.Protocol},
		{"method", r.Method},
		{"target_url", r.TargetURL},
		{"error", r.Error},
	} {
		rule(strings.IndexByte(f.v, 0) < 0, "%s contains a NUL character", f.column)
		if limit, ok := l.maxChars[f.column]; ok {
			n := utf8.RuneCountInString(f.v)
			rule(n <= limit, "%s is %d characters, at most %d", f.column, n, limit)
		}
	}

	// Integer columns: none is negative; status_code is an HTTP status
	// (or 0); none exceeds what its column holds.
	for _, f := range []struct {
		column string
		v, max int64
	}{
		{"status_code", r.StatusCode, 999},
		{"request_size", r.RequestSize, math.MaxInt64},
		{"response_size", r.ResponseSize, math.MaxInt64},
		{"duration_ms", r.DurationMS, math.MaxInt64},
		{"suppressed", r.Suppressed, math.MaxInt64},
	} {
		if col, ok := l.maxInt[f.column]; ok {
			f.max = min(f.max, col)
		}
		rule(f.v >= 0, "%s is negative", f.column)
		rule(f.v <= f.max, "%s %d is above %d", f.column, f.v, f.max)
	}

	r.timingFields.check(l, rule)
	r.udpFields.check(l, rule)

	if len(why) > 0 {
		return row{}, why
	}
	t := &r.timingFields
	return row{ts: ts, tokenID: r.TokenID, userID: r.UserID, tokenType: r.TokenType, region: r.Region,
		probeNode: r.ProbeNode, clientIP: r.ClientIP, protocol: r.Protocol, method: r.Method, targetURL: r.TargetURL,
		errText: r.Error, statusCode: r.StatusCode, requestSize: r.RequestSize, responseSize: r.ResponseSize,
		durationMS: r.DurationMS, suppressed: r.Suppressed, success: r.Success, rateLimited: r.RateLimited,
		requestID: optStr(t.RequestID), upstreamAddr: optStr(t.UpstreamAddr), closeReason: optStr(t.CloseReason),
		dnsMS: optF(t.DNSMS), connectMS: optF(t.ConnectMS), tlsMS: optF(t.TLSMS), ttfbMS: optF(t.TTFBMS),
		datagramsUp: optI(r.DatagramsUp), datagramsDown: optI(r.DatagramsDown), datagramsDropped: optI(r.DatagramsDropped)}, nil
}

// decodeReason says why a record did not decode into record.
func decodeReason(err error) string {
	if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
		if te.Field == "" {
			return "record is not a JSON object, got " + te.Value
		}
		return fmt.Sprintf("%s must be %s, got %s", te.Field, jsonType(te.Type.Kind().String()), te.Value)
	}
	return "record does not decode: " + printable(err.Error())
}

// jsonType names the JSON type a Go kind is decoded from.
func jsonType(kind string) string {
	switch kind {
	case "int64":
		return "an integer"
	case "bool":
		return "true or false"
	case "float64":
		return "a number"
	case "string":
		return "a string"
	}
	return kind
}

// printable makes text fit a TEXT column: reasons are stored next to the
// record they reject.
func printable(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
}
