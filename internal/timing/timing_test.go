package timing

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

// tcpPair returns both ends of a real loopback connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// The phases are kept in order, reported to OnPhase as they end, and the
// connection dialed for the request keeps them.
func TestTracePhases(t *testing.T) {
	var seen []Phase
	tr := New(time.Now(), func(p Phase, s Span) {
		if !s.Done() || s.End.Before(s.Start) {
			t.Errorf("%v reported unfinished: %+v", p, s)
		}
		seen = append(seen, p)
	})
	ctx := NewContext(context.Background(), tr)
	if FromContext(ctx) != tr || FromContext(context.Background()) != nil {
		t.Fatal("context round trip")
	}
	conn, _ := tcpPair(t)
	ap := netip.MustParseAddrPort(conn.RemoteAddr().String())
	tr.Begin(DNS)
	tr.EndDNS(true, nil)
	tr.Begin(Connect)
	tr.EndConnect(ap, conn, nil)
	tr.Begin(TLS)
	tr.End(TLS, errors.New("bad certificate"))
	tr.GotConn(conn) // the one dialed for it
	tr.FirstByte()
	first := tr.Finish().FirstByte
	tr.FirstByte() // after Finish: ignored
	res := tr.Finish()
	if len(seen) != 3 || seen[0] != DNS || seen[1] != Connect || seen[2] != TLS {
		t.Errorf("OnPhase saw %v", seen)
	}
	if !res.Span(DNS).Cached || !res.Span(Connect).Done() || res.Span(TLS).Err == nil || res.Addr != ap {
		t.Errorf("result %+v", res)
	}
	if res.FirstByte != first {
		t.Error("a first byte after Finish changed the result")
	}
	ttfb, ok := res.TTFB()
	if !ok || ttfb < res.Span(DNS).Duration()+res.Span(Connect).Duration()+res.Span(TLS).Duration() {
		t.Errorf("ttfb %v shorter than the phases before it", ttfb)
	}
}

// A connection the request did not dial (pooled, or dialed by another
// request) drops the dial phases, also ones that end later; its address is
// still the record's.
func TestTraceForeignConnection(t *testing.T) {
	mine, _ := tcpPair(t)
	other, _ := tcpPair(t)
	tr := New(time.Now(), nil)
	tr.Begin(DNS)
	tr.EndDNS(false, nil)
	tr.Begin(Connect) // still dialing when the transport hands over another connection
	tr.GotConn(other)
	tr.EndConnect(netip.MustParseAddrPort(mine.RemoteAddr().String()), mine, nil)
	res := tr.Finish()
	if res.Span(DNS).Done() || res.Span(Connect).Done() {
		t.Errorf("phases of a dial the request did not use: %+v", res.Spans)
	}
	if res.Addr.String() != other.RemoteAddr().String() {
		t.Errorf("addr %v, want the connection's %v", res.Addr, other.RemoteAddr())
	}
}

// A nil trace (a caller without one) is a no-op, not a panic.
func TestNilTrace(t *testing.T) {
	var tr *Trace
	tr.Begin(DNS)
	tr.EndDNS(false, nil)
	tr.EndConnect(netip.AddrPort{}, nil, nil)
	tr.FirstByte()
	tr.GotConn(nil)
	if r := tr.Finish(); r.Addr.IsValid() || !r.FirstByte.IsZero() {
		t.Errorf("nil trace result %+v", r)
	}
}
