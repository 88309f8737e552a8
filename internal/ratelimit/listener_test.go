package ratelimit

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// failsafe bounds blocking reads so that a broken limiter fails the test
// instead of hanging it; no passing run comes near it.
const failsafe = 10 * time.Second

// counters records the LimitListener callbacks.
type counters struct {
	accepted, closed, refused atomic.Int64
	closedCh                  chan struct{} // one send per onClose
}

func newCounters() *counters { return &counters{closedCh: make(chan struct{}, 100)} }

func (c *counters) listen(t *testing.T, max int) net.Listener {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening on loopback: %v", err)
	}
	ln := LimitListener(raw, ListenerLimits{
		Max:       max,
		OnAccept:  func() { c.accepted.Add(1) },
		OnClose:   func() { c.closed.Add(1); c.closedCh <- struct{}{} },
		OnRefused: func(string) { c.refused.Add(1) },
	})
	t.Cleanup(func() { ln.Close() })
	return ln
}

// acceptLoop hands every accepted connection to the returned channel, the
// way a server's accept loop would, until the listener is closed.
func acceptLoop(t *testing.T, ln net.Listener) <-chan net.Conn {
	t.Helper()
	conns := make(chan net.Conn, 10)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Accept: %v", err)
				}
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(conns)
		for c := range conns {
			c.Close()
		}
	})
	return conns
}

func dial(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dialing %s: %v", ln.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(failsafe))
	return c
}

func receive(t *testing.T, conns <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-conns:
		return c
	case <-time.After(failsafe):
		t.Fatal("connection never accepted")
		return nil
	}
}

// served checks that client and server ends are connected by sending a line
// each way.
func served(t *testing.T, client, server net.Conn) {
	t.Helper()
	server.SetDeadline(time.Now().Add(failsafe))
	if _, err := io.WriteString(client, "ping\n"); err != nil {
		t.Fatalf("client write: %v", err)
	}
	if line, err := bufio.NewReader(server).ReadString('\n'); err != nil || line != "ping\n" {
		t.Fatalf("server read = %q, %v", line, err)
	}
	if _, err := io.WriteString(server, "pong\n"); err != nil {
		t.Fatalf("server write: %v", err)
	}
	if line, err := bufio.NewReader(client).ReadString('\n'); err != nil || line != "pong\n" {
		t.Fatalf("client read = %q, %v", line, err)
	}
}

// shed checks that the server closed the client's connection without
// serving it.
func shed(t *testing.T, client net.Conn) {
	t.Helper()
	var buf [1]byte
	if n, err := client.Read(buf[:]); err != io.EOF {
		t.Fatalf("read on a connection over the limit = %d, %v; want EOF", n, err)
	}
}

func TestLimitListenerShedsOverLimit(t *testing.T) {
	cnt := newCounters()
	ln := cnt.listen(t, 2)
	conns := acceptLoop(t, ln)

	c1 := dial(t, ln)
	s1 := receive(t, conns)
	c2 := dial(t, ln)
	s2 := receive(t, conns)

	c3 := dial(t, ln)
	shed(t, c3)
	if got := cnt.refused.Load(); got != 1 {
		t.Fatalf("onRefused called %d times, want 1", got)
	}

	// The first two are still open and working.
	served(t, c1, s1)
	served(t, c2, s2)

	// Freeing a slot lets a new client in.
	s1.Close()
	<-cnt.closedCh
	c4 := dial(t, ln)
	s4 := receive(t, conns)
	served(t, c4, s4)

	if a, c, r := cnt.accepted.Load(), cnt.closed.Load(), cnt.refused.Load(); a != 3 || c != 1 || r != 1 {
		t.Fatalf("accepted/closed/refused = %d/%d/%d, want 3/1/1", a, c, r)
	}
}

func TestLimitListenerDoubleCloseFreesOneSlot(t *testing.T) {
	cnt := newCounters()
	ln := cnt.listen(t, 2)
	conns := acceptLoop(t, ln)

	dial(t, ln)
	s1 := receive(t, conns)
	dial(t, ln)
	receive(t, conns)

	if err := s1.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := s1.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Close = %v, want net.ErrClosed", err)
	}
	if got := cnt.closed.Load(); got != 1 {
		t.Fatalf("onClose called %d times for one connection, want 1", got)
	}

	// One slot is free, not two.
	c3 := dial(t, ln)
	s3 := receive(t, conns)
	served(t, c3, s3)
	shed(t, dial(t, ln))
}

