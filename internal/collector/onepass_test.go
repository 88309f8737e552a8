package collector

import (
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// tableLimits are the limits loadLimits reads from a table Migrate
// created (token_id VARCHAR(50), status_code and suppressed INTEGER).
func tableLimits() *columnLimits {
	l := &columnLimits{
		maxChars: map[string]int{"token_id": 50},
		maxInt: map[string]int64{"status_code": math.MaxInt32, "request_size": math.MaxInt64,
			"response_size": math.MaxInt64, "duration_ms": math.MaxInt64, "suppressed": math.MaxInt32},
	}
	l.fields = newFieldLimits(l)
	return l
}

// sorted is what the collector makes of a body: the error that refuses it,
// or its stored rows and rejected records.
type sorted struct {
	err  string
	id   uuid.UUID
	node string
	reg  string
	n    int
	good []row
	bad  []rejected
}

// bothWays reads body with parseBatch (the one-pass path) and with
// decodeEnvelope and validate alone (the reference), and fails unless
// both say exactly the same. It returns how many records the one pass read
// cleanly and found valid.
func bothWays(t testing.TB, body []byte, window func(time.Time) string) (fast int) {
	t.Helper()
	lim := tableLimits()
	run := func(parse func([]byte) (*batch, error)) sorted {
		b, err := parse(body)
		if err != nil {
			return sorted{err: err.Error()}
		}
		if b.rows != nil {
			for i := range b.rows {
				if b.clean[i] && lim.fields.valid(&b.rows[i]) {
					fast++
				}
			}
		}
		s := sorted{id: b.id, node: b.probeNode, reg: b.region, n: len(b.logs)}
		s.good, s.bad = b.sort(lim, window)
		if len(s.good) == 0 {
			s.good = nil
		}
		return s
	}
	got := run(parseBatch)
	fastSeen := fast
	want := run(decodeEnvelope)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("body %q:\none pass  %+v\nreference %+v", body, got, want)
	}
	return fastSeen
}

func batchBody(records ...string) []byte {
	return []byte(`{"batch_id":"` + uuid.NewString() + `","probe_node":"node-1","region":"eu-west","logs":[` +
		strings.Join(records, ",") + `]}`)
}

// A batch of valid records, timings and all, is read in the one pass,
// every record of it, and stored exactly as the reference path stores it.
func TestOnePassReadsValidBatch(t *testing.T) {
	b := sampleBatch(100)
	for i := range b.Logs {
		r := &b.Logs[i]
		r.Suppressed = int64(i)
		if i%3 == 0 {
			r.RequestID = "req-" + r.TokenID
			r.UpstreamAddr = "[2001:db8::1]:443"
			r.CloseReason = "client closed"
			r.DNSMS = accesslog.MillisOf(1500 * time.Microsecond)
			r.TTFBMS = accesslog.MillisOf(0)
		}
		if i%5 == 0 { // a CONNECT-UDP flow's counts, 0 included
			up, down, dropped := int64(i), int64(0), int64(i%2)
			r.DatagramsUp, r.DatagramsDown, r.DatagramsDropped = &up, &down, &dropped
		}
	}
	body := mustJSON(b)
	if n := bothWays(t, body, nil); n != 100 {
		t.Errorf("%d of 100 records read in the one pass", n)
	}
	// Whitespace everywhere JSON allows it changes nothing.
	var v any
	json.Unmarshal(body, &v)
	indented, _ := json.MarshalIndent(v, " ", "\t")
	if n := bothWays(t, indented, nil); n != 100 {
		t.Errorf("indented: %d of 100 records read in the one pass", n)
	}
}

