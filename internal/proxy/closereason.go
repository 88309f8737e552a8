package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
)

// Who ended a tunnel first (tunnel.firstEnd), for the record's
// close_reason.
const (
	endNone int32 = iota
	endClient
	endOrigin
	endError
)

var endNames = [...]string{endNone: "", endClient: "client_closed", endOrigin: "origin_closed", endError: "error"}

// writeError is a direction's failed write: its destination ended, not its
// source.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// noteEnd records, if no direction ended before, which side ended the one
// that just finished: its source, whose read ended (EOF, a reset, a closed
// stream), or its destination, whose write failed. A socket error that is
// not a way of closing (a TLS error, a timeout) is endError. An HTTP/2
// stream's errors all mean the client ended it (reset, connection lost).
func (t *tunnel) noteEnd(src, dst int32, err error) {
	if t.firstEnd.Load() != endNone {
		return
	}
	side, ep := src, t.client
	if src == endOrigin {
		ep = t.upstream
	}
	var we *writeError
	if errors.As(err, &we) {
		side, ep = dst, t.client
		if dst == endOrigin {
			ep = t.upstream
		}
	}
	if err != nil && ep.stream == nil && !isCloseError(err) {
		side = endError
	}
	t.firstEnd.CompareAndSwap(endNone, side)
}

// isCloseError reports whether err is how a socket reports that its peer
// (or we) closed or reset it.
func isCloseError(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, io.ErrShortWrite)
}

// closeReason is the record's close_reason of a tunnel that ended so.
func (r relayResult) closeReason() string {
	if r.end != "" {
		return r.end
	}
	return r.closedBy
}
