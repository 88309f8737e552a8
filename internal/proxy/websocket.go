package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/egress"
	"github.com/pinaka-proxy/pinaka/internal/httpx"
	"github.com/pinaka-proxy/pinaka/internal/timing"
)

// refusalBodyTimeout bounds how long the body of a refused upgrade is
// relayed: it is an error page, not a stream.
const refusalBodyTimeout = 10 * time.Second

// websocketGUID is the key-hashing constant of RFC 6455 §1.3.
const websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// serveExtendedConnect bootstraps a WebSocket over an HTTP/2 stream
// (RFC 8441): the origin gets an ordinary HTTP/1.1 Upgrade handshake, the
// client gets 200 once the origin answers 101, then the stream carries the
// WebSocket bytes both ways.
func (p *Proxy) serveExtendedConnect(w http.ResponseWriter, r *http.Request, q *request) {
	if isConnectUDP(r) {
		p.serveConnectUDP(w, r, q)
		return
	}
	if proto := httpx.Protocol(r); !strings.EqualFold(proto, "websocket") {
		p.fail(w, q, http.StatusNotImplemented, "unsupported_protocol", "extended CONNECT protocol "+proto+" is not supported")
		return
	}
	secure := httpx.Scheme(r) == "https"
	var defPort uint16 = 80
	if secure {
		defPort = 443
	}
	t, ok := p.checkTarget(w, q, r.Host, defPort, nil)
	if !ok {
		return
	}
	release, ok := p.acquireTunnel(w, q)
	if !ok {
		return
	}
	// The slot goes with the tunnel (tunnelHTTP2), or here on a refusal.
	tunnelling := false
	defer func() {
		if !tunnelling {
			release()
		}
	}()

	conn, err := p.opt.Dialer.DialTarget(r.Context(), t)
	if err != nil {
		p.failUpstream(w, q, err)
		return
	}
	// The client resetting the stream or the drain deadline ends the
	// bootstrap wherever it is waiting on the origin (handshake, refusal
	// body); the tunnel itself watches the context on its own.
	stopWatch := context.AfterFunc(r.Context(), func() { conn.Close() })
	defer stopWatch()
	if secure {
		cfg := p.upstreamTLS()
		cfg.ServerName = t.Host
		cfg.NextProtos = []string{"http/1.1"}
		tc := tls.Client(conn, cfg)
		hctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		q.timing.Begin(timing.TLS)
		err := tc.HandshakeContext(hctx)
		q.timing.End(timing.TLS, err)
		cancel()
		if err != nil {
			conn.Close()
			q.proxyStatus = "tls_protocol_error"
			p.fail(w, q, http.StatusBadGateway, "upstream_tls", "TLS handshake with the origin failed")
			return
		}
		conn = tc
	}
	res, br, err := websocketHandshake(conn, r, t, q.timing)
	if errors.Is(err, errBadUpgrade) {
		conn.Close()
		q.proxyStatus = "http_protocol_error"
		p.fail(w, q, http.StatusBadGateway, "upgrade_invalid", err.Error())
		return
	}
	if err != nil {
		conn.Close()
		p.failUpstream(w, q, err)
		return
	}
	if err := checkStatus(res.StatusCode); err != nil {
		conn.Close()
		q.proxyStatus = "http_protocol_error"
		p.fail(w, q, http.StatusBadGateway, "upstream_error", "origin sent an invalid status")
		return
	}
	if res.StatusCode >= 200 && res.StatusCode < 300 {
		// RFC 8441 §5: a 2xx answer to extended CONNECT means the tunnel
		// is open. An origin that answers the upgrade with 200 has not
		// switched protocols; passing its 200 on would make the client
		// start speaking WebSocket to an HTTP response.
		res.Body.Close()
		conn.Close()
		q.proxyStatus = "http_protocol_error"
		p.fail(w, q, http.StatusBadGateway, "upgrade_invalid", fmt.Sprintf("origin answered the WebSocket upgrade with %d instead of 101", res.StatusCode))
		return
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		// The origin refused the upgrade: pass its answer on.
		defer conn.Close()
		defer res.Body.Close()
		copyEndToEnd(w.Header(), res.Header)
		stampRequestID(w.Header(), q)
		// At most 1 MB of the body is passed on, so its length may not
		// hold; HTTP/2 ends the stream instead.
		w.Header().Del("Content-Length")
		q.rec.StatusCode = res.StatusCode
		q.rec.Error = "upgrade_refused"
		w.WriteHeader(res.StatusCode)
		// The status goes out now, not when the origin finishes its body.
		_ = http.NewResponseController(w).Flush()
		_ = conn.SetReadDeadline(time.Now().Add(refusalBodyTimeout))
		n, _ := io.Copy(w, io.LimitReader(res.Body, 1<<20))
		q.rec.ResponseSize = n
		return
	}
	// The client gets the origin's end-to-end headers (the chosen
	// subprotocol and extensions, cookies); the 101's own handshake fields
	// belong to the HTTP/1.1 hop that ends here (RFC 8441 §5).
	copyEndToEnd(w.Header(), res.Header)
	stampRequestID(w.Header(), q)
	w.Header().Del("Sec-Websocket-Accept")
	w.Header().Del("Content-Length")
	up := connEndpoint(conn)
	if br.Buffered() > 0 {
		// Frames the origin sent right behind its 101.
		up.r = io.MultiReader(io.LimitReader(br, int64(br.Buffered())), conn)
	}
	tunnelling = true
	p.tunnelHTTP2(w, q, up, release)
}

