package proxy_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/pinaka-proxy/pinaka/internal/revocation"
)

// listServer publishes a revocation list the way the collector does
// (version, strong ETag, 304), on loopback. The collector itself is tested
// against PostgreSQL in internal/collector and, with this proxy, in
// cmd/pinaka's system test.
type listServer struct {
	*httptest.Server
	mu      sync.Mutex
	ids     []string
	version int64
	polls   int
}

func newListServer(t *testing.T) *listServer {
	s := &listServer{ids: []string{}, version: 1}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.polls++
		if r.URL.Path != revocation.Path || r.Header.Get("Authorization") != "Bearer node-key" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		etag := fmt.Sprintf(`"v%d"`, s.version)
		w.Header().Set("ETag", etag)
		if r.Header.Get("If-None-Match") == etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		json.NewEncoder(w).Encode(revocation.Document{Version: s.version, Count: len(s.ids), TokenIDs: s.ids})
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *listServer) set(ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids = append([]string{}, ids...) // never null: a list always has token_ids
	s.version++
}

func hasLabel(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

// readUntilClosed reads r until it fails or ends, and reports whether it
// did within the test's patience (the revocation interval is 1s).
func readUntilClosed(r io.Reader) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, r)
		done <- err
	}()
	return done
}

func waitClosed(t *testing.T, what string, done <-chan error) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s still open 20s after the revocation", what)
	}
}

