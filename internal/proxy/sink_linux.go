package proxy

import (
	"errors"

	"golang.org/x/sys/unix"
)

// sinkSupported: a sink writes the upstream socket with writev(2).
const sinkSupported = true

// sink is the upload direction's httpx.Sinker sink: the engine's reader
// hands it the DATA a parked tunnel received, and it writes as much as the
// upstream socket takes now, in one writev(2), accounting as write does.
// It never blocks: what the socket does not take stays with the stream,
// and the direction's goroutine starts to write it.
func (d *direction) sink(bufs [][]byte) (int, error) {
	var n int
	var werr error
	err := d.dst().raw.Write(func(fd uintptr) bool {
		n, werr = unix.Writev(int(fd), bufs)
		return true // never wait for the socket: that is the relay's job
	})
	if n < 0 {
		n = 0
	}
	if errors.Is(werr, unix.EAGAIN) {
		werr = nil
	}
	if n > 0 {
		d.t.watch.touch()
		d.moved.Add(int64(n))
		d.counted(n)
	}
	if err == nil {
		err = werr
	}
	return n, err
}
