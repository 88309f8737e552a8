package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Stream origin commands. A client sends one command byte first; the origin
// answers as described. The protocol is tiny so that the origin costs as
// little CPU as possible and the proxy is what is being measured.
const (
	// cmdDown: the origin writes until the connection fails.
	cmdDown = 'D'
	// cmdUp, followed by a big-endian int64 duration in nanoseconds: the
	// origin discards everything it reads, and after that duration writes
	// back the byte count and the exact elapsed time (two int64s), then keeps
	// discarding until the client closes. Counting on the origin side means
	// bytes buffered inside a proxy are not counted as delivered.
	cmdUp = 'U'
	// cmdPing: the origin writes one byte back and waits for the client to
	// close. Used for idle tunnels.
	cmdPing = 'P'
	// cmdPingClose: the origin writes one byte back and closes. Used for
	// tunnel setup: the origin ending first lets every client close
	// gracefully (no RST_STREAM storms, which HTTP/2 servers rightly treat
	// as an attack) without relying on half-close support in the proxy.
	cmdPingClose = 'C'
)

// ioSize is the write size on both ends of throughput workloads: large
// writes keep per-call overhead out of the figures.
const ioSize = 256 << 10

// origin runs the loopback servers every workload talks to: a stream
// origin on a TLS port and on a plain TCP port (same protocol), and an HTTP
// origin serving /1k.
type origin struct {
	tlsAddr   string // stream origin, TLS
	plainAddr string // stream origin, plain TCP
	httpAddr  string // HTTP origin

	// clientTLS trusts the origin's generated certificate.
	clientTLS *tls.Config

	listeners []net.Listener
	httpSrv   *http.Server
	wg        sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// startOrigin starts the origins on loopback with a fresh self-signed
// certificate.
func startOrigin() (*origin, error) {
	cert, pool, err := selfSigned()
	if err != nil {
		return nil, fmt.Errorf("generating origin certificate: %w", err)
	}
	o := &origin{
		clientTLS: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"},
		conns:     make(map[net.Conn]struct{}),
	}
	tlsLn, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, fmt.Errorf("listening for the TLS stream origin: %w", err)
	}
	o.listeners = append(o.listeners, tlsLn)
	plainLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		o.Close()
		return nil, fmt.Errorf("listening for the plain stream origin: %w", err)
	}
	o.listeners = append(o.listeners, plainLn)
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		o.Close()
		return nil, fmt.Errorf("listening for the HTTP origin: %w", err)
	}
	o.tlsAddr, o.plainAddr, o.httpAddr = tlsLn.Addr().String(), plainLn.Addr().String(), httpLn.Addr().String()

	for _, ln := range []net.Listener{tlsLn, plainLn} {
		o.wg.Add(1)
		go o.acceptLoop(ln)
	}
	body := make([]byte, 1024)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	o.httpSrv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		_ = o.httpSrv.Serve(httpLn)
	}()
	return o, nil
}

// Close stops the origins and closes every open stream connection.
func (o *origin) Close() {
	for _, ln := range o.listeners {
		_ = ln.Close()
	}
	if o.httpSrv != nil {
		_ = o.httpSrv.Close()
	}
	o.mu.Lock()
	for c := range o.conns {
		_ = c.Close()
	}
	o.mu.Unlock()
	o.wg.Wait()
}

func (o *origin) acceptLoop(ln net.Listener) {
	defer o.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		o.mu.Lock()
		o.conns[c] = struct{}{}
		o.mu.Unlock()
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			serveStream(c)
			o.mu.Lock()
			delete(o.conns, c)
			o.mu.Unlock()
			_ = c.Close()
		}()
	}
}

// serveStream implements the stream origin protocol on one connection.
func serveStream(c net.Conn) {
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	switch cmd[0] {
	case cmdDown:
		buf := make([]byte, ioSize)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	case cmdUp:
		var arg [8]byte
		if _, err := io.ReadFull(c, arg[:]); err != nil {
			return
		}
		d := time.Duration(binary.BigEndian.Uint64(arg[:]))
		var n atomic.Int64
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, ioSize)
			for {
				k, err := c.Read(buf)
				n.Add(int64(k))
				if err != nil {
					return
				}
			}
		}()
		start := time.Now()
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-done:
			return
		}
		var res [16]byte
		binary.BigEndian.PutUint64(res[:8], uint64(n.Load()))
		binary.BigEndian.PutUint64(res[8:], uint64(time.Since(start)))
		if _, err := c.Write(res[:]); err != nil {
			return
		}
		<-done
	case cmdPing:
		if _, err := c.Write([]byte{'p'}); err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, c)
	case cmdPingClose:
		_, _ = c.Write([]byte{'p'})
	}
}

// selfSigned returns a fresh ECDSA certificate for 127.0.0.1 and a pool
// that trusts it.
func selfSigned() (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pinaka-bench origin"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}

// ping sends cmd (cmdPing or cmdPingClose) on c and reads the one-byte
// reply.
func ping(ctx context.Context, c net.Conn, cmd byte) error {
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	if _, err := c.Write([]byte{cmd}); err != nil {
		return fmt.Errorf("writing ping: %w", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("reading ping reply: %w", ctx.Err())
		}
		return fmt.Errorf("reading ping reply: %w", err)
	}
	if b[0] != 'p' {
		return errors.New("reading ping reply: unexpected byte")
	}
	return nil
}
