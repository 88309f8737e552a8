package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// These run `pinaka serve` with HTTP3_ENABLED: what a flood of QUIC
// connections costs and what it leaves standing, and SIGHUP on QUIC.

// h3Dial opens a QUIC connection to the proxy over tr (nil: a fresh
// transport of quic-go's own).
func h3Dial(ctx context.Context, tr *quic.Transport, addr string) (*quic.Conn, error) {
	tlsConf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{http3.NextProtoH3}}
	if tr == nil {
		return quic.DialAddr(ctx, addr, tlsConf, nil)
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	return tr.Dial(ctx, ua, tlsConf, nil)
}

// h3Client is HTTP/3 on qc.
func h3Client(qc *quic.Conn) *http3.ClientConn { return (&http3.Transport{}).NewClientConn(qc) }

// h3Tunnel sends CONNECT target on cc and returns the tunnel's stream.
func h3Tunnel(ctx context.Context, cc *http3.ClientConn, target, tok string) (*http3.RequestStream, error) {
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, err
	}
	req, _ := http.NewRequest(http.MethodConnect, "https://"+target, nil)
	req.Host, req.URL.Path = target, ""
	req.Header.Set("Proxy-Authorization", "Bearer "+tok)
	if err := str.SendRequestHeader(req); err != nil {
		return nil, err
	}
	res, err := str.ReadResponse()
	if err != nil {
		return nil, err
	}
	if res.StatusCode != http.StatusOK {
		return nil, errors.New("CONNECT over HTTP/3: " + res.Status)
	}
	return str, nil
}

