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
