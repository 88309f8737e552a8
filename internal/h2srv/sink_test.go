package h2srv

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/url"
	"sync"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// testSink is an httpx.Sinker sink that takes at most limit bytes per
// call (all when limit < 0) or fails with err.
type testSink struct {
	mu    sync.Mutex
	got   bytes.Buffer
	calls int
	limit int
	err   error
}

func (k *testSink) write(bufs [][]byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls++
	if k.err != nil {
		return 0, k.err
	}
	n := 0
	for _, b := range bufs {
		if k.limit >= 0 {
			b = b[:min(len(b), k.limit-n)]
		}
		k.got.Write(b)
		n += len(b)
	}
	return n, nil
}

func (k *testSink) set(limit int, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.limit, k.err = limit, err
}

func (k *testSink) state() (int, int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.got.Len(), k.calls
}

// A detached stream with a sink: while its reader is parked on ReadReady,
// DATA goes to the sink (and its window comes back, or an upload of more
// than the stream window would stall); what the sink leaves wakes the
// reader and is read in order; after a sink error the sink is not used.
func TestSinkTakesDataWhileParked(t *testing.T) {
	streams := make(chan httpx.Stream, 1)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		st, err := w.(httpx.Detacher).Detach()
		if err != nil {
			t.Errorf("Detach: %v", err)
			return
		}
		streams <- st
	})})
	cc := dialH2(t, addr)
	pr, pw := io.Pipe()
	defer pw.Close()
	req := &http.Request{Method: "CONNECT", Host: "example.com:443", URL: &url.URL{Host: "example.com:443"}, Header: http.Header{}, Body: pr}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	st := recv(t, streams, "the detached stream")
	defer st.Close()

	k := &testSink{limit: -1}
	st.(httpx.Sinker).SetSink(k.write)
	woke := make(chan struct{}, 1)
	park := func() {
		t.Helper()
		if !st.ReadReady(func() { woke <- struct{}{} }) {
			t.Fatal("ReadReady: readable with nothing sent")
		}
	}
	send := func(n int) []byte {
		t.Helper()
		b := make([]byte, n)
		_, _ = rand.Read(b)
		if _, err := pw.Write(b); err != nil {
			t.Fatalf("client write: %v", err)
		}
		return b
	}

	// 1. Three stream windows' worth, all through the sink: the reader is
	// never woken.
	park()
	sent := send(3 * defaultStreamWindow(t))
	waitFor(t, "the sink to take the upload", func() bool { n, _ := k.state(); return n == len(sent) })
	select {
	case <-woke:
		t.Fatal("the parked reader was woken although the sink took everything")
	default:
	}
	if !bytes.Equal(k.got.Bytes(), sent) {
		t.Fatal("the sink got other bytes than were sent")
	}

	// 2. The sink takes part: the reader wakes and reads the rest, in order.
	k.set(10000, nil)
	k.got.Reset()
	sent = send(40000)
	recv(t, woke, "the reader to be woken for what the sink left")
	rest := make([]byte, 0, len(sent))
	buf := make([]byte, 64<<10)
	for len(k.got.Bytes())+len(rest) < len(sent) {
		n, err := st.Read(buf)
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		rest = append(rest, buf[:n]...)
	}
	if got := append(bytes.Clone(k.got.Bytes()), rest...); !bytes.Equal(got, sent) {
		t.Fatalf("sink (%d bytes) and Read (%d bytes) do not add up to what was sent", k.got.Len(), len(rest))
	}

	// 3. A sink error: the reader wakes, reads the data, and the sink is
	// not called again.
	boom := errors.New("upstream gone")
	k.set(-1, boom)
	park()
	sent = send(100)
	recv(t, woke, "the reader to be woken after the sink failed")
	_, calls := k.state()
	if n, err := io.ReadFull(st, buf[:100]); err != nil || !bytes.Equal(buf[:n], sent) {
		t.Fatalf("Read after the sink failed: %d bytes, %v", n, err)
	}
	park()
	sent = send(100)
	recv(t, woke, "the reader to be woken, with no sink")
	if _, c := k.state(); c != calls {
		t.Errorf("the sink was called %d times after it failed", c-calls)
	}
	if n, err := io.ReadFull(st, buf[:100]); err != nil || !bytes.Equal(buf[:n], sent) {
		t.Fatalf("Read without a sink: %d bytes, %v", n, err)
	}
}

func defaultStreamWindow(*testing.T) int {
	var c Config
	c.defaults()
	return int(c.StreamWindow)
}
