package proxy

import (
	"net"
	"sync/atomic"
	"time"
)

// Woken relay directions run on goroutines that are reused. The direction
// that ends a tunnel writes its record (finishTiming alone has a 1.3 KB
// frame, then the log line), and on a fresh goroutine that grew the stack
// by copying it: 4% of the proxy's CPU per warm HTTP/2 CONNECT. A goroutine
// whose direction parked or ended waits a moment for the next one instead
// of exiting; at most maxIdleRelays wait, each at most relayIdle, so an
// idle node keeps none.
const (
	maxIdleRelays = 16
	relayIdle     = time.Second
)

// relayJob is a direction to run, or to finish with net.ErrClosed (a
// parked direction of a tunnel that closes).
type relayJob struct {
	d      *direction
	finish bool
}

func (j relayJob) do() {
	if j.finish {
		j.d.finish(net.ErrClosed)
		return
	}
	j.d.run()
}

type relayWorkers struct {
	work chan relayJob // unbuffered: a send succeeds only if a worker waits
	idle atomic.Int32
}

func newRelayWorkers() relayWorkers { return relayWorkers{work: make(chan relayJob)} }

// run does j on a waiting goroutine, or a new one.
func (w *relayWorkers) run(j relayJob) {
	select {
	case w.work <- j:
	default:
		go w.loop(j)
	}
}

func (w *relayWorkers) loop(j relayJob) {
	var t *time.Timer
	for {
		j.do()
		if w.idle.Add(1) > maxIdleRelays {
			w.idle.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(relayIdle)
		} else {
			t.Reset(relayIdle)
		}
		select {
		case j = <-w.work:
			w.idle.Add(-1)
			t.Stop()
		case <-t.C:
			w.idle.Add(-1)
			return
		}
	}
}
