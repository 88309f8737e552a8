package server

import (
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pinaka-proxy/pinaka/internal/proxy"
)

// kernelStallGuard: the kernel enforces writeStallTimeout on HTTP/2
// connections (see guardWriteStall), under the stall guard.
const kernelStallGuard = true

// guardWriteStall sets TCP_USER_TIMEOUT on the socket under c: the kernel
// drops the connection when written bytes stay unacknowledged, or unsent
// behind a zero window, for d, without a write deadline set and cleared
// around every write (timer updates: 11% of the proxy's CPU on an HTTP/2
// tunnel download when x/net's server did that).
func guardWriteStall(c net.Conn, d time.Duration) error {
	rc := proxy.RawSocket(c)
	if rc == nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT on %T: %w", c, errors.ErrUnsupported)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	}); err != nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("setting TCP_USER_TIMEOUT: %w", serr)
	}
	return nil
}

// socketOutq is the number of bytes written to c's socket that the peer
// has not yet acknowledged (TIOCOUTQ).
func socketOutq(c net.Conn) (int, bool) {
	rc := proxy.RawSocket(c)
	if rc == nil {
		return 0, false
	}
	var n int
	var err error
	if cerr := rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.TIOCOUTQ) }); cerr != nil || err != nil {
		return 0, false
	}
	return n, true
}
