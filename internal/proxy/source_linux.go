package proxy

import (
	"errors"
	"io"

	"golang.org/x/sys/unix"
)

// sourceSupported: a source reads the origin socket with readv(2).
const sourceSupported = true

// ReadSource implements httpx.Source for a download direction handed to
// its HTTP/2 stream: the engine's writer reads the origin socket straight
// into its DATA frames, never waiting, and the bytes are accounted as
// write does.
func (d *direction) ReadSource(bufs [][]byte) (int, error) {
	var n int
	var rerr error
	err := d.src.plain.Read(func(fd uintptr) bool {
		n, rerr = unix.Readv(int(fd), bufs)
		return true // never wait for the socket: WaitReadable does that
	})
	switch {
	case err != nil:
		rerr = err
	case errors.Is(rerr, unix.EAGAIN):
		return 0, nil
	case rerr == nil && n <= 0:
		return 0, io.EOF
	}
	if rerr != nil {
		d.srcErr = rerr // a reset is reported once: keep it for finish
		return 0, rerr
	}
	d.t.watch.touch()
	d.moved.Add(int64(n))
	d.onBytes(n)
	return n, nil
}

// WaitReadable implements httpx.Source: the parker holds d, as it holds a
// quiet direction, and runs ready instead of d when the socket is readable.
func (d *direction) WaitReadable(ready func()) bool {
	return d.t.parker.parkReady(d, ready) == nil
}

// Returned implements httpx.Source: the stream is done with d (the origin
// ended or failed, or the stream can no longer send). d relays itself from
// now on, and finds the end, or the failure, as it would have without a
// source.
func (d *direction) Returned() {
	d.t.parker.unpark(d)
	d.sourcing = false
	if err := d.srcErr; err != nil {
		d.finish(err)
		return
	}
	d.run()
}
