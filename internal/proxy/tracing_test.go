package proxy_test

import (
	"bufio"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// otlpReceiver is an OTLP/HTTP trace receiver: it decodes every export
// request it gets and keeps the spans.
type otlpReceiver struct {
	srv      *httptest.Server
	mu       sync.Mutex
	posts    int
	spans    []*tracepb.Span
	services []string
}

func newOTLPReceiver(t *testing.T) *otlpReceiver {
	t.Helper()
	rcv := &otlpReceiver{}
	rcv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" || r.Header.Get("Content-Type") != "application/x-protobuf" {
			t.Errorf("receiver: %s %s (%s)", r.Method, r.URL.Path, r.Header.Get("Content-Type"))
			http.Error(w, "no", http.StatusNotFound)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
		if err != nil {
			t.Errorf("receiver: %v", err)
			return
		}
		var req coltracepb.ExportTraceServiceRequest
		if err := proto.Unmarshal(body, &req); err != nil {
			t.Errorf("receiver: decoding: %v", err)
			http.Error(w, "bad", http.StatusBadRequest)
			return
		}
		rcv.mu.Lock()
		rcv.posts++
		for _, rs := range req.ResourceSpans {
			for _, a := range rs.GetResource().GetAttributes() {
				if a.Key == "service.name" {
					rcv.services = append(rcv.services, a.Value.GetStringValue())
				}
			}
			for _, ss := range rs.ScopeSpans {
				rcv.spans = append(rcv.spans, ss.Spans...)
			}
		}
		rcv.mu.Unlock()
		out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.Write(out)
	}))
	t.Cleanup(rcv.srv.Close)
	return rcv
}

// env returns the proxy variables that export to the receiver, also set in
// the process environment, where the SDK reads them.
func (rcv *otlpReceiver) env(t *testing.T, extra map[string]string) map[string]string {
	v := map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": rcv.srv.URL,
		"OTEL_BSP_SCHEDULE_DELAY":     "50",
		"OTEL_TRACES_SAMPLER":         "always_on",
	}
	for k, val := range extra {
		v[k] = val
	}
	for k, val := range v {
		if strings.HasPrefix(k, "OTEL_") {
			t.Setenv(k, val)
		}
	}
	return v
}

// tree is a request's root span (found by its request id) and its
// children by name.
type tree struct {
	root     *tracepb.Span
	children map[string]*tracepb.Span
	all      []*tracepb.Span
}

