package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// parker holds the relay directions that went quiet (see parkAfter) and
// runs each again when its socket becomes readable. One epoll instance and
// one goroutine wait for all of them, so a parked direction costs a map
// entry instead of a goroutine and its stack: an idle HTTP/1.1 tunnel has
// two parked directions, an idle HTTP/2 stream one.
//
// Go's own netpoller keeps every socket in its epoll set; a second epoll
// set may hold the same socket, and it only reports readiness, so the
// socket's reads stay with Go. Directions are registered level-triggered
// and one-shot: bytes that arrived before the registration wake the
// direction at once, and each registration wakes it at most once.
//
// Ownership: a parked direction belongs to the parker until it is taken
// out of parked, under mu, either by the poll loop (which runs it) or by
// release (the tunnel is closing). A tunnel's sockets are closed only after
// release, which also marks the tunnel so that a direction parking at that
// moment is refused: an fd number in parked always names the socket that
// was registered, and no direction is left parked on a closed socket.
type parker struct {
	log    *slog.Logger
	once   sync.Once
	err    error // set when epoll could not be set up: nothing parks
	epfd   int
	wakefd int // an eventfd; close writes it to end the poll loop

	mu     sync.Mutex
	parked map[int32]*direction
	closed bool

	// streams counts directions parked on an HTTP/2 stream (the engine
	// holds them, not epoll), for len.
	streams atomic.Int64

	// workers run the directions that wake.
	workers relayWorkers
}

func newParker(log *slog.Logger) *parker { return &parker{log: log, workers: newRelayWorkers()} }

// start sets up epoll and the poll loop on first use.
func (p *parker) start() error {
	p.once.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			p.err = fmt.Errorf("creating the epoll instance for idle tunnels: %w", err)
			p.log.Warn("idle tunnel directions will not park", "err", p.err)
			return
		}
		wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err == nil {
			err = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)})
		}
		if err != nil {
			unix.Close(epfd)
			p.err = fmt.Errorf("creating the wake-up eventfd for idle tunnels: %w", err)
			p.log.Warn("idle tunnel directions will not park", "err", p.err)
			return
		}
		p.mu.Lock()
		p.epfd, p.wakefd = epfd, wakefd
		p.parked = make(map[int32]*direction)
		p.mu.Unlock()
		go p.loop()
	})
	return p.err
}

var errParkerClosed = errors.New("parker closed")

// park registers d, whose source socket has been quiet, to run again when
// the socket is readable. On error d was not registered and stays with the
// caller.
func (p *parker) park(d *direction) error {
	if err := p.start(); err != nil {
		return err
	}
	var err error
	// Control keeps the fd open while it is registered.
	cerr := d.src().raw.Control(func(fd uintptr) {
		p.mu.Lock()
		defer p.mu.Unlock()
		switch {
		case p.closed:
			err = errParkerClosed
			return
		case d.t.released:
			err = net.ErrClosed
			return
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd)}
		if err = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); err != nil {
			err = fmt.Errorf("registering a parked socket: %w", err)
			return
		}
		p.parked[int32(fd)] = d
		d.parkedFD = int32(fd)
	})
	if cerr != nil {
		return cerr
	}
	return err
}

// release is called once, before t closes its sockets: it takes t's
// parked directions back and refuses them from then on. It reports which
// it took; the caller finishes those.
func (p *parker) release(t *tunnel) (up, down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t.released = true
	take := func(d *direction) bool {
		if d.parkedFD < 0 || p.parked[d.parkedFD] != d {
			return false
		}
		p.take(d.parkedFD)
		return true
	}
	return take(&t.up), take(&t.down)
}

// take removes a parked direction. p.mu is held.
func (p *parker) take(fd int32) *direction {
	d := p.parked[fd]
	delete(p.parked, fd)
	d.parkedFD = -1
	// Still open: a tunnel closes its sockets only after release.
	_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	return d
}

// loop runs directions whose sockets became readable. A wake-up that finds
// nothing to read (an event for a socket that was released and whose fd
// number was reused by another parked socket) costs a read that times out
// and a new park.
func (p *parker) loop() {
	events := make([]unix.EpollEvent, 128)
	var wake []*direction
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// Not expected with valid arguments; directions parked now
			// would never wake, so run them and let them block in Read.
			p.log.Error("waiting for parked tunnel directions failed; parking stops", "err", err)
			p.shutdown()
			return
		}
		p.mu.Lock()
		for _, ev := range events[:n] {
			if ev.Fd == int32(p.wakefd) {
				p.mu.Unlock()
				p.shutdown()
				return
			}
			if p.parked[ev.Fd] != nil {
				wake = append(wake, p.take(ev.Fd))
			}
		}
		p.mu.Unlock()
		for i, d := range wake {
			p.workers.run(relayJob{d: d})
			wake[i] = nil
		}
		wake = wake[:0]
	}
}

// shutdown ends parking: directions still parked run again (they read
// without parking from now on) and the epoll descriptors close. The
// descriptors close under mu, so close never writes to a reused fd.
func (p *parker) shutdown() {
	p.mu.Lock()
	p.closed = true
	var wake []*direction
	for fd := range p.parked {
		wake = append(wake, p.take(fd))
	}
	unix.Close(p.wakefd)
	unix.Close(p.epfd)
	p.mu.Unlock()
	for _, d := range wake {
		p.workers.run(relayJob{d: d})
	}
}

// close ends the poll loop, if it was started.
func (p *parker) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.parked != nil && !p.closed {
		one := [8]byte{1} // any non-zero count makes the eventfd readable
		_, _ = unix.Write(p.wakefd, one[:])
	}
}

// len is the number of parked directions.
func (p *parker) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.parked) + int(p.streams.Load())
}
