package proxy

import (
	"errors"
	"io"
	"sync/atomic"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// closeSpy is a server body that says when a Read began and notes
// whether it was closed.
type closeSpy struct {
	io.Reader
	reading chan struct{}
	closed  atomic.Bool
}

func (c *closeSpy) Read(p []byte) (int, error) {
	select {
	case c.reading <- struct{}{}:
	default:
	}
	return c.Reader.Read(p)
}

func (c *closeSpy) Close() error { c.closed.Store(true); return nil }

// Close returns while the transport's Read waits for the client, leaves
// the server's body to net/http, and fails later Reads: Go 1.27's
// ReverseProxy calls it as its ServeHTTP returns, and the answer to an
// early response is sent only after that.
func TestRequestBodyCloseDoesNotWaitForTheClient(t *testing.T) {
	pr, pw := io.Pipe()
	spy := &closeSpy{Reader: pr, reading: make(chan struct{}, 1)}
	b := &requestBody{ReadCloser: spy, p: &Proxy{opt: Options{Metrics: metrics.New()}}}
	read := make(chan error, 1)
	go func() {
		_, err := b.Read(make([]byte, 8))
		read <- err
	}()
	<-spy.reading
	if err := b.Close(); err != nil { // a Close that waited would hang here
		t.Fatal(err)
	}
	if spy.closed.Load() {
		t.Error("Close closed the server's body, which drains what the client still sends")
	}
	if _, err := pw.Write([]byte("late")); err != nil { // the client sends more
		t.Fatal(err)
	}
	if err := <-read; err != nil {
		t.Fatalf("the pending Read: %v", err)
	}
	if _, err := b.Read(make([]byte, 8)); !errors.Is(err, errBodyClosed) {
		t.Errorf("Read after Close = %v, want errBodyClosed", err)
	}
}