// waitTree waits for the span with request id id and its children
// (at least want of them).
func (rcv *otlpReceiver) waitTree(t *testing.T, id string, want int) tree {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		rcv.mu.Lock()
		var tr tree
		for _, s := range rcv.spans {
			if attr(s, "pinaka.request_id") == id {
				tr.root = s
			}
		}
		if tr.root != nil {
			tr.children = map[string]*tracepb.Span{}
			for _, s := range rcv.spans {
				if string(s.ParentSpanId) == string(tr.root.SpanId) && string(s.TraceId) == string(tr.root.TraceId) {
					tr.children[s.Name] = s
				}
			}
			tr.all = append([]*tracepb.Span(nil), rcv.spans...)
		}
		rcv.mu.Unlock()
		if tr.root != nil && len(tr.children) >= want {
			return tr
		}
		if time.Now().After(deadline) {
			t.Fatalf("no span tree for request %s with %d children (have %+v)", id, want, tr.children)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func attrValue(s *tracepb.Span, key string) *commonpb.AnyValue {
	for _, a := range s.Attributes {
		if a.Key == key {
			return a.Value
		}
	}
	return nil
}

func attr(s *tracepb.Span, key string) string {
	v := attrValue(s, key)
	if v == nil {
		return ""
	}
	if iv, ok := v.Value.(*commonpb.AnyValue_IntValue); ok {
		return fmt.Sprint(iv.IntValue)
	}
	return v.GetStringValue()
}

// checkTree checks the children's names, that each lies within the root
// and after the auth step, and that no attribute anywhere holds the token.
func checkTree(t *testing.T, what string, tr tree, token string, names ...string) {
	t.Helper()
	for _, n := range names {
		c, ok := tr.children[n]
		if !ok {
			t.Errorf("%s: no %q child; children %v", what, n, keys(tr.children))
			continue
		}
		if c.StartTimeUnixNano < tr.root.StartTimeUnixNano || c.EndTimeUnixNano > tr.root.EndTimeUnixNano || c.EndTimeUnixNano < c.StartTimeUnixNano {
			t.Errorf("%s: %q [%d, %d] not within the root [%d, %d]", what, n, c.StartTimeUnixNano, c.EndTimeUnixNano, tr.root.StartTimeUnixNano, tr.root.EndTimeUnixNano)
		}
		if n != "auth" && c.StartTimeUnixNano < tr.children["auth"].GetEndTimeUnixNano() {
			t.Errorf("%s: %q starts before auth ended", what, n)
		}
		if c.Status.GetCode() == tracepb.Status_STATUS_CODE_ERROR {
			t.Errorf("%s: %q has an error status: %v", what, n, c.Status)
		}
	}
	if len(tr.children) != len(names) {
		t.Errorf("%s: children %v, want %v", what, keys(tr.children), names)
	}
	sig := token[strings.LastIndexByte(token, '.')+1:]
	for _, s := range tr.all {
		for _, a := range s.Attributes {
			if v := a.Value.GetStringValue(); strings.Contains(v, sig) || strings.Contains(v, "Bearer") {
				t.Errorf("%s: span %q attribute %s holds the token: %q", what, s.Name, a.Key, v)
			}
		}
	}
}

func keys(m map[string]*tracepb.Span) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// A forwarded https request (name resolved, TLS to the origin) and a
// CONNECT tunnel each give a root span with auth, dns, connect, (tls,)
// upstream response children and the record's attributes; no attribute
// holds the token; without TRACE_PROPAGATE the origin gets no traceparent
// of ours (a client's own passes unchanged, and is not continued).
func TestTracingSpans(t *testing.T) {
	rcv := newOTLPReceiver(t)
	var mu sync.Mutex
	var seenTP []string
	origin := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seenTP = append(seenTP, r.Header.Get("Traceparent"))
		mu.Unlock()
		io.WriteString(w, "ok")
	}))
	t.Cleanup(origin.Close)
	echo := tcpOrigin(t, false)
	dnsSrv := newDNSServer(t, map[string]string{"example.com.": "127.0.0.1", "tunnel.test.": "127.0.0.1"})
	e := startProxy(t, rcv.env(t, map[string]string{"DNS_SERVERS": dnsSrv.addr, "OTEL_SERVICE_NAME": "pinaka-test"}))
	if e.app.Tracing == nil {
		t.Fatal("tracing is off with OTEL_EXPORTER_OTLP_ENDPOINT set")
	}

	// Forwarded, https origin, with a client traceparent.
	clientTP := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	target := "https://example.com:" + port(t, origin.Listener.Addr().String()) + "/x"
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: example.com\r\nTraceparent: %s\r\nProxy-Authorization: %s\r\n\r\n", target, clientTP, e.bearer())
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("forward: %d", resp.StatusCode)
	}
	id := resp.Header.Get(accesslog.RequestIDHeader)
	tr := rcv.waitTree(t, id, 5)
	checkTree(t, "forward", tr, e.token, "auth", "dns", "connect", "tls", "upstream response")
	for k, want := range map[string]string{
		"http.request.method": "GET", "http.response.status_code": "200", "pinaka.kind": "forward",
		"network.protocol": "HTTP/1.1", "pinaka.token_id": "tok-1", "pinaka.target": target,
		"network.peer.address": origin.Listener.Addr().String(),
	} {
		if got := attr(tr.root, k); got != want {
			t.Errorf("forward: root %s = %q, want %q", k, got, want)
		}
	}
	if tr.root.Name != "GET" || tr.root.Kind != tracepb.Span_SPAN_KIND_SERVER || len(tr.root.ParentSpanId) != 0 {
		t.Errorf("forward root: name %q kind %v parent %x (a client's traceparent is not continued without TRACE_PROPAGATE)", tr.root.Name, tr.root.Kind, tr.root.ParentSpanId)
	}
	if hex.EncodeToString(tr.root.TraceId) == "0af7651916cd43dd8448eb211c80319c" {
		t.Error("forward: the client's trace was continued without TRACE_PROPAGATE")
	}
	mu.Lock()
	if len(seenTP) != 1 || seenTP[0] != clientTP {
		t.Errorf("origin saw traceparent %q, want the client's own %q, untouched", seenTP, clientTP)
	}
	mu.Unlock()
	if attr(tr.children["dns"], "pinaka.dns.cached") != "" && attrValue(tr.children["dns"], "pinaka.dns.cached").GetBoolValue() {
		t.Error("dns: a fresh name marked cached")
	}

	// A CONNECT tunnel to a name.
	tunnelTarget := "tunnel.test:" + port(t, echo)
	tc, br, code := e.h1Connect(tunnelTarget, e.bearer(), nil)
	if code != 200 {
		t.Fatalf("CONNECT: %d", code)
	}
	echoOnceConn(t, tc, br, "hello", "")
	tc.Close()
	rec := e.waitRecord(func(r recordT) bool { return r.Method == "CONNECT" })
	tr = rcv.waitTree(t, rec.RequestID, 4)
	checkTree(t, "tunnel", tr, e.token, "auth", "dns", "connect", "upstream response")
	for k, want := range map[string]string{
		"http.request.method": "CONNECT", "http.response.status_code": "200", "pinaka.kind": "connect",
		"pinaka.target": tunnelTarget, "pinaka.close_reason": "client_closed", "pinaka.token_id": "tok-1",
	} {
		if got := attr(tr.root, k); got != want {
			t.Errorf("tunnel: root %s = %q, want %q", k, got, want)
		}
	}
	if tr.root.Name != "CONNECT" {
		t.Errorf("tunnel root named %q", tr.root.Name)
	}
	if up := tr.children["upstream response"]; up.EndTimeUnixNano-up.StartTimeUnixNano < uint64(firstByteDelay/2) {
		// The echo origin waits firstByteDelay before its first byte:
		// the span that ends at that byte cannot be much shorter.
		t.Errorf("tunnel: upstream response lasted %dns, the origin waited %v", up.EndTimeUnixNano-up.StartTimeUnixNano, firstByteDelay)
	}

	// A refused request: a root with a failed auth child and nothing else.
	bad, err := e.h1Client("Bearer not-a-token").Get("http://example.com:1/")
	if err != nil {
		t.Fatal(err)
	}
	bad.Body.Close()
	tr = rcv.waitTree(t, bad.Header.Get(accesslog.RequestIDHeader), 1)
	if len(tr.children) != 1 || tr.children["auth"].GetStatus().GetCode() != tracepb.Status_STATUS_CODE_ERROR ||
		tr.root.Status.GetCode() != tracepb.Status_STATUS_CODE_ERROR || attr(tr.root, "error.type") != "auth_invalid" {
		t.Errorf("refused: children %v, auth status %v, root status %v, error.type %q", keys(tr.children), tr.children["auth"].GetStatus(), tr.root.Status, attr(tr.root, "error.type"))
	}
	rcv.mu.Lock()
	if len(rcv.services) == 0 || rcv.services[0] != "pinaka-test" {
		t.Errorf("service.name %v, want OTEL_SERVICE_NAME's pinaka-test", rcv.services)
	}
	rcv.mu.Unlock()
}