// echoRound writes msg and reads it back, within a bound.
func echoRound(rw io.ReadWriter, msg string) error {
	if _, err := io.WriteString(rw, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(rw, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo mismatch")
	}
	return nil
}

// retryCounter is a client's UDP socket that counts the Retry packets
// (RFC 9000 §17.2.5: long header, type 3 in QUIC v1) it receives.
type retryCounter struct {
	net.PacketConn
	retries *atomic.Int64
}

func (c retryCounter) ReadFrom(p []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(p)
	if n > 0 && isRetry(p[:n]) {
		c.retries.Add(1)
	}
	return n, a, err
}

func isRetry(b []byte) bool { return len(b) > 5 && b[0]&0xf0 == 0xf0 }

// garbageInitial is a packet that looks like a QUIC v1 Initial to anyone
// reading its header (a 1200-byte datagram, a fresh connection ID) but
// whose payload decrypts to nothing: what a flood of spoofed or
// abandoned connection attempts sends, which never finishes a handshake.
func garbageInitial() []byte {
	p := make([]byte, 1200)
	_, _ = rand.Read(p)
	p[0] = 0xc3                           // long header, Initial, 4-byte packet number
	binary.BigEndian.PutUint32(p[1:5], 1) // QUIC v1
	p[5] = 8                              // DCID length; 8 random bytes follow
	p[14] = 8                             // SCID length
	p[23] = 0                             // no token
	rest := len(p) - 26                   // packet number and payload
	binary.BigEndian.PutUint16(p[24:26], 0x4000|uint16(rest))
	return p
}

// procCPU is the user+system time of pid so far, from /proc.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

// adminMetric reads one series of the node's /metrics.
func adminMetric(t *testing.T, admin, series string) float64 {
	t.Helper()
	res, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no %s in /metrics", series)
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestQUICFloodStaysWithinLimits floods the node with new QUIC connections
// from loopback: thousands of Initial packets that never finish a
// handshake, and a thousand complete handshakes at once. The node must
// hold no more unvalidated handshakes than its cap (a quarter of
// MAX_CONNECTIONS), answer the rest with Retry (which the clients see),
// drop the abandoned handshakes at HEADER_READ_TIMEOUT, keep every
// connection within MAX_CONNECTIONS, and keep serving an HTTP/3 and an
// HTTP/2 bystander, old and new connections alike. It logs the node's CPU
// for the flood.
func TestQUICFloodStaysWithinLimits(t *testing.T) {
	const (
		maxConns   = 400
		maxUnval   = maxConns / 4 // h3MaxUnvalidated
		garbage    = 5000
		handshakes = 1000
		// Longer than quic-go's default (5 s), to see that it is ours
		// that applies.
		handshakeTime = 8 * time.Second
	)
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	admin := "127.0.0.1:" + testutil.FreePort(t)
	p := startBinary(t, certPath, keyPath, "HTTP3_ENABLED=true", "ADMIN_ADDR="+admin,
		"MAX_CONNECTIONS="+strconv.Itoa(maxConns), "HEADER_READ_TIMEOUT="+handshakeTime.String())
	tok := testToken(t)
	origin := echoOrigin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Bystanders, open before the flood: an HTTP/3 tunnel and an HTTP/2 one.
	qc, err := h3Dial(ctx, nil, p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer qc.CloseWithError(0, "")
	h3str, err := h3Tunnel(ctx, h3Client(qc), origin, tok)
	if err != nil {
		t.Fatal(err)
	}
	h2body, h2up := h2Tunnel(t, p.Addr, origin, tok)
	h2rw := struct {
		io.Reader
		io.Writer
	}{bufio.NewReader(h2body), h2up}
	baseline := adminMetric(t, admin, "pinaka_active_connections")

	pid := p.Cmd.Process.Pid
	cpu0 := procCPU(t, pid)
	var wg sync.WaitGroup
	floodDone := make(chan struct{})

	// Abandoned Initials, from one socket, each a new connection ID.
	raw, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	var rawRetries, rawOther atomic.Int64
	go func() {
		buf := make([]byte, 2048)
		for {
			n, _, err := raw.ReadFrom(buf)
			if err != nil {
				return
			}
			if isRetry(buf[:n]) {
				rawRetries.Add(1)
			} else {
				rawOther.Add(1)
			}
		}
	}()
	to, _ := net.ResolveUDPAddr("udp", p.Addr)
	wg.Go(func() {
		for i := 0; i < garbage; i++ {
			if _, err := raw.WriteTo(garbageInitial(), to); err != nil {
				t.Errorf("sending an Initial: %v", err)
				return
			}
			if i%100 == 99 {
				time.Sleep(20 * time.Millisecond) // about 5000 a second
			}
		}
	})

	// Complete handshakes, 16 at a time, each client counting the Retry
	// packets it gets.
	var clientRetries, completed, refused atomic.Int64
	var next atomic.Int64
	for w := 0; w < 16; w++ {
		wg.Go(func() {
			udp, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Error(err)
				return
			}
			tr := &quic.Transport{Conn: retryCounter{PacketConn: udp, retries: &clientRetries}}
			defer tr.Close()
			for next.Add(1) <= handshakes {
				dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
				c, err := h3Dial(dctx, tr, p.Addr)
				dcancel()
				if err != nil {
					refused.Add(1)
					continue
				}
				completed.Add(1)
				_ = c.CloseWithError(0, "")
			}
		})
	}

	// During the flood: the open tunnels carry bytes, and new HTTP/3 and
	// HTTP/2 connections get through. The limits are sampled.
	var rounds, maxActive, maxUnvalSeen float64
	go func() { wg.Wait(); close(floodDone) }()
	for flooding := true; flooding; {
		select {
		case <-floodDone:
			flooding = false
		case <-time.After(100 * time.Millisecond):
		}
		if err := echoRound(h3str, "h3 during the flood"); err != nil {
			t.Fatalf("the open HTTP/3 tunnel during the flood: %v", err)
		}
		if err := echoRound(h2rw, "h2 during the flood"); err != nil {
			t.Fatalf("the open HTTP/2 tunnel during the flood: %v", err)
		}
		nc, err := h3Dial(ctx, nil, p.Addr)
		if err != nil {
			t.Fatalf("a new HTTP/3 connection during the flood: %v", err)
		}
		s, err := h3Tunnel(ctx, h3Client(nc), origin, tok)
		if err == nil {
			err = echoRound(s, "new h3")
		}
		_ = nc.CloseWithError(0, "")
		if err != nil {
			t.Fatalf("a new HTTP/3 tunnel during the flood: %v", err)
		}
		b, w := h2Tunnel(t, p.Addr, origin, tok)
		w.Close()
		b.Close()
		rounds++
		maxActive = max(maxActive, adminMetric(t, admin, "pinaka_active_connections"))
		maxUnvalSeen = max(maxUnvalSeen, adminMetric(t, admin, "pinaka_quic_unvalidated_handshakes"))
	}
	cpu := procCPU(t, pid) - cpu0
	serverRetries := adminMetric(t, admin, "pinaka_quic_retries_total")
	t.Logf("flood: %d abandoned Initials (%d Retry packets back, %d other), %d handshakes (%d completed, %d failed, %d Retry packets seen by the clients); node CPU %v (%.0f µs per packet or handshake); %d bystander rounds; at most %v connections open, %v unvalidated handshakes; %v Retry decisions",
		garbage, rawRetries.Load(), rawOther.Load(), handshakes, completed.Load(), refused.Load(), clientRetries.Load(),
		cpu, float64(cpu.Microseconds())/float64(garbage+handshakes), int(rounds), maxActive, maxUnvalSeen, serverRetries)

	if rawRetries.Load() == 0 || clientRetries.Load() == 0 {
		t.Errorf("no Retry under the flood: %d to the abandoned Initials, %d to the clients", rawRetries.Load(), clientRetries.Load())
	}
	if maxUnvalSeen > maxUnval {
		t.Errorf("%v unvalidated handshakes held, cap %d", maxUnvalSeen, maxUnval)
	}
	if maxActive > maxConns {
		t.Errorf("%v connections held, MAX_CONNECTIONS %d", maxActive, maxConns)
	}
	if completed.Load() < handshakes/2 {
		t.Errorf("only %d of %d complete handshakes got through", completed.Load(), handshakes)
	}
	// The abandoned handshakes end at HEADER_READ_TIMEOUT: what stays open
	// is the bystanders (and the HTTP/2 connections of each round, closed
	// when the test ends).
	waitFor(t, "abandoned handshakes to time out", func() bool {
		return adminMetric(t, admin, "pinaka_quic_unvalidated_handshakes") == 0 &&
			adminMetric(t, admin, "pinaka_active_connections") <= baseline+rounds
	})
	if err := echoRound(h3str, "h3 after the flood"); err != nil {
		t.Fatalf("the HTTP/3 tunnel after the flood: %v", err)
	}

	// The handshake timeout is HEADER_READ_TIMEOUT: a few abandoned
	// Initials are still held 6 s later (past quic-go's default), and
	// gone after it.
	for range 10 {
		if _, err := raw.WriteTo(garbageInitial(), to); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "10 abandoned handshakes", func() bool {
		return adminMetric(t, admin, "pinaka_quic_unvalidated_handshakes") == 10
	})
	start := time.Now()
	time.Sleep(6 * time.Second)
	if n := adminMetric(t, admin, "pinaka_quic_unvalidated_handshakes"); n != 10 {
		t.Fatalf("%v of 10 abandoned handshakes left after 6 s, with HEADER_READ_TIMEOUT=%v", n, handshakeTime)
	}
	waitFor(t, "abandoned handshakes to time out", func() bool {
		return adminMetric(t, admin, "pinaka_quic_unvalidated_handshakes") == 0
	})
	t.Logf("abandoned handshakes dropped %v after they were seen", time.Since(start).Round(100*time.Millisecond))
}

// TestSIGHUPReloadsCertificateOnQUIC: after SIGHUP new QUIC handshakes get
// the new certificate; a QUIC connection opened before keeps its tunnel
// and can open new ones.
func TestSIGHUPReloadsCertificateOnQUIC(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath, "HTTP3_ENABLED=true")
	tok := testToken(t)
	origin := echoOrigin(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	quicCert := func() *x509.Certificate {
		c, err := h3Dial(ctx, nil, p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseWithError(0, "")
		return c.ConnectionState().TLS.PeerCertificates[0]
	}
	old, err := h3Dial(ctx, nil, p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer old.CloseWithError(0, "")
	first := old.ConnectionState().TLS.PeerCertificates[0]
	oldCC := h3Client(old)
	str, err := h3Tunnel(ctx, oldCC, origin, tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoRound(str, "before"); err != nil {
		t.Fatal(err)
	}

	writeCert(t, dir)
	p.Signal(syscall.SIGHUP)
	waitFor(t, "the new certificate on QUIC", func() bool { return !quicCert().Equal(first) })
	if !servingCert(t, p.Addr).Equal(quicCert()) {
		t.Fatal("TCP and QUIC serve different certificates after the reload")
	}
	if err := echoRound(str, "after the reload"); err != nil {
		t.Fatalf("the open tunnel after SIGHUP: %v", err)
	}
	str2, err := h3Tunnel(ctx, oldCC, origin, tok)
	if err != nil {
		t.Fatalf("a new tunnel on the connection opened before SIGHUP: %v", err)
	}
	if err := echoRound(str2, "new stream"); err != nil {
		t.Fatal(err)
	}
}
