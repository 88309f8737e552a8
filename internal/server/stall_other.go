//go:build !linux

package server

import (
	"errors"
	"net"
	"time"
)

// kernelStallGuard: no TCP_USER_TIMEOUT here; HTTP/2 connections rely on
// the stall guard alone (stallguard.go), which goes by a write's age.
const kernelStallGuard = false

func guardWriteStall(net.Conn, time.Duration) error { return errors.ErrUnsupported }

// socketOutq: no TIOCOUTQ here; the stall guard goes by the pending
// write's age alone.
func socketOutq(net.Conn) (int, bool) { return 0, false }