// With TRACE_PROPAGATE=true the origin gets our span's traceparent, and a
// client's traceparent is continued: our root is its child.
func TestTracingPropagate(t *testing.T) {
	rcv := newOTLPReceiver(t)
	tps := make(chan string, 4)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tps <- r.Header.Get("Traceparent")
		io.WriteString(w, "ok")
	}))
	t.Cleanup(origin.Close)
	e := startProxy(t, rcv.env(t, map[string]string{"TRACE_PROPAGATE": "true"}))
	c := e.h1Client(e.bearer())

	// The first request dials (auth, connect, upstream response); the
	// second gets the pooled connection (auth, upstream response).
	get := func(clientTP string, children int) (string, tree) {
		t.Helper()
		req, _ := http.NewRequest("GET", origin.URL+"/p", nil)
		if clientTP != "" {
			req.Header.Set("Traceparent", clientTP)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		return <-tps, rcv.waitTree(t, resp.Header.Get(accesslog.RequestIDHeader), children)
	}

	tp, tr := get("", 3)
	want := fmt.Sprintf("00-%x-%x-01", tr.root.TraceId, tr.root.SpanId)
	if tp != want {
		t.Errorf("origin got traceparent %q, want the root span's %q", tp, want)
	}
	if len(tr.root.ParentSpanId) != 0 {
		t.Errorf("root has a parent %x without a client traceparent", tr.root.ParentSpanId)
	}

	clientTP := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	tp, tr = get(clientTP, 2)
	if hex.EncodeToString(tr.root.TraceId) != "0af7651916cd43dd8448eb211c80319c" || hex.EncodeToString(tr.root.ParentSpanId) != "b7ad6b7169203331" {
		t.Errorf("root trace %x parent %x: the client's trace was not continued", tr.root.TraceId, tr.root.ParentSpanId)
	}
	if want := fmt.Sprintf("00-%x-%x-01", tr.root.TraceId, tr.root.SpanId); tp != want {
		t.Errorf("origin got traceparent %q, want %q (ours, replacing the client's)", tp, want)
	}
}

