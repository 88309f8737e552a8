package main

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"
)

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
	n  int // Write calls
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	return l.b.Write(p)
}

func (l *lockedBuf) snapshot() (string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String(), l.n
}

func TestLogWriterBatchesAndFlushes(t *testing.T) {
	out := &lockedBuf{}
	w := newLogWriter(out)
	for i := 0; i < 100; i++ {
		w.Write([]byte("line\n"))
	}
	if s, _ := out.snapshot(); s != "" {
		t.Fatalf("written before a flush: %q", s)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, n := out.snapshot()
		if strings.Count(s, "line\n") == 100 {
			if n != 1 {
				t.Errorf("100 lines took %d writes, want 1", n)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lines never flushed by the ticker")
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.Write([]byte("last\n"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if s, _ := out.snapshot(); !strings.HasSuffix(s, "last\n") {
		t.Error("Close did not flush the last line")
	}
}
