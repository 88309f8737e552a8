//go:build !unix

package proxy

import (
	"errors"
	"syscall"
)

// Without a way to wait for readability, directions never park.
const canWaitReadable = false

func waitReadable(syscall.RawConn) error { return errors.ErrUnsupported }
