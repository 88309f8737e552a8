package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"golang.org/x/net/http2"
	"golang.org/x/net/websocket"
)

// wsOrigin is a WebSocket echo origin (golang.org/x/net/websocket) with
// paths that misbehave on purpose. It keeps the headers of the last
// handshake it accepted.
type wsOrigin struct {
	*httptest.Server
	handshakes chan http.Header
}

func newWSOrigin(t *testing.T, secure bool) *wsOrigin {
	t.Helper()
	o := &wsOrigin{handshakes: make(chan http.Header, 16)}
	mux := http.NewServeMux()
	// websocket.Server without Handshake accepts any Origin, like most
	// APIs behind a proxy; websocket.Handler would demand one.
	mux.Handle("/echo", websocket.Server{Config: websocket.Config{Header: http.Header{"Set-Cookie": {"session=ws1"}}}, Handler: func(ws *websocket.Conn) {
		o.handshakes <- ws.Request().Header.Clone()
		// Whole messages: io.Copy would echo a large frame in pieces.
		for {
			var msg string
			if err := websocket.Message.Receive(ws, &msg); err != nil {
				return
			}
			if err := websocket.Message.Send(ws, msg); err != nil {
				return
			}
		}
	}})
	mux.HandleFunc("/forbidden", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Origin-Reason", "members only")
		http.Error(w, "origin says no", http.StatusForbidden)
	})
	mux.HandleFunc("/ok-200", func(w http.ResponseWriter, r *http.Request) {
		// Not a WebSocket server: it answers the upgrade as a plain GET.
		o.handshakes <- r.Header.Clone()
		fmt.Fprintln(w, "plain page")
	})
	mux.HandleFunc("/bad-accept", func(w http.ResponseWriter, r *http.Request) {
		// A 101 whose Sec-WebSocket-Accept does not match the key: not a
		// WebSocket server, whatever it claims.
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
			base64.StdEncoding.EncodeToString(make([]byte, 20)))
		_ = brw.Flush()
		_, _ = io.Copy(io.Discard, c)
	})
	// 404 for every other path.
	if secure {
		o.Server = httptest.NewTLSServer(mux)
	} else {
		o.Server = httptest.NewServer(mux)
	}
	t.Cleanup(o.Close)
	return o
}

func (o *wsOrigin) hostPort() string {
	return strings.TrimPrefix(strings.TrimPrefix(o.URL, "https://"), "http://")
}

// wsWriteFrame writes one final, masked (as a client must) frame.
func wsWriteFrame(w io.Writer, opcode byte, payload []byte) error {
	var hdr []byte
	hdr = append(hdr, 0x80|opcode)
	switch n := len(payload); {
	case n < 126:
		hdr = append(hdr, 0x80|byte(n))
	case n <= 0xffff:
		hdr = append(hdr, 0x80|126)
		hdr = binary.BigEndian.AppendUint16(hdr, uint16(n))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(n))
	}
	var mask [4]byte
	if _, err := rand.Read(mask[:]); err != nil {
		return err
	}
	hdr = append(hdr, mask[:]...)
	masked := make([]byte, len(payload))
	for i, b := range payload {
		masked[i] = b ^ mask[i%4]
	}
	_, err := w.Write(append(hdr, masked...))
	return err
}

// wsReadFrame reads one frame as a client sees it (servers do not mask).
func wsReadFrame(r io.Reader) (opcode byte, payload []byte, err error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("reading frame header: %w", err)
	}
	if h[1]&0x80 != 0 {
		return 0, nil, errors.New("server frame is masked")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if n > 1<<24 {
		return 0, nil, fmt.Errorf("frame of %d bytes", n)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, fmt.Errorf("reading frame payload: %w", err)
	}
	return h[0] & 0x0f, payload, nil
}

