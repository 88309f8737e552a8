package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// The CONNECT-UDP workload (RFC 9298, over HTTP/3, -proxy-h3): -tunnels flows on one
// QUIC connection to the proxy, each to a UDP echo server of this process
// on loopback, each keeping udpWindow datagrams of udpPayload bytes in
// flight. The figure is the datagrams the proxy relayed per second, both
// ways counted (an echo is two), and the proxy's CPU per datagram. The
// direct baseline runs the same loop over plain UDP sockets to the echo
// server. Peers (Squid, nghttpx) offer no CONNECT-UDP.

const (
	wUDP = "udp"
	// udpPayload is the size of each datagram: a QUIC packet's worth,
	// what a browser's QUIC through the proxy sends, and still small
	// enough for one QUIC datagram from the proxy to the client.
	udpPayload = 1000
	// udpWindow datagrams in flight per flow; a datagram not echoed
	// within udpLossTimeout is counted lost and its place reused.
	udpWindow      = 8
	udpLossTimeout = 200 * time.Millisecond
)

// udpEcho is a UDP echo server on loopback.
type udpEcho struct {
	pc   net.PacketConn
	done chan struct{}
}

func startUDPEcho() (*udpEcho, error) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the UDP echo server: %w", err)
	}
	e := &udpEcho{pc: pc, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		b := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(b[:n], from)
		}
	}()
	return e, nil
}

func (e *udpEcho) port() int { return e.pc.LocalAddr().(*net.UDPAddr).Port }

func (e *udpEcho) Close() {
	_ = e.pc.Close()
	<-e.done
}

// datagramFlow is one way to send datagrams and get their echoes.
type datagramFlow interface {
	send(b []byte) error
	receive(ctx context.Context) error // one echo
	close()
}

