package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// HTTP/3 to the proxy (-proxy-h3): CONNECT tunnels as request streams on
// one QUIC connection, with quic-go's client. Only the throughput
// workloads apply; tunnel setup, forwarding and memory are measured over
// HTTP/1.1 and HTTP/2.

const protoH3 = "HTTP/3"

// h3Workloads are the workloads -proxy-h3 runs.
var h3Workloads = []string{wDown1, wUp1, wDownN, wUpN}

// h3Session is one QUIC connection to the proxy with HTTP/3 on it.
type h3Session struct {
	qc *quic.Conn
	cc *http3.ClientConn
}

func (s *h3Session) Close() error { return s.qc.CloseWithError(0, "") }

// h3Session opens a QUIC connection to the proxy's UDP port (the same
// number as its TCP one).
func (p *proxyClient) h3Session(ctx context.Context) (*h3Session, error) {
	if p.tls == nil {
		return nil, fmt.Errorf("HTTP/3 to proxy %s needs an https:// proxy URL", p.addr)
	}
	cfg := p.tls.Clone()
	cfg.NextProtos = []string{http3.NextProtoH3}
	qc, err := quic.DialAddr(ctx, p.addr, cfg, &quic.Config{KeepAlivePeriod: 10 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("dialing proxy %s over QUIC: %w", p.addr, err)
	}
	return &h3Session{qc: qc, cc: (&http3.Transport{}).NewClientConn(qc)}, nil
}

// tunnelH3 sends CONNECT target on a new request stream of s.
func (p *proxyClient) tunnelH3(ctx context.Context, s *h3Session, target string) (net.Conn, error) {
	str, err := s.cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening an HTTP/3 stream: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodConnect, "https://"+target, nil)
	if err != nil {
		str.CancelWrite(h3RequestCancelled)
		return nil, fmt.Errorf("building CONNECT %s: %w", target, err)
	}
	req.Host, req.URL.Path = target, ""
	if p.auth != "" {
		req.Header.Set("Proxy-Authorization", p.auth)
	}
	fail := func(err error) (net.Conn, error) {
		str.CancelRead(h3RequestCancelled)
		str.CancelWrite(h3RequestCancelled)
		return nil, fmt.Errorf("CONNECT %s over HTTP/3: %w", target, err)
	}
	if err := str.SendRequestHeader(req); err != nil {
		return fail(err)
	}
	stop := context.AfterFunc(ctx, func() { str.CancelRead(h3RequestCancelled) })
	resp, err := str.ReadResponse()
	if !stop() {
		return fail(ctx.Err())
	}
	if err != nil {
		return fail(err)
	}
	if resp.StatusCode != http.StatusOK {
		return fail(errors.New("proxy answered " + resp.Status))
	}
	return &h3Tunnel{str: str}, nil
}

// h3RequestCancelled is H3_REQUEST_CANCELLED (RFC 9114 §8.1).
const h3RequestCancelled = 0x10c

// h3Tunnel presents an HTTP/3 CONNECT stream as a net.Conn, like h2Stream.
type h3Tunnel struct {
	str *http3.RequestStream
}

func (t *h3Tunnel) Read(p []byte) (int, error)  { return t.str.Read(p) }
func (t *h3Tunnel) Write(p []byte) (int, error) { return t.str.Write(p) }

// CloseWrite sends FIN: a half-close.
func (t *h3Tunnel) CloseWrite() error { return t.str.Close() }
func (t *h3Tunnel) endStream() error  { return t.str.Close() }

// Close ends both directions at once, so a blocked Read returns.
func (t *h3Tunnel) Close() error {
	t.str.CancelRead(h3RequestCancelled)
	t.str.CancelWrite(h3RequestCancelled)
	return nil
}

func (t *h3Tunnel) LocalAddr() net.Addr              { return streamAddr{} }
func (t *h3Tunnel) RemoteAddr() net.Addr             { return streamAddr{} }
func (t *h3Tunnel) SetDeadline(time.Time) error      { return nil }
func (t *h3Tunnel) SetReadDeadline(time.Time) error  { return nil }
func (t *h3Tunnel) SetWriteDeadline(time.Time) error { return nil }

// h3Throughput is throughput over n CONNECT streams of one QUIC
// connection, TLS to the origin inside each, as for HTTP/2.
func (b *bench) h3Throughput(ctx context.Context, dir byte, n int) (Result, error) {
	res := Result{N: n, Unit: "MB/s"}
	dctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
	s, err := b.proxy.h3Session(dctx)
	cancel()
	if err != nil {
		return res, err
	}
	defer s.Close()
	raws := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range raws {
			_ = c.Close()
		}
	}()
	conns := make([]*tls.Conn, 0, n)
	for range n {
		sctx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
		raw, err := b.proxy.tunnelH3(sctx, s, b.origin.tlsAddr)
		if err != nil {
			cancel()
			return res, err
		}
		raws = append(raws, raw)
		tc := tls.Client(raw, b.origin.clientTLS)
		err = tc.HandshakeContext(sctx)
		cancel()
		if err != nil {
			return res, fmt.Errorf("TLS handshake with origin through the tunnel: %w", err)
		}
		conns = append(conns, tc)
	}
	var rate float64
	if dir == cmdDown {
		rate, err = b.download(ctx, &res, conns, raws)
	} else {
		rate, err = b.upload(ctx, &res, conns, raws)
	}
	res.Value = rate / 1e6
	return res, err
}