// wsEcho sends text frames (one small, one needing a 16-bit length) and
// checks each comes back unchanged.
func wsEcho(t *testing.T, w io.Writer, r io.Reader) {
	t.Helper()
	for _, msg := range [][]byte{[]byte("hello through pinaka"), bytes.Repeat([]byte("0123456789"), 1000)} {
		if err := wsWriteFrame(w, 0x1, msg); err != nil {
			t.Fatalf("writing frame: %v", err)
		}
		op, got, err := wsReadFrame(r)
		if err != nil {
			t.Fatalf("reading echo: %v", err)
		}
		if op != 0x1 || !bytes.Equal(got, msg) {
			t.Fatalf("echo: opcode %d, %d bytes %.40q; want text, %d bytes %.40q", op, len(got), got, len(msg), msg)
		}
	}
}

// openExtended starts an RFC 8441 stream on h, after checking that the
// proxy advertised SETTINGS_ENABLE_CONNECT_PROTOCOL, as a client must.
func openExtended(t *testing.T, h *testutil.H2Raw, scheme, authority, path, protocol, authHeader string, hdr http.Header) *testutil.H2Stream {
	t.Helper()
	if v := h.ServerSettings(t)[http2.SettingEnableConnectProtocol]; v != 1 {
		t.Fatalf("SETTINGS_ENABLE_CONNECT_PROTOCOL = %d: a client would not send extended CONNECT", v)
	}
	fields := []string{":method", http.MethodConnect, ":protocol", protocol, ":scheme", scheme, ":authority", authority, ":path", path}
	for k, vs := range hdr {
		for _, v := range vs {
			fields = append(fields, strings.ToLower(k), v)
		}
	}
	if authHeader != "" {
		fields = append(fields, "proxy-authorization", authHeader)
	}
	return h.Open(t, false, fields...)
}

// extendedConnect opens an RFC 8441 stream and waits for the answer. The
// returned writer is the client→origin direction (Close = END_STREAM);
// resp.Body is origin→client (Close before the end = RST_STREAM).
func extendedConnect(t *testing.T, h *testutil.H2Raw, scheme, authority, path, protocol, authHeader string, hdr http.Header) (*http.Response, io.WriteCloser) {
	t.Helper()
	s := openExtended(t, h, scheme, authority, path, protocol, authHeader, hdr)
	resp := s.Response(t)
	up := upload{s}
	t.Cleanup(func() { up.Close(); resp.Body.Close() })
	return resp, up
}

// upload is a stream's client→origin direction.
type upload struct{ *testutil.H2Stream }

func (u upload) Close() error { return u.CloseWrite() }

