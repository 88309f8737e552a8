package main

import (
	"bufio"
	"io"
	"sync"
	"time"
)

// logWriter batches log lines into fewer write syscalls. slog writes each
// record with one Write, and a busy proxy writes a record line per request:
// unbuffered, that is a syscall per request on the hot path. Lines reach
// the output within flushEvery, when 64 KiB are pending, and at Close. A
// crash can lose at most the last flushEvery of lines; the shipped records
// are unaffected (they go through the shipper's own queue and spool).
type logWriter struct {
	mu   sync.Mutex
	w    *bufio.Writer
	stop chan struct{}
	done chan struct{}
}

const logFlushEvery = 100 * time.Millisecond

func newLogWriter(out io.Writer) *logWriter {
	l := &logWriter{w: bufio.NewWriterSize(out, 64<<10), stop: make(chan struct{}), done: make(chan struct{})}
	go l.flushLoop()
	return l
}

func (l *logWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (l *logWriter) Flush() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Flush()
}

func (l *logWriter) flushLoop() {
	defer close(l.done)
	t := time.NewTicker(logFlushEvery)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			_ = l.Flush()
		case <-l.stop:
			return
		}
	}
}

// Close stops the flusher and writes what is pending.
func (l *logWriter) Close() error {
	close(l.stop)
	<-l.done
	return l.Flush()
}
