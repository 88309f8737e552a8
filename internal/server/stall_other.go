//go:build !linux

package server

import (
	"errors"
	"net"
	"time"
)

// kernelStallGuard: without TCP_USER_TIMEOUT, HTTP/2 uses WriteByteTimeout.
const kernelStallGuard = false

func guardWriteStall(net.Conn, time.Duration) error { return errors.ErrUnsupported }

// socketOutq: no TIOCOUTQ here; the stall guard goes by the pending
// write's age alone.
func socketOutq(net.Conn) (int, bool) { return 0, false }
