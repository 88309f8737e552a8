package h2srv

import (
	"sync"
	"sync/atomic"
	"time"
)

// Handler goroutines are reused. A handler's stack grows through
// authentication and an upstream dial to 16 KiB or more, and a new
// goroutine for every stream paid for that growth again (copystack was 7%
// of a warm CONNECT's CPU). A goroutine whose handler returned waits a
// moment for the next stream instead of exiting; at most maxIdleWorkers
// wait, so what a burst leaves behind is bounded, and each waits at most
// workerIdle, so an idle server keeps none.
const (
	maxIdleWorkers = 16
	workerIdle     = time.Second
)

// workers hands streams' handlers to waiting goroutines. Without a
// connection there is no stream to wait for: a worker then exits as soon
// as its handler returns, and connEnded sends the waiting ones away.
type workers struct {
	work  chan func() // unbuffered: a send succeeds only if a worker waits
	idle  atomic.Int32
	conns atomic.Int32 // the server's connections

	mu   sync.Mutex
	quit chan struct{} // closed by connEnded when the last connection ends
}

func newWorkers() *workers { return &workers{work: make(chan func()), quit: make(chan struct{})} }

// connEnded is told when a connection of the server ends.
func (w *workers) connEnded() {
	if w.conns.Add(-1) > 0 {
		return
	}
	w.mu.Lock()
	close(w.quit)
	w.quit = make(chan struct{})
	w.mu.Unlock()
}

func (w *workers) quitting() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.quit
}

// run runs f on a waiting goroutine, or a new one.
func (w *workers) run(f func()) {
	select {
	case w.work <- f:
	default:
		go w.loop(f)
	}
}

func (w *workers) loop(f func()) {
	var t *time.Timer
	for {
		f()
		if w.conns.Load() == 0 {
			return
		}
		quit := w.quitting()
		if w.idle.Add(1) > maxIdleWorkers {
			w.idle.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(workerIdle)
		} else {
			t.Reset(workerIdle)
		}
		select {
		case f = <-w.work:
			w.idle.Add(-1)
			t.Stop()
		case <-t.C:
			w.idle.Add(-1)
			return
		case <-quit:
			w.idle.Add(-1)
			t.Stop()
			return
		}
	}
}