// Revoking a token closes its HTTP/1.1 and HTTP/2 CONNECT tunnels, its
// RFC 8441 WebSocket and its forwarded request in flight, each with a
// record saying token_revoked; the token is then refused with 407, and
// another token's tunnel and new requests are untouched.
func TestRevocationClosesWhatTheTokenHasOpen(t *testing.T) {
	ls := newListServer(t)
	e := startProxy(t, map[string]string{
		"REVOCATION_URL": ls.URL + revocation.Path, "REVOCATION_INTERVAL": "1s", "BACKEND_API_KEY": "node-key",
	})
	other := "Bearer " + e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	echo := newEchoServer(t)

	// HTTP/1.1 CONNECT, tok-1 and tok-2.
	c1, br1, code := e.h1Connect(echo.addr(), e.bearer(), nil)
	if code != 200 {
		t.Fatalf("h1 CONNECT: %d", code)
	}
	defer c1.Close()
	h1Echo(t, c1, br1, "h1 before")
	c2, br2, code := e.h1Connect(echo.addr(), other, nil)
	if code != 200 {
		t.Fatalf("h1 CONNECT tok-2: %d", code)
	}
	defer c2.Close()
	h1Echo(t, c2, br2, "tok-2 before")

	// HTTP/2 CONNECT.
	cc := e.h2Conn()
	resp2, up2, err := h2Connect(cc, echo.addr(), e.bearer())
	if err != nil || resp2.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %v %v", err, resp2)
	}
	defer up2.Close()
	h1Echo(t, up2, bufio.NewReader(resp2.Body), "h2 before")

	// RFC 8441 WebSocket.
	o := newWSOrigin(t, false)
	hc := e.h2Raw()
	wsResp, wsUp := extendedConnect(t, hc, "http", o.hostPort(), "/echo", "websocket", e.bearer(), http.Header{"Sec-Websocket-Version": {"13"}})
	if wsResp.StatusCode != 200 {
		t.Fatalf("extended CONNECT: %d", wsResp.StatusCode)
	}
	wsEcho(t, wsUp, wsResp.Body)

	// A forwarded response in flight: the origin sends a first chunk and
	// holds the rest.
	release := make(chan struct{})
	defer close(release)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first chunk\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	fresp, err := e.h1Client(e.bearer()).Get(slow.URL + "/stream")
	if err != nil || fresp.StatusCode != 200 {
		t.Fatalf("forwarded GET: %v %v", err, fresp)
	}
	defer fresp.Body.Close()
	fbr := bufio.NewReader(fresp.Body)
	if line, err := fbr.ReadString('\n'); err != nil || line != "first chunk\n" {
		t.Fatalf("first chunk: %q %v", line, err)
	}

	h1Closed := readUntilClosed(br1)
	h2Closed := readUntilClosed(resp2.Body)
	wsClosed := readUntilClosed(wsResp.Body)
	fClosed := readUntilClosed(fbr)

	ls.set("tok-1")

	waitClosed(t, "HTTP/1.1 tunnel", h1Closed)
	waitClosed(t, "HTTP/2 tunnel", h2Closed)
	waitClosed(t, "RFC 8441 WebSocket", wsClosed)
	waitClosed(t, "forwarded request", fClosed)

	for _, c := range []struct {
		what string
		f    func(recordT) bool
	}{
		{"HTTP/1.1 tunnel", func(r recordT) bool {
			return r.Protocol == "HTTP/1.1" && r.Method == "CONNECT" && r.TargetURL == echo.addr() && r.StatusCode == 200
		}},
		{"HTTP/2 tunnel", func(r recordT) bool {
			return r.Protocol == "HTTP/2" && r.Method == "CONNECT" && r.TargetURL == echo.addr() && r.StatusCode == 200
		}},
		{"WebSocket", func(r recordT) bool { return strings.HasPrefix(r.TargetURL, "ws://") && r.StatusCode == 200 }},
		{"forwarded request", func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/stream") && r.StatusCode == 200 }},
	} {
		r := e.waitRecord(func(r recordT) bool { return r.TokenID == "tok-1" && c.f(r) })
		if r.Error != "token_revoked" || r.Success {
			t.Errorf("%s record: error %q success %v, want token_revoked", c.what, r.Error, r.Success)
		}
		if c.what != "forwarded request" && r.CloseReason != "token_revoked" {
			t.Errorf("%s record: close_reason %q, want token_revoked", c.what, r.CloseReason)
		}
	}

	// A new request with the token: 407, token revoked.
	c3, br3, code := e.h1Connect(echo.addr(), e.bearer(), nil)
	c3.Close()
	_ = br3
	if code != http.StatusProxyAuthRequired {
		t.Errorf("CONNECT with the revoked token: %d, want 407", code)
	}
	resp, err := e.h1Client(e.bearer()).Get(slow.URL + "/after")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusProxyAuthRequired || strings.TrimSpace(string(body)) != "token revoked" ||
		len(resp.Header.Values("Proxy-Authenticate")) != 2 {
		t.Errorf("forwarded GET with the revoked token: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	e.waitRecord(func(r recordT) bool {
		return r.TokenID == "tok-1" && strings.HasSuffix(r.TargetURL, "/after") && r.StatusCode == 407 && r.Error == "token_revoked"
	})
	if resp, _, err := h2Connect(cc, echo.addr(), e.bearer()); err != nil || resp.StatusCode != http.StatusProxyAuthRequired {
		t.Errorf("HTTP/2 CONNECT with the revoked token: %v %v", err, resp)
	}

	// The other token's tunnel is untouched, and it can open new ones.
	h1Echo(t, c2, br2, "tok-2 after")
	c4, br4, code := e.h1Connect(echo.addr(), other, nil)
	if code != 200 {
		t.Fatalf("CONNECT with the other token after the revocation: %d", code)
	}
	h1Echo(t, c4, br4, "tok-2 new")
	c4.Close()

	tunnels, requests := e.app.Proxy.RevokedClosed()
	if tunnels < 3 || requests < 1 {
		t.Errorf("closed by revocation: %d tunnels, %d requests; want 3 and 1", tunnels, requests)
	}
	if got := e.metric("pinaka_revoked_tokens"); got != 1 {
		t.Errorf("pinaka_revoked_tokens %v", got)
	}
	if got := e.metric("pinaka_revocation_closed_total", "kind", "tunnel"); got != float64(tunnels) {
		t.Errorf("pinaka_revocation_closed_total{kind=tunnel} %v, want %d", got, tunnels)
	}
	if got := e.metric("pinaka_auth_failures_total", "reason", "revoked"); got < 2 {
		t.Errorf("pinaka_auth_failures_total{reason=revoked} %v, want 2", got)
	}

	// Removed from the list: the token works again after the next poll.
	ls.set()
	deadline := time.Now().Add(20 * time.Second)
	for e.app.Revocations.List().Revoked("tok-1") {
		if time.Now().After(deadline) {
			t.Fatal("removal not applied 20s later")
		}
		time.Sleep(50 * time.Millisecond)
	}
	c5, _, code := e.h1Connect(echo.addr(), e.bearer(), nil)
	c5.Close()
	if code != 200 {
		t.Errorf("CONNECT after the removal: %d", code)
	}
}

func h1Echo(t *testing.T, w io.Writer, r *bufio.Reader, msg string) {
	t.Helper()
	if _, err := io.WriteString(w, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, buf, err)
	}
}

// Without REVOCATION_URL (and BACKEND_URL) there is no poller and no
// revocation metric; tokens are only checked as before.
func TestRevocationOffByDefault(t *testing.T) {
	e := startProxy(t, nil)
	if e.app.Revocations != nil {
		t.Fatal("a poller without REVOCATION_URL or BACKEND_URL")
	}
	mfs, _ := e.app.Metrics.Registry.Gather()
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "pinaka_revoked_tokens") {
			t.Errorf("metric %s without a revocation list", mf.GetName())
		}
	}
}
