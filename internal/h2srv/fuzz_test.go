package h2srv

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
)

// FuzzConn writes a frame sequence decoded from the input into a live
// connection (TLS over net.Pipe) whose handler echoes, reads bodies,
// writes trailers, blocks and resets, then closes it. Whatever the frames,
// the engine must not panic, ServeConn must return, and every goroutine,
// budget reservation and buffered byte must be given back.
//
// Input: a first byte of options (bit 0: no SETTINGS after the preface;
// bit 1: wait for a PING's ACK before closing, so the server has read
// everything; bit 2: then wait until the server has sent nothing for 10 ms,
// so handlers answer), then operations, each a byte (kind = byte % 12) and its
// arguments; a missing byte reads as 0. A stream id argument s picks from
// {0, 1, 3, 5, 2^31-1, the next new id} (s % 6).
//
//	0 HEADERS        s, flags, n, n field indexes (fuzzFields); flags: 1 END_STREAM,
//	                 2 split into HEADERS+CONTINUATION, 4 no END_HEADERS, 8 PADDED (+pad),
//	                 16 PRIORITY (+dep s, weight)
//	1 CONTINUATION   s, flags (1 END_HEADERS), n % 32, n bytes
//	2 DATA           s, flags (1 END_STREAM, 2 PADDED (+pad)), n: n*64 bytes
//	3 RST_STREAM     s, code
//	4 SETTINGS       flags (1 ACK), n % 4, n × (id % 10, 4 bytes value)
//	5 PING           flags (1 ACK), 8 bytes
//	6 WINDOW_UPDATE  s, i: increment fuzzIncrements[i % 8]
//	7 PRIORITY       s, dep s, weight
//	8 GOAWAY         s, code
//	9 any frame      type, flags, s, n % 32, n bytes
//	10 rapid reset   n: n × (HEADERS GET /block on a new stream, RST_STREAM CANCEL)
//	11 CONTINUATION flood  n: HEADERS without END_HEADERS, n empty CONTINUATIONs, END_HEADERS
func FuzzConn(f *testing.F) {
	cert, _, _, err := selfsigned.Cert(time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		runFuzzConn(t, cert, data)
	})
}

// fuzzFields is what HEADERS blocks are made of: request fields, paths
// that steer fuzzHandler, and malformed fields.
var fuzzFields = []hpack.HeaderField{
	{Name: ":method", Value: "GET"},                   // 0
	{Name: ":method", Value: "POST"},                  // 1
	{Name: ":method", Value: "CONNECT"},               // 2
	{Name: ":method", Value: "HEAD"},                  // 3
	{Name: ":scheme", Value: "https"},                 // 4
	{Name: ":scheme", Value: "http"},                  // 5
	{Name: ":path", Value: "/"},                       // 6
	{Name: ":path", Value: "/echo"},                   // 7
	{Name: ":path", Value: "/read"},                   // 8
	{Name: ":path", Value: "/trailers"},               // 9
	{Name: ":path", Value: "/reset"},                  // 10
	{Name: ":path", Value: "/block"},                  // 11
	{Name: ":path", Value: "/flush"},                  // 12
	{Name: ":path", Value: "/deadline"},               // 13
	{Name: ":path", Value: "/204"},                    // 14
	{Name: ":authority", Value: "example.com"},        // 15
	{Name: ":authority", Value: "example.com:443"},    // 16
	{Name: ":protocol", Value: "websocket"},           // 17
	{Name: "content-length", Value: "0"},              // 18
	{Name: "content-length", Value: "5"},              // 19
	{Name: "content-length", Value: "70000"},          // 20
	{Name: "expect", Value: "100-continue"},           // 21
	{Name: "trailer", Value: "x-t"},                   // 22
	{Name: "x-t", Value: "v"},                         // 23
	{Name: "te", Value: "trailers"},                   // 24
	{Name: "cookie", Value: "a=1"},                    // 25
	{Name: "cookie", Value: "b=2"},                    // 26
	{Name: "Upper", Value: "x"},                       // 27 malformed
	{Name: "connection", Value: "close"},              // 28 malformed
	{Name: "te", Value: "gzip"},                       // 29 malformed
	{Name: ":status", Value: "200"},                   // 30 malformed
	{Name: ":foo", Value: "bar"},                      // 31 malformed
	{Name: "transfer-encoding", Value: "chunked"},     // 32 malformed
	{Name: "x-bad", Value: "a\x00b"},                  // 33 malformed
	{Name: "", Value: ""},                             // 34 malformed
	{Name: ":path", Value: ""},                        // 35 malformed
	{Name: "content-length", Value: "abc"},            // 36 malformed
	{Name: "host", Value: "example.com"},              // 37
	{Name: "x-big", Value: strings.Repeat("a", 3000)}, // 38: with a few, over MaxHeaderBytes
	{Name: ":path", Value: "/continue"},               // 39
}

