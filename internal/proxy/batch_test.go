package proxy

import (
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Batched writes reach the socket whole and in order while another
// goroutine writes directly, and nothing is lost or duplicated. A direct
// write during a batch joins it, after what the batch already holds: a
// write that returned before another began comes first on the wire. Every
// write carries 7-byte tokens: B and its number, d and the number of B
// tokens whose writes had returned when it began.
func TestBatchConnKeepsOrderAndBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bl := BatchListener(ln)
	defer bl.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sc, err := bl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	bc, ok := under[*batchConn](sc)
	if !ok {
		t.Fatal("accepted connection is not batched")
	}
	const rounds, writesPerBatch, tokensPerWrite = 200, 3, 100
	tokens := func(kind byte, first, n int) []byte {
		var b []byte
		for i := range n {
			b = fmt.Appendf(b, "%c%06d", kind, first+i)
		}
		return b
	}
	var returned atomic.Int64 // B tokens whose Write has returned
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		next := 0
		for range rounds {
			bc.startBatch()
			for range writesPerBatch {
				w := tokens('B', next, tokensPerWrite)
				next += tokensPerWrite
				if n, err := bc.Write(w); n != len(w) || err != nil {
					t.Errorf("batched write: %d %v", n, err)
				}
				returned.Add(tokensPerWrite)
			}
			if err := bc.flushBatch(); err != nil {
				t.Error(err)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range rounds {
			if _, err := bc.Write(tokens('d', int(returned.Load()), 1)); err != nil {
				t.Error(err)
			}
		}
	}()
	got := make(chan []byte)
	go func() { b, _ := io.ReadAll(client); got <- b }()
	wg.Wait()
	sc.Close()
	b := <-got
	wantB := rounds * writesPerBatch * tokensPerWrite
	if len(b) != 7*(wantB+rounds) {
		t.Fatalf("read %d bytes, want %d", len(b), 7*(wantB+rounds))
	}
	bs, ds := 0, 0
	for i := 0; i < len(b); i += 7 {
		tok := string(b[i : i+7])
		switch tok[0] {
		case 'B':
			if want := fmt.Sprintf("B%06d", bs); tok != want {
				t.Fatalf("token %d is %q, want %q: batched bytes reordered or torn", i/7, tok, want)
			}
			bs++
		case 'd':
			var before int
			if _, err := fmt.Sscanf(tok[1:], "%d", &before); err != nil || before > bs {
				t.Fatalf("token %d %q: a direct write overtook %d batched tokens that were written before it", i/7, tok, before-bs)
			}
			ds++
		default:
			t.Fatalf("token %d is %q: torn write", i/7, tok)
		}
	}
	if bs != wantB || ds != rounds {
		t.Fatalf("%d B and %d d tokens, want %d and %d", bs, ds, wantB, rounds)
	}
	if bc.buf != nil {
		t.Error("batch buffer still held after flush")
	}
}
