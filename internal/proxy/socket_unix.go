//go:build unix

package proxy

import "syscall"

const canWaitReadable = true

// waitReadable blocks until the socket has bytes to read, EOF or an error,
// without reading anything: an idle direction waits with no buffer. The
// peek is what makes the wait safe: RawConn.Read parks only after the
// callback saw EAGAIN, so readiness that came before the wait is not lost.
func waitReadable(rc syscall.RawConn) error {
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK)
			if err == syscall.EINTR {
				continue
			}
			return err != syscall.EAGAIN
		}
	})
}
