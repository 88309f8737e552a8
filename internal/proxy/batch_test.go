package proxy

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
)

// Batched writes reach the socket whole and in order while another
// goroutine writes directly, and nothing is lost or duplicated.
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
	const rounds = 200
	batch := bytes.Repeat([]byte("B"), 3*1000) // three writes of 1000 per batch
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for range rounds {
			bc.startBatch()
			for i := range 3 {
				if n, err := bc.Write(batch[i*1000 : (i+1)*1000]); n != 1000 || err != nil {
					t.Errorf("batched write: %d %v", n, err)
				}
			}
			if err := bc.flushBatch(); err != nil {
				t.Error(err)
			}
		}
	}()
	go func() {
		defer wg.Done()
		for range rounds {
			if _, err := bc.Write([]byte("d")); err != nil {
				t.Error(err)
			}
		}
	}()
	got := make(chan []byte)
	go func() { b, _ := io.ReadAll(client); got <- b }()
	wg.Wait()
	sc.Close()
	b := <-got
	if len(b) != rounds*(len(batch)+1) {
		t.Fatalf("read %d bytes, want %d", len(b), rounds*(len(batch)+1))
	}
	// Direct writes may fall between batches, never inside one.
	for _, run := range bytes.Split(b, []byte("d")) {
		if len(run)%len(batch) != 0 {
			t.Fatalf("a batch was split: run of %d bytes", len(run))
		}
	}
	if bc.buf != nil {
		t.Error("batch buffer still held after flush")
	}
}