var fuzzIncrements = [8]uint32{0, 1, 100, 16384, 65535, 1 << 20, 1 << 30, 1<<31 - 1}

var fuzzConfig = Config{
	MaxConcurrentStreams: 4,
	MaxHeaderBytes:       4096,
	HeaderReadTimeout:    time.Second,
	WriteStallTimeout:    200 * time.Millisecond,
	StreamWindow:         65535,
	ConnWindow:           128 << 10,
	MaxConnWindow:        512 << 10,
	BodyBudget:           1 << 20,
}

func fuzzHandler(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	switch {
	case r.Method == http.MethodConnect || r.URL.Path == "/echo":
		w.WriteHeader(http.StatusOK)
		_ = rc.Flush()
		_, _ = io.Copy(w, r.Body)
	case r.URL.Path == "/read":
		n, err := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n, err)
	case r.URL.Path == "/trailers":
		w.Header().Set("Trailer", "X-A")
		b, _ := io.ReadAll(io.LimitReader(r.Body, 1000))
		_, _ = w.Write(b)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("X-A", r.Trailer.Get("X-T"))
		w.Header().Set(http.TrailerPrefix+"X-B", "2")
	case r.URL.Path == "/reset":
		_, _ = io.WriteString(w, "partial")
		_ = rc.Flush()
		panic(http.ErrAbortHandler)
	case r.URL.Path == "/block":
		<-r.Context().Done()
	case r.URL.Path == "/flush":
		for range 4 {
			if _, err := w.Write(make([]byte, 10000)); err != nil {
				return
			}
			_ = rc.Flush()
		}
	case r.URL.Path == "/deadline":
		_ = rc.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
		_, _ = io.Copy(io.Discard, r.Body)
		_ = rc.SetWriteDeadline(time.Now().Add(5 * time.Millisecond))
		for range 10 {
			if _, err := w.Write(make([]byte, 8000)); err != nil {
				return
			}
		}
	case r.URL.Path == "/204":
		w.WriteHeader(http.StatusNoContent)
		_, _ = io.WriteString(w, "x")
	case r.URL.Path == "/continue":
		_, _ = r.Body.Read(make([]byte, 1))
		w.WriteHeader(http.StatusExpectationFailed)
	default:
		_, _ = io.WriteString(w, "ok")
	}
}

// fuzzInput reads the input; past its end every byte is 0.
type fuzzInput struct{ b []byte }

func (in *fuzzInput) byte() byte {
	if len(in.b) == 0 {
		return 0
	}
	c := in.b[0]
	in.b = in.b[1:]
	return c
}

func (in *fuzzInput) bytes(n int) []byte {
	out := make([]byte, n)
	copy(out, in.b)
	in.b = in.b[min(n, len(in.b)):]
	return out
}

// fuzzWriter turns the input into frames.
type fuzzWriter struct {
	in     fuzzInput
	fr     *http2.Framer
	enc    *hpack.Encoder
	hbuf   bytes.Buffer
	nextID uint32
}

func (w *fuzzWriter) stream() uint32 {
	switch w.in.byte() % 6 {
	case 0:
		return 0
	case 1:
		return 1
	case 2:
		return 3
	case 3:
		return 5
	case 4:
		return 1<<31 - 1
	}
	id := w.nextID
	w.nextID += 2
	return id
}

func (w *fuzzWriter) newID() uint32 {
	id := w.nextID
	w.nextID += 2
	return id
}

func (w *fuzzWriter) block(fields ...hpack.HeaderField) []byte {
	w.hbuf.Reset()
	for _, f := range fields {
		_ = w.enc.WriteField(f)
	}
	return bytes.Clone(w.hbuf.Bytes())
}

var getBlock = []hpack.HeaderField{fuzzFields[0], fuzzFields[4], fuzzFields[11], fuzzFields[15]}

