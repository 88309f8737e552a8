package collector

import (
	"bytes"
	"encoding/json"
	"encoding/json/jsontext"
	"io"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// The one-pass decode. decode used to read a body twice: once as a whole
// into raw records, then each record on its own with encoding/json, so
// that a bad record is rejected alone. That was about 45 % of the
// collector's CPU. parseBatch now walks the body once with jsontext,
// reading each record's fields into a row as it goes and noting where the
// record's bytes are. Anything it is not sure it reads exactly as
// encoding/json does (a field of another type, null where a value should
// be, a name that differs from a field's only in case, an escape in a
// name, invalid UTF-8, a duplicate name, …) sends that record, or the
// whole body, down the old path: decodeEnvelope and validate, which stay
// the reference for every answer and every reason.

// recordFields are the names record decodes, and envelopeFields those of
// the batch: an unknown name that encoding/json could still match to one
// of them (it matches names case-insensitively) is left to it.
var (
	recordFields   = foldedNames(storedColumns()[1:]...) // the columns after id, named as on the wire
	envelopeFields = foldedNames("batch_id", "probe_node", "region", "logs")
)

func foldedNames(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[fold([]byte(`"`+n+`"`))] = true
	}
	return m
}

// fold is a quoted ASCII name lower-cased, without '_' and '-' (the
// widest matching any encoding/json version applies).
func fold(quoted []byte) string {
	var b strings.Builder
	for _, c := range quoted[1 : len(quoted)-1] {
		switch {
		case c == '_' || c == '-':
		case 'A' <= c && c <= 'Z':
			b.WriteByte(c + 'a' - 'A')
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// mayMatch says whether encoding/json might decode the member named quoted
// (raw, with its quotes) into one of known's fields.
func mayMatch(quoted []byte, known map[string]bool) bool {
	for _, c := range quoted {
		if c == '\\' || c >= utf8.RuneSelf {
			return true
		}
	}
	return known[fold(quoted)]
}

// decoders recycles the decoders' state; emptyBody is what they hold
// between uses (Reset needs a reader), so that they keep no body alive.
var (
	decoders  = sync.Pool{New: func() any { return jsontext.NewDecoder(emptyBody) }}
	emptyBody = bytes.NewReader(nil)
)

// parseBatch reads a body that is a batch: in one pass when it can, else
// as decodeEnvelope does (whose errors are the answers).
func parseBatch(data []byte) (*batch, error) {
	if b, ok := onePass(data); ok {
		return b, nil
	}
	return decodeEnvelope(data)
}

// onePass is parseBatch's single pass; false means "let decodeEnvelope
// read it", for an invalid body and for anything unusual.
func onePass(data []byte) (*batch, bool) {
	dec := decoders.Get().(*jsontext.Decoder)
	// A *bytes.Buffer is parsed in place, without copying: values are
	// slices of data, and offsets are data's.
	dec.Reset(bytes.NewBuffer(data))
	defer func() {
		dec.Reset(emptyBody)
		decoders.Put(dec)
	}()
	var b batch
	var id string
	var haveID, haveLogs bool
	if t, err := dec.ReadToken(); err != nil || t.Kind() != '{' {
		return nil, false
	}
	for dec.PeekKind() != '}' {
		name, err := dec.ReadValue()
		if err != nil {
			return nil, false
		}
		switch string(name) {
		case `"batch_id"`:
			id, haveID = readString(dec)
			if !haveID {
				return nil, false
			}
		case `"probe_node"`, `"region"`:
			s, ok := readString(dec)
			if !ok {
				return nil, false
			}
			if name[1] == 'p' {
				b.probeNode = s
			} else {
				b.region = s
			}
		case `"logs"`:
			if !b.readLogs(dec, data) {
				return nil, false
			}
			haveLogs = true
		default:
			if mayMatch(name, envelopeFields) || dec.SkipValue() != nil {
				return nil, false
			}
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, false
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return nil, false // something after the object
	}
	if !haveID || !haveLogs || strings.IndexByte(b.probeNode, 0) >= 0 || strings.IndexByte(b.region, 0) >= 0 {
		return nil, false
	}
	u, err := uuid.Parse(id)
	if err != nil || id == "" {
		return nil, false
	}
	b.id = u
	return &b, true
}

// readLogs reads the logs array: each record's bytes into b.logs (slices
// of data), and its fields into b.rows, with b.clean saying which of them
// were read without a doubt.
func (b *batch) readLogs(dec *jsontext.Decoder, data []byte) bool {
	if dec.PeekKind() != '[' {
		return false
	}
	if _, err := dec.ReadToken(); err != nil {
		return false
	}
	b.logs, b.rows, b.clean = []json.RawMessage{}, nil, nil
	for dec.PeekKind() != ']' {
		if dec.PeekKind() != '{' {
			v, err := dec.ReadValue()
			if err != nil {
				return false
			}
			end := int(dec.InputOffset())
			b.logs = append(b.logs, data[end-len(v):end])
			b.rows, b.clean = append(b.rows, row{}), append(b.clean, false)
			continue
		}
		if _, err := dec.ReadToken(); err != nil {
			return false
		}
		start := int(dec.InputOffset()) - 1 // the '{'
		var r row
		clean, sawTS := true, false
		for dec.PeekKind() != '}' {
			name, err := dec.ReadValue()
			if err != nil {
				return false
			}
			if !clean {
				if dec.SkipValue() != nil {
					return false
				}
				continue
			}
			v, err := dec.ReadValue()
			if err != nil {
				return false
			}
			if string(name) == `"timestamp"` {
				sawTS = true
			}
			clean = r.set(name, v)
		}
		if _, err := dec.ReadToken(); err != nil {
			return false
		}
		b.logs = append(b.logs, data[start:dec.InputOffset()])
		b.rows, b.clean = append(b.rows, r), append(b.clean, clean && sawTS)
	}
	_, err := dec.ReadToken()
	return err == nil
}

// readString reads a string value; false for any other kind.
func readString(dec *jsontext.Decoder) (string, bool) {
	if dec.PeekKind() != '"' {
		return "", false
	}
	v, err := dec.ReadValue()
	if err != nil {
		return "", false
	}
	return unquote(v)
}

// unquote is the string a JSON string value v holds (the decoder has
// checked its syntax and UTF-8).
func unquote(v []byte) (string, bool) {
	if len(v) < 2 || v[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(v, '\\') < 0 {
		return string(v[1 : len(v)-1]), true
	}
	s, err := jsontext.AppendUnquote(nil, v)
	return string(s), err == nil
}

// set stores the member name: v into r, as encoding/json would decode it
// into record. False when it cannot be sure of that (the record then goes
// through validate).
func (r *row) set(name, v []byte) bool {
	str := func(dst *string) bool {
		s, ok := unquote(v)
		*dst = s
		return ok
	}
	num := func(dst *int64) bool {
		if len(v) == 0 || (v[0] != '-' && (v[0] < '0' || v[0] > '9')) {
			return false
		}
		n, err := strconv.ParseInt(string(v), 10, 64)
		*dst = n
		return err == nil
	}
	flag := func(dst *bool) bool {
		switch string(v) {
		case "true":
			*dst = true
		case "false":
			*dst = false
		default:
			return false
		}
		return true
	}
	optS := func(dst *optString) bool {
		if string(v) == "null" {
			*dst = optString{}
			return true
		}
		s, ok := unquote(v)
		*dst = optString{s, true}
		return ok
	}
	optNum := func(dst *optFloat) bool {
		if string(v) == "null" {
			*dst = optFloat{}
			return true
		}
		if len(v) == 0 || (v[0] != '-' && (v[0] < '0' || v[0] > '9')) {
			return false
		}
		f, err := strconv.ParseFloat(string(v), 64)
		*dst = optFloat{f, true}
		return err == nil
	}
	optInteger := func(dst *optInt) bool {
		if string(v) == "null" {
			*dst = optInt{}
			return true
		}
		var n int64
		ok := num(&n)
		*dst = optInt{n, true}
		return ok
	}
	switch string(name) {
	case `"timestamp"`:
		// Exactly validate's parse; null, another kind or the zero time is
		// validate's to explain.
		if len(v) == 0 || v[0] != '"' {
			return false
		}
		var ts time.Time
		if err := ts.UnmarshalJSON(v); err != nil || ts.IsZero() {
			return false
		}
		r.ts = ts
		return true
	case `"token_id"`:
		return str(&r.tokenID)
	case `"user_id"`:
		return str(&r.userID)
	case `"token_type"`:
		return str(&r.tokenType)
	case `"region"`:
		return str(&r.region)
	case `"probe_node"`:
		return str(&r.probeNode)
	case `"client_ip"`:
		return str(&r.clientIP)
	case `"protocol"`:
		return str(&r.protocol)
	case `"method"`:
		return str(&r.method)
	case `"target_url"`:
		return str(&r.targetURL)
	case `"error"`:
		return str(&r.errText)
	case `"status_code"`:
		return num(&r.statusCode)
	case `"request_size"`:
		return num(&r.requestSize)
	case `"response_size"`:
		return num(&r.responseSize)
	case `"duration_ms"`:
		return num(&r.durationMS)
	case `"suppressed"`:
		return num(&r.suppressed)
	case `"success"`:
		return flag(&r.success)
	case `"rate_limited"`:
		return flag(&r.rateLimited)
	case `"request_id"`:
		return optS(&r.requestID)
	case `"upstream_addr"`:
		return optS(&r.upstreamAddr)
	case `"close_reason"`:
		return optS(&r.closeReason)
	case `"dns_ms"`:
		return optNum(&r.dnsMS)
	case `"connect_ms"`:
		return optNum(&r.connectMS)
	case `"tls_ms"`:
		return optNum(&r.tlsMS)
	case `"ttfb_ms"`:
		return optNum(&r.ttfbMS)
	case `"datagrams_up"`:
		return optInteger(&r.datagramsUp)
	case `"datagrams_down"`:
		return optInteger(&r.datagramsDown)
	case `"datagrams_dropped"`:
		return optInteger(&r.datagramsDropped)
	}
	return !mayMatch(name, recordFields)
}

// fieldLimits are columnLimits as arrays in row order, so that checking a
// row costs no map look-ups; 0 is "no limit" for text.
type fieldLimits struct {
	text   [10]int  // tokenID … targetURL, errText
	timing [3]int   // requestID, upstreamAddr, closeReason
	ints   [5]int64 // statusCode, requestSize, responseSize, durationMS, suppressed
	udp    [3]int64 // datagramsUp, datagramsDown, datagramsDropped
}

func newFieldLimits(l *columnLimits) fieldLimits {
	var f fieldLimits
	for i, c := range []string{"token_id", "user_id", "token_type", "region", "probe_node", "client_ip", "protocol",
		"method", "target_url", "error"} {
		f.text[i] = l.maxChars[c]
	}
	for i, c := range []string{"request_id", "upstream_addr", "close_reason"} {
		f.timing[i] = l.maxChars[c]
	}
	for i, c := range []struct {
		column string
		max    int64
	}{{"status_code", 999}, {"request_size", math.MaxInt64}, {"response_size", math.MaxInt64},
		{"duration_ms", math.MaxInt64}, {"suppressed", math.MaxInt64}} {
		f.ints[i] = c.max
		if col, ok := l.maxInt[c.column]; ok {
			f.ints[i] = min(c.max, col)
		}
	}
	for i, c := range udpFieldNames {
		f.udp[i] = math.MaxInt64
		if col, ok := l.maxInt[c]; ok {
			f.udp[i] = min(f.udp[i], col)
		}
	}
	return f
}

// valid says whether r, read cleanly by onePass, passes every
// rule of validate. It may say false of a record validate accepts (that
// record then costs validate's time, nothing else), never true of one
// validate rejects.
func (f *fieldLimits) valid(r *row) bool {
	// No UTF-8 check of the record's bytes: onePass's decoder refuses
	// invalid UTF-8, and such a body goes to the old path whole.
	if r.ts.IsZero() {
		return false
	}
	textOK := func(s string, limit int) bool {
		if strings.IndexByte(s, 0) >= 0 {
			return false
		}
		// A string of at most limit bytes has at most limit characters.
		return limit == 0 || len(s) <= limit || utf8.RuneCountInString(s) <= limit
	}
	for i, s := range [...]string{r.tokenID, r.userID, r.tokenType, r.region, r.probeNode, r.clientIP, r.protocol,
		r.method, r.targetURL, r.errText} {
		if !textOK(s, f.text[i]) {
			return false
		}
	}
	for i, o := range [...]optString{r.requestID, r.upstreamAddr, r.closeReason} {
		if o.ok && !textOK(o.s, f.timing[i]) {
			return false
		}
	}
	for i, n := range [...]int64{r.statusCode, r.requestSize, r.responseSize, r.durationMS, r.suppressed} {
		if n < 0 || n > f.ints[i] {
			return false
		}
	}
	for _, o := range [...]optFloat{r.dnsMS, r.connectMS, r.tlsMS, r.ttfbMS} {
		if o.ok && !(o.f >= 0 && o.f <= maxTimingMS) { // NaN fails both
			return false
		}
	}
	for i, o := range [...]optInt{r.datagramsUp, r.datagramsDown, r.datagramsDropped} {
		if o.ok && (o.n < 0 || o.n > f.udp[i]) {
			return false
		}
	}
	return true
}