// TestExtendedConnectSettingAdvertised reads the proxy's first SETTINGS
// frame with a bare framer: SETTINGS_ENABLE_CONNECT_PROTOCOL must be 1, or
// browsers never try RFC 8441.
func TestExtendedConnectSettingAdvertised(t *testing.T) {
	e := startProxy(t, nil)
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("h2"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sf, err := testutil.ServerSettings(c)
	if err != nil {
		t.Fatal(err)
	}
	v, ok := sf.Value(http2.SettingEnableConnectProtocol)
	if !ok || v != 1 {
		t.Fatalf("SETTINGS_ENABLE_CONNECT_PROTOCOL = %d (present %v), want 1; settings: %v", v, ok, sf)
	}
}

func TestExtendedConnectWebSocketEcho(t *testing.T) {
	for _, secure := range []bool{false, true} {
		scheme, wsScheme := "http", "ws"
		if secure {
			scheme, wsScheme = "https", "wss"
		}
		t.Run(wsScheme, func(t *testing.T) {
			e := startProxy(t, nil)
			o := newWSOrigin(t, secure)
			hc := e.h2Raw()
			resp, pw := extendedConnect(t, hc, scheme, o.hostPort(), "/echo", "websocket", e.bearer(), http.Header{
				"Sec-Websocket-Version":  {"13"},
				"Sec-Websocket-Protocol": {"chat"},
				"Origin":                 {"https://app.example"},
				"X-Custom":               {"kept"},
			})
			if resp.StatusCode != http.StatusOK {
				body, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d (%s), want 200", resp.StatusCode, body)
			}
			if got := resp.Header.Get("Sec-Websocket-Protocol"); got != "chat" {
				t.Errorf("Sec-WebSocket-Protocol = %q, want the origin's choice %q", got, "chat")
			}
			if got := resp.Header.Get("Set-Cookie"); got != "session=ws1" {
				t.Errorf("Set-Cookie = %q, want the origin's handshake cookie", got)
			}
			for _, h := range []string{"Sec-Websocket-Accept", "Upgrade", "Connection"} {
				if v := resp.Header.Get(h); v != "" {
					t.Errorf("%s: %q leaked from the HTTP/1.1 handshake into the HTTP/2 response", h, v)
				}
			}
			wsEcho(t, pw, resp.Body)

			h := <-o.handshakes
			if h.Get("Proxy-Authorization") != "" {
				t.Error("Proxy-Authorization reached the origin")
			}
			if h.Get("X-Custom") != "kept" || h.Get("Origin") != "https://app.example" {
				t.Errorf("end-to-end headers not passed on: %v", h)
			}
			for k := range h {
				if strings.HasPrefix(k, ":") {
					t.Errorf("pseudo-header %q sent to the origin", k)
				}
			}
			if !strings.Contains(h.Get("Via"), "pinaka") {
				t.Errorf("Via = %q, want this hop", h.Get("Via"))
			}

			// A close frame from the client ends the session cleanly.
			if err := wsWriteFrame(pw, 0x8, []byte{0x03, 0xe8}); err != nil {
				t.Fatal(err)
			}
			pw.Close()
			_, _ = io.Copy(io.Discard, resp.Body)
			target := wsScheme + "://" + o.hostPort() + "/echo"
			r := e.waitRecord(func(r recordT) bool { return r.TargetURL == target })
			if r.Protocol != "HTTP/2" || r.Method != http.MethodConnect || r.StatusCode != http.StatusOK ||
				r.TokenID != "tok-1" || r.RequestSize == 0 || r.ResponseSize == 0 {
				t.Errorf("record = %+v", r)
			}
		})
	}
}

func TestExtendedConnectOriginRefuses(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	hc := e.h2Raw()
	for path, want := range map[string]int{"/forbidden": http.StatusForbidden, "/missing": http.StatusNotFound} {
		resp, _ := extendedConnect(t, hc, "http", o.hostPort(), path, "websocket", e.bearer(), nil)
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != want {
			t.Errorf("%s: status %d, want the origin's %d", path, resp.StatusCode, want)
		}
		if path == "/forbidden" {
			if !strings.Contains(string(body), "origin says no") || resp.Header.Get("X-Origin-Reason") != "members only" {
				t.Errorf("%s: origin's answer not passed on: %q %v", path, body, resp.Header)
			}
		}
		rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, path) })
		if rec.StatusCode != want || rec.Success {
			t.Errorf("%s: record = %+v", path, rec)
		}
	}
}

// An origin that answers the upgrade with 200 has not opened a WebSocket:
// the client must get 502, since a 2xx to extended CONNECT means "tunnel
// open" (RFC 8441 §5). And the client's content-length, which describes
// its HTTP/2 stream, never reaches the origin's bodiless GET.
func TestExtendedConnectOrigin200IsBadGateway(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	s := openExtended(t, e.h2Raw(), "http", o.hostPort(), "/ok-200", "websocket", e.bearer(), http.Header{"Content-Length": {"5"}})
	if _, err := io.WriteString(s, "hello"); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	resp := s.Response(t)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502 for an origin answering the upgrade with 200", resp.StatusCode)
	}
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/ok-200") })
	if rec.StatusCode != http.StatusBadGateway || rec.Error != "upgrade_invalid" || rec.Success {
		t.Fatalf("record = %+v", rec)
	}
	// upgrade_invalid: the origin answered, so its handshake is queued.
	select {
	case h := <-o.handshakes:
		if cl := h.Get("Content-Length"); cl != "" {
			t.Errorf("origin received Content-Length %q on the upgrade GET", cl)
		}
	default:
		t.Error("the origin saw no upgrade GET")
	}
}

