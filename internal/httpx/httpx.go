// Package httpx is the contract between Pinaka's protocol engines and its
// proxy core. The core is an http.Handler and must not know which engine
// carried a request (HTTP/1.1 on net/http, HTTP/2, HTTP/3 later); what a
// plain *http.Request cannot carry, the engine puts in the request's
// context as an Info, and the core reads it through Scheme and Protocol.
package httpx

import (
	"context"
	"errors"
	"net/http"
	"time"
)

// Info is what an engine knows of a request beyond *http.Request.
type Info struct {
	Scheme   string // :scheme (HTTP/2, HTTP/3); "" on HTTP/1.1
	Protocol string // :protocol of an extended CONNECT (RFC 8441, RFC 9220); "" otherwise
}

type infoKey struct{}

// WithInfo returns ctx carrying i for the request an engine is about to
// hand to the core.
func WithInfo(ctx context.Context, i *Info) context.Context {
	return context.WithValue(ctx, infoKey{}, i)
}

func info(r *http.Request) *Info {
	i, _ := r.Context().Value(infoKey{}).(*Info)
	return i
}

// Scheme is the request's scheme: :scheme (HTTP/2, HTTP/3), or an
// HTTP/1.1 absolute-form URL's scheme ("" for origin-form and CONNECT).
func Scheme(r *http.Request) string {
	if i := info(r); i != nil {
		return i.Scheme
	}
	return r.URL.Scheme
}

// Protocol is the :protocol of an extended CONNECT, or "".
func Protocol(r *http.Request) string {
	if i := info(r); i != nil {
		return i.Protocol
	}
	return ""
}

// ErrWriteStalled is the cause an engine gives a request's context when it
// resets the stream because the client granted no flow-control window for
// too long (a client that stopped reading one stream and not the others).
var ErrWriteStalled = errors.New("client granted no flow-control window for too long")

// Stream is a request's stream kept open after its handler returns, for a
// tunnel (CONNECT, extended CONNECT) whose relay runs on goroutines of its
// own: an idle tunnel then holds no goroutine on the client side.
type Stream interface {
	Read(p []byte) (int, error)  // the request's DATA; io.EOF after the client's END_STREAM
	Write(p []byte) (int, error) // response DATA; blocks while the client grants no window
	CloseWrite() error           // END_STREAM: a half-close
	// Close ends the stream: at once with a reset unless our END_STREAM is
	// already queued, and frees it.
	Close() error
	Abort() // reset now; wakes a blocked Read or Write
	SetReadDeadline(t time.Time) error
	// ReadReady registers f to run once when Read would not block (data,
	// END_STREAM, reset, deadline, connection loss). It returns false,
	// without registering, if Read would not block now. f runs on the
	// engine's reader goroutine and must not block.
	ReadReady(f func()) bool
}

// Sinker is implemented by Streams whose engine can hand arriving DATA
// straight to the tunnel's destination. A bulk upload through a detached
// stream otherwise costs a goroutine wake-up per DATA frame: the engine's
// reader queues the data and the relay goroutine copies it out. With a
// sink, the reader writes it out itself, gathered per batch of frames read
// from the socket, the way an HTTP/1.1 tunnel's single goroutine does.
type Sinker interface {
	// SetSink registers write. The engine calls it, on its reader
	// goroutine, only while a ReadReady callback is registered (the relay
	// is parked, so nobody else writes the destination) and with what is
	// buffered, in order. write must not block: it writes what it can and
	// returns how much. What it leaves (it returned less, or an error) stays
	// buffered, and the ReadReady callback runs so that the relay goroutine
	// takes over; after an error the sink is not used again.
	SetSink(write func(bufs [][]byte) (int, error))
}

// Detacher is implemented by ResponseWriters whose stream can outlive the
// handler. Detach sends the response header already set with WriteHeader
// and hands the stream over; the ResponseWriter is not used after it.
type Detacher interface {
	Detach() (Stream, error)
}

// Datagrams is implemented by Streams whose engine carries HTTP Datagrams
// (RFC 9297) for their request: HTTP/3 sends them in QUIC DATAGRAM frames,
// tied to the request stream by its quarter stream id, which the engine
// adds and strips. The payload is what follows that id; for CONNECT-UDP
// (RFC 9298) a context id and a UDP payload.
type Datagrams interface {
	// SendDatagram sends b, which the caller may reuse when it returns.
	// It fails when b does not fit in one datagram, or when the stream or
	// connection is gone.
	SendDatagram(b []byte) error
	// ReceiveDatagram returns the next datagram of the request, blocking
	// until one arrives, the stream's receive side ends, or ctx is done.
	ReceiveDatagram(ctx context.Context) ([]byte, error)
}

// DatagramSettings is implemented by ResponseWriters of engines that carry
// HTTP Datagrams: ClientDatagrams reports whether the client enabled them
// in its SETTINGS (SETTINGS_H3_DATAGRAM), waiting for those within ctx.
// A server must not send datagrams to a client that did not.
type DatagramSettings interface {
	ClientDatagrams(ctx context.Context) bool
}

// ErrDatagramTooLarge is wrapped by a SendDatagram error when the datagram
// does not fit in one QUIC DATAGRAM frame on the connection's path: the
// datagram is lost, the stream is fine.
var ErrDatagramTooLarge = errors.New("datagram too large for the connection")
