package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"golang.org/x/net/http2"
)

// proxyClient knows how to reach one proxy: its address, whether it speaks
// TLS, and the Proxy-Authorization value to send.
type proxyClient struct {
	url  *url.URL
	addr string      // host:port
	tls  *tls.Config // nil for an http:// proxy
	auth string      // Proxy-Authorization value, "" for none
}

func newProxyClient(raw string, insecure bool, auth string) (*proxyClient, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parsing -proxy %q: %w", raw, err)
	}
	p := &proxyClient{url: u, addr: u.Host, auth: auth}
	switch u.Scheme {
	case "https":
		if u.Port() == "" {
			p.addr = net.JoinHostPort(u.Hostname(), "443")
		}
		p.tls = &tls.Config{ServerName: u.Hostname(), InsecureSkipVerify: insecure}
	case "http":
		if u.Port() == "" {
			p.addr = net.JoinHostPort(u.Hostname(), "80")
		}
	default:
		return nil, fmt.Errorf("parsing -proxy %q: scheme must be http or https", raw)
	}
	return p, nil
}

// authHeader builds the Proxy-Authorization value for a Bearer token or for
// Basic with the token as password (what browsers send after a 407).
func authHeader(bearer, basic string) string {
	switch {
	case bearer != "":
		return "Bearer " + bearer
	case basic != "":
		return "Basic " + base64.StdEncoding.EncodeToString([]byte("bench:"+basic))
	}
	return ""
}

// dial opens a connection to the proxy, TLS with the given ALPN protocol
// when the proxy is https.
func (p *proxyClient) dial(ctx context.Context, alpn string) (net.Conn, error) {
	if p.tls == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", p.addr)
		if err != nil {
			return nil, fmt.Errorf("dialing proxy %s: %w", p.addr, err)
		}
		return c, nil
	}
	cfg := p.tls.Clone()
	cfg.NextProtos = []string{alpn}
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, fmt.Errorf("dialing proxy %s over TLS: %w", p.addr, err)
	}
	if got := c.(*tls.Conn).ConnectionState().NegotiatedProtocol; alpn == "h2" && got != "h2" {
		_ = c.Close()
		return nil, fmt.Errorf("dialing proxy %s: ALPN negotiated %q, want h2", p.addr, got)
	}
	return c, nil
}

// tunnelH1 opens a new connection to the proxy and sends an HTTP/1.1
// CONNECT for target.
func (p *proxyClient) tunnelH1(ctx context.Context, target string) (net.Conn, error) {
	c, err := p.dial(ctx, "http/1.1")
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if p.auth != "" {
		req += "Proxy-Authorization: " + p.auth + "\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("writing CONNECT %s: %w", target, err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("reading CONNECT %s response: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		_ = c.Close()
		return nil, fmt.Errorf("CONNECT %s: proxy answered %s", target, resp.Status)
	}
	if !stop() {
		_ = c.Close()
		return nil, fmt.Errorf("CONNECT %s: %w", target, ctx.Err())
	}
	if br.Buffered() > 0 {
		return &bufferedConn{Conn: c, r: br}, nil
	}
	return c, nil
}

// bufferedConn returns bytes the CONNECT response reader already buffered
// before reading from the connection again.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// h2Conn opens a new HTTP/2 connection to the proxy.
func (p *proxyClient) h2Conn(ctx context.Context) (*http2.ClientConn, error) {
	if p.tls == nil {
		return nil, fmt.Errorf("HTTP/2 to proxy %s needs an https:// proxy URL", p.addr)
	}
	c, err := p.dial(ctx, "h2")
	if err != nil {
		return nil, err
	}
	// The deprecated x/net entry point is the one that takes an existing
	// connection, which is what lets us count and place connections exactly.
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("starting HTTP/2 on proxy connection %s: %w", p.addr, err)
	}
	return cc, nil
}

// tunnelH2 opens an HTTP/2 CONNECT stream for target on cc. The request
// body is a pipe: what is written to the returned conn is sent as DATA.
func (p *proxyClient) tunnelH2(ctx context.Context, cc *http2.ClientConn, target string) (net.Conn, error) {
	pr, pw := io.Pipe()
	// The stream lives as long as the tunnel, not as long as ctx: ctx only
	// bounds the wait for the response headers.
	sctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(sctx, http.MethodConnect, "http://"+target, pr)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("building CONNECT %s: %w", target, err)
	}
	req.URL = &url.URL{Host: target}
	req.Host = target
	req.ContentLength = -1
	if p.auth != "" {
		req.Header.Set("Proxy-Authorization", p.auth)
	}
	stop := context.AfterFunc(ctx, cancel)
	resp, err := cc.RoundTrip(req)
	if !stop() {
		if err == nil {
			_ = resp.Body.Close()
		}
		_ = pw.Close()
		return nil, fmt.Errorf("CONNECT %s over HTTP/2: %w", target, ctx.Err())
	}
	if err != nil {
		cancel()
		_ = pw.Close()
		return nil, fmt.Errorf("CONNECT %s over HTTP/2: %w", target, err)
	}
	if resp.StatusCode != http.StatusOK {
		_ = resp.Body.Close()
		cancel()
		_ = pw.Close()
		return nil, fmt.Errorf("CONNECT %s over HTTP/2: proxy answered %s", target, resp.Status)
	}
	return &h2Stream{body: resp.Body, pw: pw, cancel: cancel}, nil
}

// h2Stream presents an HTTP/2 CONNECT stream as a net.Conn so that TLS and
// the workloads run unchanged over it. Deadlines are not supported; the
// workloads end streams by closing them.
type h2Stream struct {
	body   io.ReadCloser
	pw     *io.PipeWriter
	cancel context.CancelFunc
}

func (s *h2Stream) Read(p []byte) (int, error)  { return s.body.Read(p) }
func (s *h2Stream) Write(p []byte) (int, error) { return s.pw.Write(p) }

// streamEnder is implemented by HTTP/2 tunnels.
type streamEnder interface {
	// endStream half-closes the tunnel: END_STREAM after the data written.
	endStream() error
}

// CloseWrite ends the request body: END_STREAM, a half-close.
func (s *h2Stream) CloseWrite() error { return s.pw.Close() }

func (s *h2Stream) endStream() error { return s.pw.Close() }

func (s *h2Stream) Close() error {
	_ = s.pw.Close()
	err := s.body.Close()
	s.cancel()
	return err
}

func (s *h2Stream) LocalAddr() net.Addr              { return streamAddr{} }
func (s *h2Stream) RemoteAddr() net.Addr             { return streamAddr{} }
func (s *h2Stream) SetDeadline(time.Time) error      { return nil }
func (s *h2Stream) SetReadDeadline(time.Time) error  { return nil }
func (s *h2Stream) SetWriteDeadline(time.Time) error { return nil }

type streamAddr struct{}

func (streamAddr) Network() string { return "h2-connect" }
func (streamAddr) String() string  { return "h2-connect" }

// closeWithConn closes an extra resource (the stream's own HTTP/2
// connection) along with the tunnel.
type closeWithConn struct {
	net.Conn
	cc *http2.ClientConn
}

func (c *closeWithConn) endStream() error {
	if s, ok := c.Conn.(streamEnder); ok {
		return s.endStream()
	}
	return nil
}

func (c *closeWithConn) Close() error {
	err := c.Conn.Close()
	_ = c.cc.Close()
	return err
}