func TestLimitListenerConcurrentClose(t *testing.T) {
	cnt := newCounters()
	ln := cnt.listen(t, 1)
	conns := acceptLoop(t, ln)

	dial(t, ln)
	s := receive(t, conns)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { s.Close() })
	}
	wg.Wait()
	if got := cnt.closed.Load(); got != 1 {
		t.Fatalf("onClose called %d times under concurrent Close, want 1", got)
	}
	if n := len(ln.(*limitListener).l.slots); n != 0 {
		t.Fatalf("%d slots in use after close, want 0", n)
	}
}

func TestLimitListenerAcceptAfterClose(t *testing.T) {
	cnt := newCounters()
	ln := cnt.listen(t, 1)
	ln.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on a closed listener = %v, want net.ErrClosed", err)
	}
}

func TestLimitListenerCloseWrite(t *testing.T) {
	cnt := newCounters()
	ln := cnt.listen(t, 1)
	conns := acceptLoop(t, ln)

	c := dial(t, ln)
	s := receive(t, conns)
	cw, ok := s.(interface{ CloseWrite() error })
	if !ok {
		t.Fatal("accepted connection does not expose CloseWrite")
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	// The client sees EOF while it can still send.
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read after server half-close = %v, want EOF", err)
	}
	if _, err := io.WriteString(c, "late\n"); err != nil {
		t.Fatalf("client write after server half-close: %v", err)
	}
	s.SetDeadline(time.Now().Add(failsafe))
	if line, err := bufio.NewReader(s).ReadString('\n'); err != nil || line != "late\n" {
		t.Fatalf("server read after its half-close = %q, %v", line, err)
	}
	if _, ok := s.(interface{ NetConn() net.Conn }).NetConn().(*net.TCPConn); !ok {
		t.Fatal("NetConn does not return the TCP connection")
	}
}

// TestLimitListenerTLSHTTPServer runs net/http's Server over TLS over the
// limited listener, as the proxy does, and checks that every connection the
// server closes gives its slot back exactly once.
func TestLimitListenerTLSHTTPServer(t *testing.T) {
	cnt := newCounters()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello")
	}))
	srv.Listener.Close()
	srv.Listener = cnt.listen(t, 1)
	limited := srv.Listener.(*limitListener)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()

	client := srv.Client()
	client.Transport.(*http.Transport).DisableKeepAlives = true
	for i := range 3 {
		resp, err := client.Get(srv.URL)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(body) != "hello" {
			t.Fatalf("request %d body = %q, %v", i+1, body, err)
		}
		// With one slot, the next request needs this connection closed
		// first; wait for the server to do so.
		select {
		case <-cnt.closedCh:
		case <-time.After(failsafe):
			t.Fatalf("server never closed connection %d", i+1)
		}
	}
	srv.Close()
	if a, c, r := cnt.accepted.Load(), cnt.closed.Load(), cnt.refused.Load(); a != 3 || c != 3 || r != 0 {
		t.Fatalf("accepted/closed/refused = %d/%d/%d, want 3/3/0", a, c, r)
	}
	if n := len(limited.l.slots); n != 0 {
		t.Fatalf("%d slots in use after the server closed, want 0", n)
	}
}

func TestLimitListenerNilCallbacks(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening on loopback: %v", err)
	}
	ln := LimitListener(raw, ListenerLimits{Max: 1})
	conns := acceptLoop(t, ln)
	c1 := dial(t, ln)
	s1 := receive(t, conns)
	shed(t, dial(t, ln)) // onRefused nil
	served(t, c1, s1)
	s1.Close() // onClose nil
	c2 := dial(t, ln)
	served(t, c2, receive(t, conns))
}

// dialFrom connects to ln from a chosen loopback source address, so that
// per-address caps can be tested with several "clients" on one machine.
func dialFrom(t *testing.T, ln net.Listener, src string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dialing %s from %s: %v", ln.Addr(), src, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(failsafe))
	return c
}