// One bad record in a batch: the others are still read in the one pass,
// and the bad one is rejected with the reference path's reason, position
// and bytes.
func TestOnePassOneBadRecord(t *testing.T) {
	good := recordJSON(nil)
	for _, bad := range onePassRecords() {
		records := []string{good, good, bad, good}
		fast := bothWays(t, batchBody(records...), nil)
		// Invalid UTF-8 (raw, or a lone surrogate escape) is the one thing
		// that sends the whole body to the reference path.
		wholeBody := strings.Contains(bad, "\xff") || strings.Contains(bad, `\ud800`)
		if fast < 3 && !wholeBody {
			t.Errorf("record %s: %d records read in the one pass, want the 3 good ones at least", bad, fast)
		}
	}
	// The window rejects a valid record with the reference path's reason.
	window := func(ts time.Time) string {
		if ts.Year() < 2026 {
			return "too old"
		}
		return ""
	}
	old := recordJSON(map[string]any{"timestamp": "2025-01-01T00:00:00Z"})
	bothWays(t, batchBody(recordJSON(map[string]any{"timestamp": "2026-01-01T00:00:00Z"}), old), window)
}

// onePassRecords are records the one pass must read exactly as the
// reference does: valid ones, each rule broken, and every JSON shape it
// hands over to the reference.
func onePassRecords() []string {
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	edits := []map[string]any{
		nil,
		{"token_id": strings.Repeat("é", 50)},
		{"token_id": strings.Repeat("é", 51)},
		{"token_id": strings.Repeat("t", 51)},
		{"from_the_future": 1},
		{"from_the_future": map[string]any{"nested": []any{1, "x", nil}}},
		{"status_code": "200"},
		{"status_code": raw("null")},
		{"status_code": raw("-0")},
		{"status_code": raw("2e2")},
		{"status_code": raw("200.0")},
		{"duration_ms": 1.5},
		{"request_size": raw("1e30")},
		{"request_size": raw("99999999999999999999")},
		{"success": "yes"},
		{"success": raw("null")},
		{"timestamp": nil},
		{"timestamp": raw("null")},
		{"timestamp": "yesterday"},
		{"timestamp": 1700000000},
		{"timestamp": "0001-01-01T00:00:00Z"},
		{"timestamp": "2025-03-04T05:06:07.123456789+02:00"},
		{"timestamp": raw(`"2025-03-04T05:06:07\u002e5Z"`)},
		{"target_url": "a\x00b"},
		{"user_id": "\x00"},
		{"user_id": raw(`"\ud800"`)},
		{"user_id": raw(`"caf\u00e9 \"quoted\" \\ /"`)},
		{"user_id": raw("null")},
		{"user_id": 5},
		{"response_size": -1},
		{"status_code": 1000},
		{"status_code": -1},
		{"suppressed": -1},
		{"suppressed": int64(1) << 31},
		{"token_id": strings.Repeat("t", 51), "method": "G\x00T", "request_size": -1},
		{"dns_ms": nil, "ttfb_ms": raw("null")},
		{"connect_ms": -0.5},
		{"connect_ms": raw("-0")},
		{"ttfb_ms": "fast"},
		{"tls_ms": 1e15},
		{"tls_ms": raw("1e400")},
		{"request_id": "a\x00b"},
		{"request_id": 7},
		{"close_reason": raw("null")},
		{"upstream_addr": "10.0.0.1:443"},
		{"datagrams_up": 3, "datagrams_down": 0, "datagrams_dropped": 1},
		{"datagrams_up": raw("null")},
		{"datagrams_down": -1},
		{"datagrams_dropped": 1.5},
		{"datagrams_up": "3"},
		{"datagrams_down": raw("1e3")},
		{"Datagrams_Up": 4},
		{"Token_ID": "upper"},
		{"TOKEN-ID": "dashes"},
		{"tokenid": "no underscore"},
		{"token\\u005fid": "escaped"},
		{"ﬀ": "non-ASCII name"},
	}
	var out []string
	for _, e := range edits {
		out = append(out, recordJSON(e))
	}
	// Names with escapes, which recordJSON would quote again.
	out = append(out, strings.Replace(recordJSON(nil), `"token_id"`, `"token\u005fid"`, 1),
		strings.Replace(recordJSON(nil), `"method"`, `"Method"`, 1),
		`5`, `"x"`, `null`, `[]`, `{}`, `true`, `{"timestamp":"2025-03-04T05:06:07Z"}`,
		strings.Replace(recordJSON(nil), `"user-ü"`, "\"user-\xff\"", 1))
	return out
}