// websocketHandshake sends the HTTP/1.1 Upgrade request for r's path and
// reads the answer. A 101 must carry the right Sec-WebSocket-Accept. The
// answer's first byte is the request's time to first byte (tr).
func websocketHandshake(conn net.Conn, r *http.Request, t egress.Target, tr *timing.Trace) (*http.Response, *bufio.Reader, error) {
	keyBytes := make([]byte, 16)
	if _, err := rand.Read(keyBytes); err != nil {
		return nil, nil, fmt.Errorf("generating websocket key: %w", err)
	}
	key := base64.StdEncoding.EncodeToString(keyBytes)

	path := r.URL.RequestURI()
	if path == "" {
		path = "/"
	}
	h := r.Header.Clone()
	removeHopByHop(h)
	h.Del("Sec-Websocket-Key")
	h.Del("Sec-Websocket-Accept")
	h.Del("Host")
	// The client's content-length describes its HTTP/2 stream, not this
	// GET, which has no body: sent on, it would make the origin wait for
	// (or read WebSocket frames as) a body.
	h.Del("Content-Length")
	h.Set("Sec-WebSocket-Key", key)
	if h.Get("Sec-Websocket-Version") == "" {
		h.Set("Sec-WebSocket-Version", "13")
	}
	addVia(h, r)
	q, _ := r.Context().Value(requestKey{}).(*request)
	injectSpan(q, h)

	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer conn.SetDeadline(time.Time{})
	bw := bufio.NewWriterSize(conn, 4<<10)
	fmt.Fprintf(bw, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", path, hostHeader(t))
	if err := h.Write(bw); err != nil {
		return nil, nil, fmt.Errorf("writing websocket handshake: %w", err)
	}
	bw.WriteString("\r\n")
	if err := bw.Flush(); err != nil {
		return nil, nil, fmt.Errorf("writing websocket handshake: %w", err)
	}
	br := bufio.NewReaderSize(conn, 4<<10)
	if _, err := br.Peek(1); err == nil {
		tr.FirstByte()
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+hostHeader(t)+path, nil)
	res, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, nil, fmt.Errorf("reading websocket handshake response: %w", err)
	}
	if res.StatusCode == http.StatusSwitchingProtocols {
		sum := sha1.Sum([]byte(key + websocketGUID))
		want := base64.StdEncoding.EncodeToString(sum[:])
		if res.Header.Get("Sec-Websocket-Accept") != want ||
			!strings.EqualFold(res.Header.Get("Upgrade"), "websocket") ||
			!headerHasToken(res.Header, "Connection", "upgrade") {
			return nil, nil, errBadUpgrade
		}
	}
	return res, br, nil
}

var errBadUpgrade = errors.New("origin answered 101 without a valid WebSocket handshake (Sec-WebSocket-Accept, Upgrade, Connection)")

// headerHasToken reports whether the comma-separated header name lists
// token (case-insensitively), as RFC 6455 §4.1 requires of Connection.
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func hostHeader(t egress.Target) string {
	if t.Port == 80 || t.Port == 443 {
		if strings.Contains(t.Host, ":") {
			return "[" + t.Host + "]"
		}
		return t.Host
	}
	return t.String()
}

// copyEndToEnd copies response headers except hop-by-hop ones.
func copyEndToEnd(dst, src http.Header) {
	src = src.Clone()
	removeHopByHop(src)
	for k, v := range src {
		dst[k] = v
	}
}