// op writes the frames of one operation.
func (w *fuzzWriter) op() error {
	in := &w.in
	switch in.byte() % 12 {
	case 0:
		id, flags := w.stream(), in.byte()
		fields := make([]hpack.HeaderField, in.byte()%8)
		for i := range fields {
			fields[i] = fuzzFields[int(in.byte())%len(fuzzFields)]
		}
		block := w.block(fields...)
		var pad []byte
		var prio []byte
		if flags&8 != 0 {
			pad = make([]byte, in.byte()%32)
		}
		if flags&16 != 0 {
			prio = binary.BigEndian.AppendUint32(nil, w.stream())
			prio = append(prio, in.byte())
		}
		first, rest := block, []byte(nil)
		if flags&2 != 0 {
			first, rest = block[:len(block)/2], block[len(block)/2:]
		}
		var hf http2.Flags
		if flags&1 != 0 {
			hf |= http2.FlagHeadersEndStream
		}
		if flags&2 == 0 && flags&4 == 0 {
			hf |= http2.FlagHeadersEndHeaders
		}
		var payload []byte
		if pad != nil {
			hf |= http2.FlagHeadersPadded
			payload = append(payload, byte(len(pad)))
		}
		if prio != nil {
			hf |= http2.FlagHeadersPriority
			payload = append(payload, prio...)
		}
		payload = append(append(payload, first...), pad...)
		if err := w.fr.WriteRawFrame(http2.FrameHeaders, hf, id, payload); err != nil {
			return err
		}
		if flags&2 != 0 {
			var cf http2.Flags
			if flags&4 == 0 {
				cf = http2.FlagContinuationEndHeaders
			}
			return w.fr.WriteRawFrame(http2.FrameContinuation, cf, id, rest)
		}
		return nil
	case 1:
		id, flags := w.stream(), http2.Flags(in.byte()&1)<<2 // END_HEADERS is 0x4
		return w.fr.WriteRawFrame(http2.FrameContinuation, flags, id, in.bytes(int(in.byte()%32)))
	case 2:
		id, flags := w.stream(), in.byte()
		var df http2.Flags
		var payload []byte
		if flags&2 != 0 {
			df |= http2.FlagDataPadded
			payload = append(payload, in.byte()%32)
		}
		if flags&1 != 0 {
			df |= http2.FlagDataEndStream
		}
		n := int(in.byte()) * 64
		payload = append(payload, make([]byte, n)...)
		if df&http2.FlagDataPadded != 0 {
			payload = append(payload, make([]byte, payload[0])...)
		}
		return w.fr.WriteRawFrame(http2.FrameData, df, id, payload)
	case 3:
		return w.fr.WriteRawFrame(http2.FrameRSTStream, 0, w.stream(), binary.BigEndian.AppendUint32(nil, uint32(in.byte())))
	case 4:
		flags := http2.Flags(in.byte() & 1)
		var payload []byte
		for range in.byte() % 4 {
			payload = binary.BigEndian.AppendUint16(payload, uint16(in.byte()%10))
			payload = append(payload, in.bytes(4)...)
		}
		return w.fr.WriteRawFrame(http2.FrameSettings, flags, 0, payload)
	case 5:
		return w.fr.WriteRawFrame(http2.FramePing, http2.Flags(in.byte()&1), 0, in.bytes(8))
	case 6:
		id := w.stream()
		return w.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, id, binary.BigEndian.AppendUint32(nil, fuzzIncrements[in.byte()%8]))
	case 7:
		id, dep := w.stream(), w.stream()
		return w.fr.WriteRawFrame(http2.FramePriority, 0, id, append(binary.BigEndian.AppendUint32(nil, dep), in.byte()))
	case 8:
		payload := binary.BigEndian.AppendUint32(nil, w.stream())
		return w.fr.WriteRawFrame(http2.FrameGoAway, 0, 0, binary.BigEndian.AppendUint32(payload, uint32(in.byte())))
	case 9:
		t, flags, id := http2.FrameType(in.byte()), http2.Flags(in.byte()), w.stream()
		return w.fr.WriteRawFrame(t, flags, id, in.bytes(int(in.byte()%32)))
	case 10:
		for range in.byte() {
			id := w.newID()
			if err := w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: w.block(getBlock...), EndHeaders: true, EndStream: true}); err != nil {
				return err
			}
			if err := w.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
				return err
			}
		}
		return nil
	default:
		n := int(in.byte())
		id := w.newID()
		if err := w.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: w.block(getBlock...), EndStream: true}); err != nil {
			return err
		}
		for range n {
			if err := w.fr.WriteContinuation(id, false, nil); err != nil {
				return err
			}
		}
		return w.fr.WriteContinuation(id, true, nil)
	}
}