// Bodies that are not batches, or unusual ones, get the reference path's
// answer word for word.
func TestOnePassEnvelopes(t *testing.T) {
	id := uuid.NewString()
	good := recordJSON(nil)
	for _, body := range []string{
		``, `{"batch_id":`, `[]`, `null`, `{}`,
		`{"probe_node":"n","logs":[]}`,
		`{"batch_id":"b-1","logs":[]}`,
		`{"batch_id":"","logs":[]}`,
		`{"batch_id":null,"logs":[]}`,
		`{"batch_id":"` + id + `"}`,
		`{"batch_id":"` + id + `","logs":null}`,
		`{"batch_id":"` + id + `","logs":{}}`,
		`{"batch_id":"` + id + `","logs":[]}`,
		`{"batch_id":"` + id + `","probe_node":5,"logs":[]}`,
		`{"batch_id":"` + id + `","probe_node":null,"logs":[]}`,
		`{"batch_id":"` + id + `","probe_node":"n\u0000","logs":[]}`,
		`{"batch_id":"` + id + `","region":"r\u0000","logs":[]}`,
		`{"batch_id":"` + id + `","Batch_ID":"` + uuid.NewString() + `","logs":[]}`,
		`{"batch_id":"` + id + `","batch_id":"` + uuid.NewString() + `","logs":[]}`,
		`{"batch_id":"` + id + `","logs":[` + good + `],"logs":[]}`,
		`{"batch_id":"` + id + `","LOGS":[` + good + `]}`,
		`{"batch_id":"` + strings.ToUpper(id) + `","logs":[` + good + `]}`,
		`{"batch_id":"urn:uuid:` + id + `","logs":[` + good + `]}`,
		`{"batch_id":"` + id + `","extra":{"a":[1,2,{"b":null}]},"logs":[` + good + `]}`,
		`{"batch_id":"` + id + `","logs":[` + good + `]} `,
		`{"batch_id":"` + id + `","logs":[` + good + `]} {}`,
		`{"batch_id":"` + id + `","logs":[` + good + `]}x`,
		`{"batch_id":"` + id + `","logs":[` + good + `,]}`,
		`{"batch_id":"` + id + `","logs":[` + good + `}`,
		"{\"batch_id\":\"" + id + "\",\"probe_node\":\"\xff\",\"logs\":[]}",
		`{"batch_id":"` + id + `","logs":[` + strings.Replace(good, `"method"`, `"method":"X","method"`, 1) + `]}`,
	} {
		bothWays(t, []byte(body), nil)
	}
}

// FuzzOnePass: for any body, the one pass and the reference agree.
func FuzzOnePass(f *testing.F) {
	f.Add(mustJSON(sampleBatch(3)))
	for _, r := range onePassRecords() {
		f.Add(batchBody(r, recordJSON(nil)))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		bothWays(t, body, nil)
	})
}

// readBody reads a body of its Content-Length in one go; a shorter one is
// an error, as io.ReadAll's on a cut request; an unknown or large length
// reads what comes.
func TestReadBody(t *testing.T) {
	for _, tc := range []struct {
		body string
		size int64
		err  bool
	}{
		{"abc", 3, false},
		{"", 0, false},
		{"abc", -1, false},
		{"abc", preallocBody + 1, false},
		{"abc", 5, true},
	} {
		got, err := readBody(strings.NewReader(tc.body), tc.size)
		if (err != nil) != tc.err || (err == nil && string(got) != tc.body) {
			t.Errorf("readBody(%q, %d) = %q, %v", tc.body, tc.size, got, err)
		}
		if err != nil && !strings.Contains(err.Error(), "unexpected EOF") {
			t.Errorf("readBody(%q, %d): error %v, want unexpected EOF", tc.body, tc.size, err)
		}
	}
}