// udpDatagrams runs the CONNECT-UDP workload.
func (b *bench) udpDatagrams(ctx context.Context) (Result, error) {
	res := Result{N: b.cfg.tunnels, Unit: "datagrams/s"}
	echo, err := startUDPEcho()
	if err != nil {
		return res, err
	}
	defer echo.Close()

	var flows []datagramFlow
	defer func() {
		for _, f := range flows {
			f.close()
		}
	}()
	var open func(ctx context.Context) (datagramFlow, error)
	if b.proxy == nil {
		open = func(ctx context.Context) (datagramFlow, error) { return dialUDPFlow(echo.port()) }
	} else {
		cc, qc, err := b.proxy.dialH3(ctx, b.cfg.timeout)
		if err != nil {
			return res, err
		}
		defer qc.CloseWithError(0, "")
		open = func(ctx context.Context) (datagramFlow, error) {
			return b.proxy.connectUDP(ctx, cc, "127.0.0.1", echo.port())
		}
	}
	for range b.cfg.tunnels {
		octx, cancel := context.WithTimeout(ctx, b.cfg.timeout)
		f, err := open(octx)
		cancel()
		if err != nil {
			return res, err
		}
		flows = append(flows, f)
	}

	var echoed, lost atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start, cpu := time.Now(), b.sampleCPU()
	rctx, stop := context.WithDeadline(ctx, start.Add(b.cfg.duration))
	defer stop()
	for _, f := range flows {
		wg.Go(func() {
			n, l, err := runFlow(rctx, f)
			echoed.Add(n)
			lost.Add(l)
			if err != nil {
				errOnce.Do(func() { firstErr = err })
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	res.Ops, res.Errors = 2*echoed.Load(), lost.Load()
	res.Value = float64(res.Ops) / elapsed.Seconds()
	b.chargeCPU(&res, cpu, float64(res.Ops))
	if firstErr != nil {
		return res, firstErr
	}
	if res.Ops == 0 {
		return res, errors.New("no datagram came back")
	}
	return res, ctx.Err()
}

// runFlow keeps udpWindow datagrams in flight on f until ctx ends and
// returns the echoes received and the datagrams given up as lost.
func runFlow(ctx context.Context, f datagramFlow) (echoed, lost int64, _ error) {
	payload := make([]byte, udpPayload)
	credits := make(chan struct{}, udpWindow)
	for range udpWindow {
		credits <- struct{}{}
	}
	var got atomic.Int64
	recvDone := make(chan error, 1)
	go func() {
		for {
			if err := f.receive(ctx); err != nil {
				recvDone <- err
				return
			}
			got.Add(1)
			select {
			case credits <- struct{}{}:
			default:
			}
		}
	}()
	t := time.NewTimer(udpLossTimeout)
	defer t.Stop()
	for ctx.Err() == nil {
		select {
		case <-credits:
			if err := f.send(payload); err != nil {
				return got.Load(), lost, err
			}
			t.Reset(udpLossTimeout)
		case <-t.C:
			// Nothing came back for a while: what is in flight is lost.
			lost += int64(udpWindow - len(credits))
			for len(credits) < udpWindow {
				credits <- struct{}{}
			}
			t.Reset(udpLossTimeout)
		case <-ctx.Done():
		}
	}
	err := <-recvDone
	if ctx.Err() != nil {
		err = nil
	}
	return got.Load(), lost, err
}

// udpSocketFlow is the direct baseline: a connected UDP socket.
type udpSocketFlow struct {
	c   *net.UDPConn
	buf []byte
}

func dialUDPFlow(port int) (datagramFlow, error) {
	c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		return nil, err
	}
	return &udpSocketFlow{c: c, buf: make([]byte, 2048)}, nil
}

func (f *udpSocketFlow) send(b []byte) error {
	_, err := f.c.Write(b)
	return err
}

func (f *udpSocketFlow) receive(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { _ = f.c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	_, err := f.c.Read(f.buf)
	return err
}

func (f *udpSocketFlow) close() { _ = f.c.Close() }

// dialH3 opens an HTTP/3 connection to the proxy (its UDP port is its TCP
// port) with HTTP Datagrams, and waits for the proxy's SETTINGS.
func (p *proxyClient) dialH3(ctx context.Context, timeout time.Duration) (*http3.ClientConn, *quic.Conn, error) {
	if p.tls == nil {
		return nil, nil, errors.New("CONNECT-UDP needs an https:// proxy (HTTP/3)")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cfg := p.tls.Clone()
	cfg.NextProtos = []string{http3.NextProtoH3}
	qc, err := quic.DialAddr(ctx, p.addr, cfg, &quic.Config{EnableDatagrams: true, InitialPacketSize: 1350, KeepAlivePeriod: 10 * time.Second})
	if err != nil {
		return nil, nil, fmt.Errorf("QUIC handshake with proxy %s: %w", p.addr, err)
	}
	cc := (&http3.Transport{EnableDatagrams: true}).NewClientConn(qc)
	select {
	case <-cc.ReceivedSettings():
	case <-ctx.Done():
		qc.CloseWithError(0, "")
		return nil, nil, fmt.Errorf("proxy %s sent no HTTP/3 SETTINGS: %w", p.addr, ctx.Err())
	}
	if s := cc.Settings(); !s.EnableDatagrams || !s.EnableExtendedConnect {
		qc.CloseWithError(0, "")
		return nil, nil, fmt.Errorf("proxy %s does not offer HTTP Datagrams and extended CONNECT (CONNECT-UDP)", p.addr)
	}
	return cc, qc, nil
}

// h3UDPFlow is a CONNECT-UDP flow: UDP payloads are HTTP Datagrams with
// context id 0 (a single zero byte in front).
type h3UDPFlow struct {
	str *http3.RequestStream
	out []byte
}

func (p *proxyClient) connectUDP(ctx context.Context, cc *http3.ClientConn, host string, port int) (datagramFlow, error) {
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("opening a request stream: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodConnect,
		"https://"+p.addr+"/.well-known/masque/udp/"+host+"/"+strconv.Itoa(port)+"/", nil)
	if err != nil {
		return nil, err
	}
	req.Proto = "connect-udp"
	req.Header.Set("Capsule-Protocol", "?1")
	if p.auth != "" {
		req.Header.Set("Proxy-Authorization", p.auth)
	}
	if err := str.SendRequestHeader(req); err != nil {
		return nil, fmt.Errorf("sending CONNECT-UDP: %w", err)
	}
	res, err := str.ReadResponse()
	if err != nil {
		return nil, fmt.Errorf("reading the CONNECT-UDP answer: %w", err)
	}
	if res.StatusCode != http.StatusOK {
		str.CancelRead(0x10c)
		_ = str.Close()
		return nil, fmt.Errorf("CONNECT-UDP: proxy answered %s", res.Status)
	}
	return &h3UDPFlow{str: str, out: make([]byte, 1+udpPayload)}, nil
}

func (f *h3UDPFlow) send(b []byte) error {
	f.out = append(f.out[:1], b...) // out[0] is context id 0
	return f.str.SendDatagram(f.out)
}

func (f *h3UDPFlow) receive(ctx context.Context) error {
	_, err := f.str.ReceiveDatagram(ctx)
	return err
}

func (f *h3UDPFlow) close() {
	_ = f.str.Close()
	f.str.CancelRead(0x100)
}
