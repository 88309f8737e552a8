package server

import (
	"crypto/tls"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/metrics"
	"github.com/pinaka-proxy/pinaka/internal/proxy"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// wrapped stands for the listener wrappers between the TLS connection and
// the socket (connection limit, write batching).
type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

func userTimeout(t *testing.T, c net.Conn) time.Duration {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ms int
	var gerr error
	rc.Control(func(fd uintptr) { ms, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	return time.Duration(ms) * time.Millisecond
}

// The guard finds the socket under a TLS connection and its wrappers.
func TestGuardWriteStallReachesTheSocket(t *testing.T) {
	server, _ := testutil.TCPPair(t)
	if got := userTimeout(t, server); got != 0 {
		t.Fatalf("TCP_USER_TIMEOUT before = %v", got)
	}
	tc := tls.Server(wrapped{server}, &tls.Config{})
	if err := guardWriteStall(tc, writeStallTimeout); err != nil {
		t.Fatal(err)
	}
	if got := userTimeout(t, server); got != writeStallTimeout {
		t.Fatalf("TCP_USER_TIMEOUT = %v, want %v", got, writeStallTimeout)
	}
	if err := guardWriteStall(wrapped{nil}, time.Second); !errors.Is(err, errors.ErrUnsupported) {
		// A chain without a socket reports it rather than passing silently.
		t.Fatalf("no socket: %v", err)
	}
}

// The kernel enforces it: writes to a peer that stopped reading fail once
// its window has been shut for the timeout.
func TestGuardWriteStallEndsStalledWrites(t *testing.T) {
	server, _ := testutil.TCPPair(t) // the client never reads
	if err := guardWriteStall(server, time.Second); err != nil {
		t.Fatal(err)
	}
	// A generous bound on how long the kernel takes: this checks that the
	// write fails at all, not how fast.
	server.SetWriteDeadline(time.Now().Add(60 * time.Second))
	chunk := make([]byte, 64<<10)
	var err error
	for err == nil {
		_, err = server.Write(chunk)
	}
	if !errors.Is(err, syscall.ETIMEDOUT) {
		t.Fatalf("stalled write ended with %v, want ETIMEDOUT from the kernel", err)
	}
}

// Every write to a client, the relay's batched flushes included, passes
// the stall guard: batching sits above it in the listener stack, so a
// flush blocked on a client that does not read is seen and closed.
func TestBatchedWritesPassTheStallGuard(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{cfg: &config.Config{MaxConnections: 10, TunnelIdleTimeout: time.Minute}, metrics: metrics.New()}
	ln := s.stackListener(raw)
	defer ln.Close()
	defer s.stalls.close()
	client, err := net.Dial("tcp", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// TLS writes to the batching connection; beneath it is the stall
	// guard's, so every write, batched or not, is timed.
	nc, ok := c.(interface{ NetConn() net.Conn })
	if !ok {
		t.Fatalf("accepted %T, want the batching connection", c)
	}
	if _, ok := nc.NetConn().(*stallConn); !ok {
		t.Fatalf("beneath the batching connection is %T, want the stall guard's", nc.NetConn())
	}
	// And the socket is still found beneath it all (parking, TCP options).
	if proxy.RawSocket(c) == nil {
		t.Fatal("no socket found beneath the listener stack")
	}
}
