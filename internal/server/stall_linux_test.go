package server

import (
	"crypto/tls"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