// fuzzFailsafe bounds each wait of one input: a fuzz worker gives up on
// an input after 10 s ("deadlocked!"), and minimising a failure runs it
// many times.
const fuzzFailsafe = 3 * time.Second

var settleData = [8]byte{'s', 'e', 't', 't', 'l', 'e'}

func runFuzzConn(t *testing.T, cert tls.Certificate, data []byte) {
	base := runtime.NumGoroutine()
	var bh budgetHooks
	cfg := fuzzConfig
	cfg.Handler = http.HandlerFunc(fuzzHandler)
	cfg.Hooks = bh.hooks()
	s := New(cfg)

	cp, sp := net.Pipe()
	stc := tls.Server(sp, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
	ctc := tls.Client(cp, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	served := make(chan struct{})
	go func() {
		defer close(served)
		if stc.Handshake() != nil {
			stc.Close()
			return
		}
		s.ServeConn(stc)
	}()
	if err := ctc.Handshake(); err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	_ = ctc.SetDeadline(time.Now().Add(fuzzFailsafe))

	// Read everything the server sends (frames of any size: a client's
	// SETTINGS may raise the size of our header frames), noting the
	// settling PING's ACK.
	settled := make(chan struct{})
	drained := make(chan struct{})
	var lastFrame atomic.Int64
	lastFrame.Store(time.Now().UnixNano())
	go func() {
		defer close(drained)
		var hdr [9]byte
		isSettled := false // the input may send the same PING
		for {
			if _, err := io.ReadFull(ctc, hdr[:]); err != nil {
				return
			}
			n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
			payload := make([]byte, n)
			if _, err := io.ReadFull(ctc, payload); err != nil {
				return
			}
			lastFrame.Store(time.Now().UnixNano())
			// A GOAWAY settles too: after a connection error the server
			// reads no more frames (it lingers, discarding, before it closes).
			ack := http2.FrameType(hdr[3]) == http2.FramePing && hdr[4]&byte(http2.FlagPingAck) != 0 && bytes.Equal(payload, settleData[:])
			if (ack || http2.FrameType(hdr[3]) == http2.FrameGoAway) && !isSettled {
				isSettled = true
				close(settled)
			}
		}
	}()

	var out bytes.Buffer
	w := &fuzzWriter{in: fuzzInput{data}, fr: http2.NewFramer(&out, nil), nextID: 7}
	w.enc = hpack.NewEncoder(&w.hbuf)
	opts := w.in.byte()
	out.WriteString(http2.ClientPreface)
	if opts&1 == 0 {
		_ = w.fr.WriteSettings()
	}
	for len(w.in.b) > 0 && out.Len() < 4<<20 {
		if err := w.op(); err != nil {
			t.Fatalf("encoding: %v", err)
		}
	}
	if opts&2 != 0 {
		_ = w.fr.WritePing(false, settleData)
	}
	// The server may close before it has read it all; that is no error.
	_, _ = ctc.Write(out.Bytes())
	if opts&2 != 0 {
		select {
		case <-settled:
		case <-drained:
		case <-time.After(time.Second):
		}
	}
	if opts&4 != 0 {
		// Give the handlers a moment to answer: until the server has sent
		// nothing for a little while.
		for start := time.Now(); time.Since(start) < 300*time.Millisecond; {
			time.Sleep(2 * time.Millisecond)
			if time.Since(time.Unix(0, lastFrame.Load())) > 10*time.Millisecond {
				break
			}
		}
	}
	ctc.Close()

	select {
	case <-served:
	case <-time.After(fuzzFailsafe):
		t.Fatalf("ServeConn did not return after the client closed\n%s", goroutines())
	}
	<-drained
	deadline := time.Now().Add(fuzzFailsafe)
	for {
		n := runtime.NumGoroutine()
		if n <= base && s.BudgetInUse() == 0 && s.Conns() == 0 && bh.buffered.Load() == 0 && bh.reserved.Load() == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the connection: %d goroutines (baseline %d), budget in use %d, %d connections, buffered %d, reserved %d\n%s",
				n, base, s.BudgetInUse(), s.Conns(), bh.buffered.Load(), bh.reserved.Load(), goroutines())
		}
		time.Sleep(time.Millisecond)
	}
}

func goroutines() string {
	var b bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
	return b.String()
}
