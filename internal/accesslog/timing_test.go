package accesslog

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Timings are milliseconds with microsecond resolution; unmeasured ones are
// left out of the record and its log line, a measured 0 is kept.
func TestMillisJSON(t *testing.T) {
	r := record(1)
	r.RequestID = "01a2-id"
	r.DNSMS = MillisOf(0)
	r.ConnectMS = MillisOf(1234567 * time.Nanosecond) // 1.234567ms → 1.234
	r.TTFBMS = MillisOf(200*time.Millisecond + 456*time.Microsecond)
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{`"dns_ms":0,`, `"connect_ms":1.234,`, `"ttfb_ms":200.456`, `"request_id":"01a2-id"`} {
		if !strings.Contains(s, want) {
			t.Errorf("record JSON lacks %s: %s", want, s)
		}
	}
	for _, absent := range []string{"tls_ms", "upstream_addr", "close_reason"} {
		if strings.Contains(s, absent) {
			t.Errorf("record JSON has unmeasured %s: %s", absent, s)
		}
	}
	var back Record
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.DNSMS != r.DNSMS || back.ConnectMS != MillisOf(1234*time.Microsecond) || back.TTFBMS != r.TTFBMS || !back.TLSMS.IsZero() {
		t.Errorf("round trip: %+v", back)
	}

	line := recordLines(t, r)[0]
	if line["dns_ms"] != 0.0 || line["connect_ms"] != 1.234 || line["ttfb_ms"] != 200.456 || line["request_id"] != "01a2-id" {
		t.Errorf("log line: %v", line)
	}
	if _, ok := line["tls_ms"]; ok {
		t.Errorf("log line has unmeasured tls_ms: %v", line)
	}
}

// pinaka_ship_lag_seconds counts a batch waiting in the spool from when it
// was cut, and drops to 0 once it is delivered.
func TestShipLagCountsTheSpool(t *testing.T) {
	dir := t.TempDir()
	before := time.Now().Truncate(time.Millisecond)
	spoolUndelivered(t, dir, 10)
	after := time.Now()

	allowed := make(chan struct{})
	b := newTestBackend(t, func(id string, attempt int) action {
		select {
		case <-allowed:
			return action{}
		default:
			return action{status: http.StatusServiceUnavailable}
		}
	})
	o, _ := testOptions(b.srv.URL)
	o.SpoolDir = dir
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	oldest := time.Unix(0, o.Metrics.ShipSpoolOldest.Load())
	if oldest.Before(before) || oldest.After(after) {
		t.Errorf("oldest spooled batch at %v, want between %v and %v (when it was cut)", oldest, before, after)
	}
	least := time.Since(after).Seconds() // taken first: the lag read after it can only be larger
	if lag := toFloat(o.Metrics.ShipLag); lag < least {
		t.Errorf("ship lag %vs, less than the spooled batch's age", lag)
	}
	close(allowed)
	waitFor(t, "spool delivered", func() bool { return b.storedCount() == 10 })
	waitFor(t, "lag back to 0", func() bool { return toFloat(o.Metrics.ShipLag) == 0 })
	if o.Metrics.ShipSpoolOldest.Load() != 0 {
		t.Error("ShipSpoolOldest still set with an empty spool")
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A CONNECT-UDP flow's counts are always written, 0 included; other
// records carry none of them, in the JSON and in the log line alike.
func TestUDPFlowFields(t *testing.T) {
	up, down, dropped := int64(3), int64(0), int64(1)
	r := record(1)
	r.DatagramsUp, r.DatagramsDown, r.DatagramsDropped = &up, &down, &dropped
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"datagrams_up":3`, `"datagrams_down":0`, `"datagrams_dropped":1`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("record JSON lacks %s: %s", want, b)
		}
	}
	line := recordLines(t, r)[0]
	if line["datagrams_up"] != 3.0 || line["datagrams_down"] != 0.0 || line["datagrams_dropped"] != 1.0 {
		t.Errorf("log line: %v", line)
	}
	plain := record(2)
	b, _ = json.Marshal(plain)
	if strings.Contains(string(b), "datagrams") {
		t.Errorf("a record that is not a flow has datagram counts: %s", b)
	}
	if _, ok := recordLines(t, plain)[0]["datagrams_up"]; ok {
		t.Error("log line of a record that is not a flow has datagrams_up")
	}
}