func TestLimitListenerPerIPCaps(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening on loopback: %v", err)
	}
	var mu sync.Mutex
	refused := map[string]int{}
	ln := LimitListener(raw, ListenerLimits{
		Max: 100, PerIP: 3, UnauthenticatedPerIP: 2,
		OnRefused: func(r string) { mu.Lock(); refused[r]++; mu.Unlock() },
	})
	conns := acceptLoop(t, ln)

	// Two unauthenticated connections from 127.0.0.2 fill its
	// unauthenticated cap; a third is shed.
	a1, s1 := dialFrom(t, ln, "127.0.0.2"), (net.Conn)(nil)
	s1 = receive(t, conns)
	dialFrom(t, ln, "127.0.0.2")
	s2 := receive(t, conns)
	shed(t, dialFrom(t, ln, "127.0.0.2"))

	// Another address is not affected: the bystander is served.
	b := dialFrom(t, ln, "127.0.0.3")
	served(t, b, receive(t, conns))

	// Once a connection authenticates, a new unauthenticated one fits,
	// up to the per-address total.
	MarkAuthenticated(WithConn(context.Background(), s1))
	MarkAuthenticated(WithConn(context.Background(), s1)) // counted once
	dialFrom(t, ln, "127.0.0.2")
	receive(t, conns)
	shed(t, dialFrom(t, ln, "127.0.0.2")) // 3 open: the per-address total

	// Closing frees the address's slots: an authenticated close frees a
	// total slot, an unauthenticated one both.
	s2.Close()
	a3 := dialFrom(t, ln, "127.0.0.2")
	served(t, a3, receive(t, conns))
	served(t, a1, s1)

	mu.Lock()
	defer mu.Unlock()
	if refused[RefusedUnauthenticated] != 1 || refused[RefusedPerIP] != 1 || refused[RefusedNode] != 0 {
		t.Fatalf("refusals = %v, want one per_ip_unauthenticated and one per_ip", refused)
	}
	limited := ln.(*limitListener).l
	limited.mu.Lock()
	e := *limited.perIP[netip.MustParseAddr("127.0.0.2")]
	limited.mu.Unlock()
	if e.open != 3 || e.unauthenticated != 2 {
		t.Fatalf("127.0.0.2 holds %+v, want 3 open, 2 unauthenticated", e)
	}
}

// TestConnLimiterSharedWithSlots: connections that take their place with
// Acquire (QUIC) and TCP connections from Listener share one Max and the
// per-address counts; Crowded sees only admitted connections.
func TestConnLimiterSharedWithSlots(t *testing.T) {
	var mu sync.Mutex
	refused := map[string]int{}
	l := NewConnLimiter(ListenerLimits{Max: 3, PerIP: 2, UnauthenticatedPerIP: 1,
		OnRefused: func(r string) { mu.Lock(); refused[r]++; mu.Unlock() }})
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := l.Listener(raw)
	t.Cleanup(func() { ln.Close() })
	conns := acceptLoop(t, ln)

	other := netip.MustParseAddr("192.0.2.7")
	q1, ok := l.Acquire()
	if !ok {
		t.Fatal("the first QUIC slot was refused")
	}
	// Before Admit (the handshake), the address counts nothing: a spoofed
	// source cannot fill a victim's per-address budget.
	q2, _ := l.Acquire()
	if r := l.Crowded(other); r != "" {
		t.Fatalf("Crowded before any admission: %q", r)
	}
	if r := q1.Admit(other); r != "" {
		t.Fatalf("Admit: %q", r)
	}
	if r := l.Crowded(other); r != RefusedUnauthenticated {
		t.Fatalf("Crowded with one unauthenticated connection: %q, want %q", r, RefusedUnauthenticated)
	}
	if r := q2.Admit(other); r != RefusedUnauthenticated {
		t.Fatalf("second unauthenticated admission: %q", r)
	}
	q2.Release() // released by Admit already: a second Release frees nothing more
	MarkAuthenticated(WithSlot(context.Background(), q1))
	if r := l.Crowded(other); r != "" {
		t.Fatalf("Crowded after authentication: %q", r)
	}

	// One TCP connection and one more QUIC slot fill Max=3.
	c1 := dial(t, ln)
	served(t, c1, receive(t, conns))
	q3, ok := l.Acquire()
	if !ok {
		t.Fatal("third place refused")
	}
	if _, ok := l.Acquire(); ok {
		t.Fatal("a fourth place was given with Max=3")
	}
	c2 := dial(t, ln)
	shed(t, c2) // TCP is refused too: the cap is shared
	q3.Release()
	q1.Release()
	q4, ok := l.Acquire()
	if !ok {
		t.Fatal("released places were not freed")
	}
	q4.Release()

	mu.Lock()
	defer mu.Unlock()
	if refused[RefusedNode] != 2 || refused[RefusedUnauthenticated] != 1 {
		t.Fatalf("refusals %v, want 2 max_connections and 1 per_ip_unauthenticated", refused)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.perIP[other]; e != nil {
		t.Fatalf("%v still counted after its connections closed: %+v", other, *e)
	}
}