func TestExtendedConnectBadAccept(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	resp, _ := extendedConnect(t, e.h2Raw(), "http", o.hostPort(), "/bad-accept", "websocket", e.bearer(), nil)
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502 for a 101 with the wrong Sec-WebSocket-Accept", resp.StatusCode)
	}
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/bad-accept") })
	if rec.StatusCode != http.StatusBadGateway || rec.Error != "upgrade_invalid" {
		t.Errorf("record = %+v", rec)
	}
}

func TestExtendedConnectRefusals(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	hc := e.h2Raw()
	other := e.mint("user-2", "tok-eu", []string{"eu-west"}, time.Hour)
	cases := []struct {
		name, authority, protocol, auth string
		want                            int
	}{
		{"unknown protocol", o.hostPort(), "webtransport", e.bearer(), http.StatusNotImplemented},
		{"no credentials", o.hostPort(), "websocket", "", http.StatusProxyAuthRequired},
		{"wrong region", o.hostPort(), "websocket", "Bearer " + other, http.StatusForbidden},
		{"port not allowed", "127.0.0.1:22", "websocket", e.bearer(), http.StatusForbidden},
		{"bad authority", "127.0.0.1:99999", "websocket", e.bearer(), http.StatusBadRequest},
	}
	for _, c := range cases {
		resp, _ := extendedConnect(t, hc, "http", c.authority, "/echo", c.protocol, c.auth, nil)
		_, _ = io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != c.want {
			t.Errorf("%s: status %d, want %d", c.name, resp.StatusCode, c.want)
		}
		if c.want == http.StatusProxyAuthRequired && len(resp.Header.Values("Proxy-Authenticate")) != 2 {
			t.Errorf("%s: Proxy-Authenticate = %q, want Bearer and Basic", c.name, resp.Header.Values("Proxy-Authenticate"))
		}
	}
	select {
	case h := <-o.handshakes:
		t.Errorf("a refused request reached the origin: %v", h)
	default:
	}
}

// TestHTTP1UpgradeForwarded sends an absolute-form WebSocket upgrade over
// HTTP/1.1 to the proxy, as a client configured with an HTTP proxy for ws://
// does, and talks WebSocket through it.
func TestHTTP1UpgradeForwarded(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef"))
	fmt.Fprintf(c, "GET http://%s/echo HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nProxy-Authorization: %s\r\n\r\n",
		o.hostPort(), o.hostPort(), key, e.bearer())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %d, want 101", resp.StatusCode)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if got, want := resp.Header.Get("Sec-Websocket-Accept"), base64.StdEncoding.EncodeToString(sum[:]); got != want {
		t.Fatalf("Sec-WebSocket-Accept = %q, want %q (the origin's answer to our key)", got, want)
	}
	wsEcho(t, c, br)
	if h := <-o.handshakes; h.Get("Proxy-Authorization") != "" {
		t.Error("Proxy-Authorization reached the origin")
	}
	c.Close()
	rec := e.waitRecord(func(r recordT) bool { return strings.HasSuffix(r.TargetURL, "/echo") })
	if rec.Protocol != "HTTP/1.1" || rec.Method != http.MethodGet || rec.StatusCode != http.StatusSwitchingProtocols {
		t.Errorf("record = %+v", rec)
	}
}

// TestHTTP1UpgradeRefusedWithoutToken: the upgrade is authenticated like
// any request, before the origin is contacted.
func TestHTTP1UpgradeRefusedWithoutToken(t *testing.T) {
	e := startProxy(t, nil)
	o := newWSOrigin(t, false)
	c, err := tls.Dial("tcp", e.addr, e.tlsConfig("http/1.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET http://%s/echo HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n\r\n", o.hostPort(), o.hostPort())
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodGet})
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusProxyAuthRequired {
		t.Fatalf("status %d, want 407", resp.StatusCode)
	}
	select {
	case h := <-o.handshakes:
		t.Errorf("unauthenticated upgrade reached the origin: %v", h)
	default:
	}
}