// Without an OTLP endpoint nothing is created or exported, and
// TRACE_PROPAGATE alone sends no traceparent.
func TestTracingOff(t *testing.T) {
	rcv := newOTLPReceiver(t)
	tps := make(chan string, 1)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tps <- r.Header.Get("Traceparent")
		io.WriteString(w, "ok")
	}))
	t.Cleanup(origin.Close)
	// Every other OTEL_* variable set, the endpoint not.
	vars := rcv.env(t, map[string]string{"TRACE_PROPAGATE": "true", "OTEL_SERVICE_NAME": "x"})
	delete(vars, "OTEL_EXPORTER_OTLP_ENDPOINT")
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
	e := startProxy(t, vars)
	if e.app.Tracing != nil {
		t.Fatal("a tracer was created without OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	resp, err := e.h1Client(e.bearer()).Get(origin.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if tp := <-tps; tp != "" {
		t.Errorf("origin got traceparent %q with tracing off", tp)
	}
	time.Sleep(300 * time.Millisecond) // six export intervals, had there been an exporter
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	if rcv.posts != 0 {
		t.Errorf("%d exports with tracing off", rcv.posts)
	}
}

// An RFC 8441 WebSocket to a wss origin with TRACE_PROPAGATE: the upstream
// handshake carries our root's traceparent; the tree has connect, tls and
// upstream response.
func TestTracingWebSocketPropagate(t *testing.T) {
	rcv := newOTLPReceiver(t)
	e := startProxy(t, rcv.env(t, map[string]string{"TRACE_PROPAGATE": "true"}))
	o := newWSOrigin(t, true)
	resp, pw := extendedConnect(t, e.h2Raw(), "https", o.hostPort(), "/echo", "websocket", e.bearer(), http.Header{"Sec-Websocket-Version": {"13"}})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	hs := <-o.handshakes
	pw.Close()
	tr := rcv.waitTree(t, resp.Header.Get(accesslog.RequestIDHeader), 4)
	checkTree(t, "websocket", tr, e.token, "auth", "connect", "tls", "upstream response")
	if want := fmt.Sprintf("00-%x-%x-01", tr.root.TraceId, tr.root.SpanId); hs.Get("Traceparent") != want {
		t.Errorf("handshake traceparent %q, want %q", hs.Get("Traceparent"), want)
	}
	if attr(tr.root, "pinaka.kind") != "websocket" {
		t.Errorf("kind %q", attr(tr.root, "pinaka.kind"))
	}
}
