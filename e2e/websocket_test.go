package e2e

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/testutil"

	"golang.org/x/net/http2"
	"golang.org/x/net/websocket"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// TestBinaryALPNAndExtendedConnectSetting checks what the shipped binary
// offers a client: h2 and http/1.1 by ALPN, and, on HTTP/2,
// SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 in its first SETTINGS frame (the
// binary turns RFC 8441 on for itself; nothing in the environment here
// asks for it).
func TestBinaryALPNAndExtendedConnectSetting(t *testing.T) {
	p := startPinaka(t)
	for _, proto := range []string{"h2", "http/1.1"} {
		c, err := tls.Dial("tcp", p.Addr, tlsConfig(proto))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.ConnectionState().NegotiatedProtocol; got != proto {
			t.Errorf("ALPN offered %q, negotiated %q", proto, got)
		}
		c.Close()
	}
	c, err := tls.Dial("tcp", p.Addr, tlsConfig("h2"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sf, err := testutil.ServerSettings(c)
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := sf.Value(http2.SettingEnableConnectProtocol); !ok || v != 1 {
		t.Fatalf("the binary does not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL: %v", sf)
	}
}

// TestBinaryWebSocketOverHTTP2 bootstraps a WebSocket with RFC 8441
// through the binary to an x/net/websocket echo origin and exchanges a
// message; a wss:// origin whose certificate the proxy does not trust is
// refused with 502 (the binary verifies origins against the system roots).
func TestBinaryWebSocketOverHTTP2(t *testing.T) {
	p := startPinaka(t)
	echo := websocket.Server{Handler: func(ws *websocket.Conn) {
		var msg string
		for websocket.Message.Receive(ws, &msg) == nil {
			if websocket.Message.Send(ws, "echo: "+msg) != nil {
				return
			}
		}
	}}
	plain := httptest.NewServer(echo)
	defer plain.Close()
	untrusted := httptest.NewTLSServer(echo)
	defer untrusted.Close()

	// The bare frame client: Go 1.27's x/net client refuses :protocol.
	c, err := tls.Dial("tcp", p.Addr, tlsConfig("h2"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := testutil.NewH2Raw(t, c)
	if v := h.ServerSettings(t)[http2.SettingEnableConnectProtocol]; v != 1 {
		t.Fatalf("SETTINGS_ENABLE_CONNECT_PROTOCOL = %d: a client would not send extended CONNECT", v)
	}
	tok := mint(t, "e2e-ws", "us-east")

	open := func(scheme, authority string) (*http.Response, *testutil.H2Stream) {
		s := h.Open(t, false, ":method", "CONNECT", ":protocol", "websocket", ":scheme", scheme,
			":authority", authority, ":path", "/chat",
			"sec-websocket-version", "13", "proxy-authorization", "Bearer "+tok)
		return s.Response(t), s
	}

	host := strings.TrimPrefix(plain.URL, "http://")
	resp, up := open("http", host)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("ws://%s: status %d", host, resp.StatusCode)
	}
	if err := writeFrame(up, []byte("hi pinaka")); err != nil {
		t.Fatal(err)
	}
	got, err := readFrame(resp.Body)
	if err != nil || string(got) != "echo: hi pinaka" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	up.CloseWrite()
	resp.Body.Close()
	rec := p.waitRecord(t, "the WebSocket", func(r accesslog.Record) bool { return r.TargetURL == "ws://"+host+"/chat" })
	if rec.Protocol != "HTTP/2" || rec.Method != "CONNECT" || rec.StatusCode != 200 || rec.TokenID != "e2e-ws" {
		t.Errorf("record = %+v", rec)
	}

	resp, _ = open("https", strings.TrimPrefix(untrusted.URL, "https://"))
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("wss:// origin with an untrusted certificate: status %d (%s), want 502", resp.StatusCode, body)
	}
}

// writeFrame writes one masked text frame (payload < 126 bytes).
func writeFrame(w io.Writer, payload []byte) error {
	if len(payload) >= 126 {
		return fmt.Errorf("payload too long for this helper")
	}
	var mask [4]byte
	if _, err := rand.Read(mask[:]); err != nil {
		return err
	}
	b := append([]byte{0x81, 0x80 | byte(len(payload))}, mask[:]...)
	for i, c := range payload {
		b = append(b, c^mask[i%4])
	}
	_, err := w.Write(b)
	return err
}

// readFrame reads one unmasked server frame and returns its payload.
func readFrame(r io.Reader) ([]byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := int(h[1] & 0x7f)
	if n == 126 {
		var l [2]byte
		if _, err := io.ReadFull(r, l[:]); err != nil {
			return nil, err
		}
		n = int(binary.BigEndian.Uint16(l[:]))
	} else if n == 127 || h[1]&0x80 != 0 {
		return nil, fmt.Errorf("unexpected frame header % x", h)
	}
	b := make([]byte, n)
	_, err := io.ReadFull(r, b)
	return b, err
}
