package e2e

// HTTP/2 attacks on the built binary (docs/H2ENGINE.md §5–§6), run against
// the default engine (internal/h2srv). Each attack comes from its own
// loopback address, is bounded in time and volume, and is followed by the
// HTTP/1.1 bystander and an HTTP/2 one, who must still be served. Each
// logs the node's CPU for the attack and per attack frame; CPU is asserted
// only against a very generous ceiling (a noisy shared machine), the
// protocol outcome exactly.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// attackCPUCeiling is the generous bound on the node CPU one attack may
// cost: the designed figures are in the tens of milliseconds.
const attackCPUCeiling = 2 * time.Second

// connErrorLog makes the proxy log each HTTP/2 connection error, the
// witness of a GOAWAY a reset kept from the client (see expectCalm).
const connErrorLog = "LOG_LEVEL=debug"

// floodLimit bounds every flood in time.
const floodLimit = 5 * time.Second

func hostOf(origin string) string { return strings.TrimPrefix(origin, "http://") }

// get is the header list of a GET forwarded to host (with a token, if
// tok is not empty).
func get(host, path, tok string) []string {
	f := []string{":method", "GET", ":scheme", "http", ":authority", host, ":path", path}
	if tok != "" {
		f = append(f, "proxy-authorization", "Bearer "+tok)
	}
	return f
}

// runFlood floods h with unit, expects GOAWAY ENHANCE_YOUR_CALM and the
// connection closed, and logs and bounds the node's CPU.
//
// Most of what a flood writes never reaches the proxy: the kernel takes
// hundreds of KB while the proxy is still on its first thousand frames,
// and drops the rest when the proxy closes. So when measured > 0 and the
// reader runs, the per-frame figure comes from a first part of measured
// units (under the connection's budget), followed by a PING whose ACK
// says the proxy has processed them all. Then the flood goes on at full
// speed, for up to floodLimit or until the proxy ends the connection.
func runFlood(t *testing.T, p *proc, h *h2Peer, what string, measured int, unit func(fw *http2.Framer, i int) int) floodResult {
	t.Helper()
	total := meterCPU(t, p)
	done := 0
	if measured > 0 && h.readerRunning() {
		m := meterCPU(t, p)
		first := h.flood(floodLimit, measured, 64, unit)
		marker := [8]byte{'m', 'e', 'a', 's', 'u', 'r', 'e', 'd'}
		if err := h.send(func(fw *http2.Framer) { _ = fw.WritePing(false, marker) }); err == nil {
			h.waitPingAck(marker)
		}
		if h.ended() {
			t.Logf("%s: the proxy ended the connection within the first %d units", what, first.units)
		} else {
			m.report(what+", first part (processed, then acknowledged)", first.frames, "frames", "frame")
		}
		done = first.units
	}
	res := h.flood(floodLimit, 1<<30, 64, func(fw *http2.Framer, i int) int { return unit(fw, done+i) })
	if !h.readerRunning() {
		h.startReader() // the never-reading variant looks now
	}
	ga := expectCalm(t, h, what)
	cpu := total.report(what+", whole attack", done+res.frames, "frames written", "frame written")
	t.Logf("%s: %d + %d frames written in %v (stopped: %s); GOAWAY %+v; frames from the proxy: %s",
		what, done, res.frames, res.took.Round(time.Millisecond), res.stop, ga, h.frameCounts())
	if cpu > attackCPUCeiling {
		t.Errorf("%s cost the node %v of CPU, want < %v", what, cpu, attackCPUCeiling)
	}
	res.units += done
	return res
}

// silentOrigin accepts TCP connections and never reads or answers; its
// sockets take little into their receive buffers. It returns the address
// and the count of connections accepted.
func silentOrigin(t *testing.T) (string, *atomic.Int64) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	done := make(chan struct{})
	t.Cleanup(func() { close(done); ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				defer c.Close()
				select {
				case <-done:
				case <-time.After(4 * failsafe):
				}
			}()
		}
	}()
	return ln.Addr().String(), &accepted
}

// CVE-2023-44487: HEADERS + RST_STREAM pairs on one connection. Streams
// count against the limit until their handler returns and resets of
// unanswered streams cost credit: the connection gets ENHANCE_YOUR_CALM
// long before 20,000 pairs.
func TestAttackRapidReset(t *testing.T) {
	origin := echoOrigin(t)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(slow.Close)
	// The per-token request rate must not be what stops the token leg.
	p, _ := hostile(t, connErrorLog, "RATE_LIMIT_REQUESTS_PER_MINUTE=10000000", "RATE_LIMIT_BURST_SIZE=1000000")
	const pairs = 20000
	for _, leg := range []struct{ name, src, host, tok string }{
		{"no credentials (407)", "127.0.0.20", hostOf(origin.URL), ""},
		{"with a token, to an origin that takes 2 s", "127.0.0.21", hostOf(slow.URL), mint(t, "rapid-reset", "us-east")},
	} {
		what := "rapid reset, " + leg.name
		h := openH2(t, p, leg.src, true)
		fields := get(leg.host, "/rapid-reset", leg.tok)
		first, next := h.block(fields...), h.block(fields...) // the second is all table references
		m := meterCPU(t, p)
		res := h.flood(floodLimit, pairs, 50, func(fw *http2.Framer, i int) int {
			id := uint32(2*i + 1)
			b := next
			if i == 0 {
				b = first
			}
			_ = fw.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b, EndStream: true, EndHeaders: true})
			_ = fw.WriteRSTStream(id, http2.ErrCodeCancel)
			return 2
		})
		ga := expectCalm(t, h, what)
		streams := 0
		if ga != nil {
			streams = int(ga.last+1) / 2
		}
		cpu := m.report(what, streams, "streams taken", "stream")
		answered, refused := 0, 0
		h.mu.Lock()
		for _, st := range h.streams {
			if st.status != 0 {
				answered++
			}
			if st.rst && st.code == http2.ErrCodeRefusedStream {
				refused++
			}
		}
		h.mu.Unlock()
		t.Logf("%s: %d pairs written in %v (stopped: %s); the proxy took %d streams (GOAWAY last id %d): %d answered, %d refused; frames from the proxy: %s",
			what, res.units, res.took.Round(time.Millisecond), res.stop, streams, ga.lastID(), answered, refused, h.frameCounts())
		if ga != nil && streams > pairs/2 {
			t.Errorf("%s: GOAWAY only after %d of %d streams", what, streams, pairs)
		}
		if cpu > attackCPUCeiling {
			t.Errorf("%s cost the node %v of CPU, want < %v", what, cpu, attackCPUCeiling)
		}
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// continuationFlood opens a header block on a fresh connection from src
// and follows it with CONTINUATIONs carrying frag (made for that
// connection's encoder) until the proxy ends the connection.
func continuationFlood(t *testing.T, p *proc, host, src, what, path string, frag func(*h2Peer) []byte) {
	h := openH2(t, p, src, true)
	start := h.block(get(host, path, "")...)
	f := frag(h)
	runFlood(t, p, h, what, 0, func(fw *http2.Framer, i int) int {
		if i == 0 {
			_ = fw.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: start, EndStream: true})
		} else {
			_ = fw.WriteContinuation(1, false, f)
		}
		return 1
	})
}

// CVE-2024-27316 class: a header block that never ends. Empty
// CONTINUATIONs and large ones end the connection with ENHANCE_YOUR_CALM
// (a block is at most 16 frames and 2 × MAX_HEADER_BYTES + 16 KiB); a
// block dripped a byte at a time ends at HEADER_READ_TIMEOUT.
func TestAttackContinuationFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog, "HEADER_READ_TIMEOUT=2s")
	host := hostOf(origin.URL)

	// Endless empty CONTINUATIONs, then 16 KiB fragments of never-indexed
	// literals (the decoder's table does not change, so one fragment serves
	// for every frame).
	continuationFlood(t, p, host, "127.0.0.22", "empty CONTINUATION flood", "/continuation", func(*h2Peer) []byte { return nil })
	continuationFlood(t, p, host, "127.0.0.23", "16 KiB CONTINUATION flood", "/continuation-large", func(h *h2Peer) []byte {
		var frag []byte
		for len(frag) < 15000 {
			frag = append(frag, h.encode(hpack.HeaderField{Name: "x-fill", Value: strings.Repeat("0123456789", 100), Sensitive: true})...)
		}
		return frag
	})

	// One byte every 200 ms.
	h := openH2(t, p, "127.0.0.24", true)
	blk := h.block(append(get(host, "/drip-"+strings.Repeat("d", 40), ""), "x-drip", strings.Repeat("z", 40))...)
	began := time.Now()
	if err := h.send(func(fw *http2.Framer) {
		_ = fw.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk[:1], EndStream: true})
	}); err != nil {
		t.Fatal(err)
	}
	frames := 1
	for i := 1; i < len(blk)-1 && !h.ended(); i++ {
		time.Sleep(200 * time.Millisecond)
		if h.ended() || h.send(func(fw *http2.Framer) { _ = fw.WriteContinuation(1, false, blk[i:i+1]) }) != nil {
			break
		}
		frames++
	}
	ga, closed := h.waitClosed(failsafe)
	h.mu.Lock()
	took := h.closedAt.Sub(began)
	h.mu.Unlock()
	t.Logf("dripped header block (HEADER_READ_TIMEOUT=2s): closed %v after HEADERS, after %d one-byte frames of a %d-byte block; GOAWAY %+v",
		took.Round(time.Millisecond), frames, len(blk), ga)
	switch {
	case !closed:
		t.Fatalf("a header block dripped for %v is still open", failsafe)
	case took < 1800*time.Millisecond:
		t.Errorf("the dripped block ended after %v, before HEADER_READ_TIMEOUT (GOAWAY %+v)", took, ga)
	case frames > 16:
		t.Errorf("the dripped block ran to %d frames: the frame cap ended it, not HEADER_READ_TIMEOUT", frames)
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// HPACK bomb: one 4 KiB field in the dynamic table referenced 16,000
// times in one block (64 MB of decoded fields from 16 KB). The block is
// answered 431 (or the connection ends); the node's memory does not grow.
func TestAttackHPACKBomb(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t)
	bystander(t, p, origin.URL) // warm, so the baseline has the usual paths
	bystanderH2(t, p, origin.URL)
	rssBefore := rssMB(t, p)

	h := openH2(t, p, "127.0.0.25", true)
	const refs = 16000
	// Pseudo-headers never indexed: the table holds the bomb alone, and
	// every block after the first is the same bytes.
	fields := []hpack.HeaderField{
		{Name: ":method", Value: "GET", Sensitive: true},
		{Name: ":scheme", Value: "http", Sensitive: true},
		{Name: ":authority", Value: hostOf(origin.URL), Sensitive: true},
		{Name: ":path", Value: "/hpack-bomb", Sensitive: true},
	}
	bomb := hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 4000)}
	for range refs + 1 {
		fields = append(fields, bomb)
	}
	first, next := h.encode(fields...), h.encode(fields...)
	t.Logf("HPACK bomb: first block %d bytes (inserts the %d-byte entry), then %d bytes per block; %d references = %d MB of fields per block",
		len(first), bomb.Size(), len(next), refs, refs*int(bomb.Size())>>20)

	m := meterCPU(t, p)
	if err := h.send(func(fw *http2.Framer) { writeBlock(fw, 1, true, first) }); err != nil {
		t.Fatal(err)
	}
	var st peerStream
	waitFor(t, "an answer to the bomb", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		st = *h.streamLocked(1)
		return st.ended || h.goAway != nil || h.readErr != nil
	})
	m.report("one HPACK bomb block", refs, "references", "reference")
	switch {
	case st.status == http.StatusRequestHeaderFieldsTooLarge:
		t.Logf("HPACK bomb: answered 431")
	case h.ended():
		ga, _ := h.waitClosed(time.Second)
		t.Logf("HPACK bomb: connection ended, GOAWAY %+v", ga)
	default:
		t.Fatalf("HPACK bomb: stream 1 ended as %+v, want 431 or a connection error", st)
	}

	if !h.ended() {
		// The same block again and again, for floodLimit or while the
		// connection lasts.
		m = meterCPU(t, p)
		res := h.flood(floodLimit, 1<<20, 4, func(fw *http2.Framer, i int) int {
			writeBlock(fw, uint32(2*i+3), true, next)
			return 1
		})
		tooLarge, other := 0, 0
		waitFor(t, "answers to the bombs", func() bool {
			h.mu.Lock()
			defer h.mu.Unlock()
			tooLarge, other = 0, 0
			for i := range res.units {
				switch st := h.streams[uint32(2*i+3)]; {
				case st == nil || !st.ended:
				case st.status == http.StatusRequestHeaderFieldsTooLarge:
					tooLarge++
				default:
					other++
				}
			}
			return tooLarge+other == res.units || h.readErr != nil || h.goAway != nil
		})
		cpu := m.report("HPACK bomb, repeated", res.units, "blocks", "block")
		ga, _ := h.waitClosed(0)
		t.Logf("HPACK bomb, repeated: %d blocks (%d MB of fields) in %v (stopped: %s): %d answered 431, %d otherwise; GOAWAY %+v",
			res.units, res.units*refs*int(bomb.Size())>>20, res.took.Round(time.Millisecond), res.stop, tooLarge, other, ga)
		if other > 0 {
			t.Errorf("%d bomb blocks were answered with something else than 431", other)
		}
		// Each oversized block costs flood credit and its 431 earns none:
		// the connection ends with ENHANCE_YOUR_CALM after ~100 blocks.
		switch {
		case ga == nil && !h.ended():
			t.Errorf("%d HPACK bomb blocks and the connection is still open", res.units)
		case ga != nil && ga.code != http2.ErrCodeEnhanceYourCalm:
			t.Errorf("HPACK bombs: GOAWAY %+v, want ENHANCE_YOUR_CALM", ga)
		}
		if cpu > attackCPUCeiling {
			t.Errorf("the HPACK bombs cost the node %v of CPU, want < %v", cpu, attackCPUCeiling)
		}
	}
	rssAfter := rssMB(t, p)
	t.Logf("HPACK bomb: proxy RSS %.1f MB before, %.1f MB after", rssBefore, rssAfter)
	if rssAfter-rssBefore > 64 {
		t.Errorf("the proxy's RSS grew by %.1f MB under the HPACK bomb", rssAfter-rssBefore)
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// RFC 9113 §10.5.1: a header list over MAX_HEADER_BYTES is answered 431
// on its stream; the connection goes on.
func TestHTTP2HeaderListTooLarge(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t) // MAX_HEADER_BYTES: 32 KiB
	h := openH2(t, p, "127.0.0.26", true)
	if v := h.settings[http2.SettingMaxHeaderListSize]; v != 32<<10 {
		t.Errorf("SETTINGS_MAX_HEADER_LIST_SIZE = %d, want MAX_HEADER_BYTES (32768)", v)
	}
	tok := mint(t, "large-headers", "us-east")
	host := hostOf(origin.URL)
	m := meterCPU(t, p)
	fields := get(host, "/too-large", tok)
	for i := range 10 { // 10 × 4 KB: 40 KB, in HEADERS + CONTINUATIONs
		fields = append(fields, fmt.Sprintf("x-big-%d", i), strings.Repeat(fmt.Sprintf("%x", i*7919), 4000)[:4000])
	}
	h.request(1, true, fields...)
	st := h.waitStream(1, "the 40 KB header list", func(s *peerStream) bool { return s.ended })
	if st.status != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("40 KB of headers: %+v, want 431", st)
	}
	h.request(3, true, get(host, "/after-431", tok)...)
	st = h.waitStream(3, "the request after the 431", func(s *peerStream) bool { return s.ended })
	if st.status != http.StatusOK || !strings.Contains(string(st.data), "/after-431") {
		t.Fatalf("the request after the 431: %d %q, want 200 from the origin", st.status, st.data)
	}

	// One field longer than the whole limit.
	h2 := openH2(t, p, "127.0.0.26", true)
	h2.request(1, true, append(get(host, "/one-huge-field", tok), "x-huge", strings.Repeat("h", 40<<10))...)
	waitFor(t, "an answer to one 40 KB field", func() bool {
		h2.mu.Lock()
		defer h2.mu.Unlock()
		return h2.streamLocked(1).ended || h2.goAway != nil || h2.readErr != nil
	})
	h2.mu.Lock()
	st, ga := *h2.streamLocked(1), h2.goAway
	h2.mu.Unlock()
	t.Logf("one 40 KB field: stream %+v, GOAWAY %+v", st, ga)
	m.report("header lists over MAX_HEADER_BYTES", 2, "oversized header lists", "list")
	if st.status != http.StatusRequestHeaderFieldsTooLarge || ga != nil {
		t.Errorf("one 40 KB field: stream %+v, GOAWAY %+v, want 431 and the connection kept", st, ga)
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9515: SETTINGS at full speed.
func TestAttackSettingsFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog)
	h := openH2(t, p, "127.0.0.27", true)
	runFlood(t, p, h, "SETTINGS flood", 800, func(fw *http2.Framer, i int) int {
		_ = fw.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 4096})
		return 1
	})
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9512: PINGs at full speed, from a client that reads the ACKs
// and from one that never reads.
func TestAttackPingFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog)
	ping := func(fw *http2.Framer, i int) int {
		var d [8]byte
		copy(d[:], fmt.Sprintf("%08d", i%100000000))
		_ = fw.WritePing(false, d)
		return 1
	}
	runFlood(t, p, openH2(t, p, "127.0.0.28", true), "PING flood, reading", 800, ping)
	runFlood(t, p, openH2(t, p, "127.0.0.29", false), "PING flood, never reading", 0, ping)
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9518: empty and padding-only DATA frames on an open stream.
func TestAttackEmptyDataFlood(t *testing.T) {
	origin := echoOrigin(t)
	stalled, accepted := silentOrigin(t)
	p, _ := hostile(t, connErrorLog)
	h := openH2(t, p, "127.0.0.30", true)
	h.request(1, false, ":method", "POST", ":scheme", "http", ":authority", stalled, ":path", "/empty-data",
		"proxy-authorization", "Bearer "+mint(t, "empty-data", "us-east"))
	waitFor(t, "the forward to reach the origin", func() bool { return accepted.Load() > 0 })
	pad := make([]byte, 8)
	runFlood(t, p, h, "empty DATA flood", 800, func(fw *http2.Framer, i int) int {
		if i%2 == 0 {
			_ = fw.WriteData(1, false, nil)
		} else {
			_ = fw.WriteDataPadded(1, false, nil, pad)
		}
		return 1
	})
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9511/9517 family: WINDOW_UPDATEs of one byte at full speed.
func TestAttackWindowUpdateFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog)
	h := openH2(t, p, "127.0.0.31", true)
	runFlood(t, p, h, "WINDOW_UPDATE flood", 800, func(fw *http2.Framer, i int) int {
		_ = fw.WriteWindowUpdate(0, 1)
		return 1
	})
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9513: PRIORITY on idle streams and PRIORITY_UPDATE (RFC 9218)
// at full speed.
func TestAttackPriorityFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog)
	h := openH2(t, p, "127.0.0.32", true)
	runFlood(t, p, h, "PRIORITY flood", 800, func(fw *http2.Framer, i int) int {
		id := uint32(2*(i%1000000) + 101)
		if i%2 == 0 {
			_ = fw.WritePriority(id, http2.PriorityParam{StreamDep: id - 2, Weight: uint8(i)})
		} else {
			payload := []byte{byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id), 'u', '=', '3'}
			_ = fw.WriteRawFrame(0x10, 0, 0, payload) // PRIORITY_UPDATE
		}
		return 1
	})
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// CVE-2019-9514/9516: requests the proxy must reset as malformed (an empty
// field name, an uppercase one, an unknown pseudo-header), at full speed.
func TestAttackMalformedRequestFlood(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, connErrorLog)
	h := openH2(t, p, "127.0.0.33", true)
	host := hostOf(origin.URL)
	bad := [][2]string{{"", "empty-name"}, {"X-Upper", "uppercase"}, {":bogus", "pseudo"}}
	res := runFlood(t, p, h, "malformed request flood", 300, func(fw *http2.Framer, i int) int {
		b := bad[i%len(bad)]
		var f []string
		if strings.HasPrefix(b[0], ":") {
			f = append([]string{b[0], b[1]}, get(host, "/malformed", "")...)
		} else {
			f = append(get(host, "/malformed", ""), b[0], b[1])
		}
		_ = fw.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: h.block(f...), EndStream: true, EndHeaders: true})
		return 1
	})
	protocolErrors, answered := 0, 0
	h.mu.Lock()
	for _, st := range h.streams {
		if st.rst && st.code == http2.ErrCodeProtocol {
			protocolErrors++
		}
		if st.status != 0 {
			answered++
		}
	}
	h.mu.Unlock()
	t.Logf("malformed request flood: %d requests written, %d reset PROTOCOL_ERROR, %d answered", res.units, protocolErrors, answered)
	if protocolErrors == 0 || answered > 0 {
		t.Errorf("malformed requests: %d reset PROTOCOL_ERROR, %d answered; want resets and no answers", protocolErrors, answered)
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// zeros is an upload body of n zero bytes that counts what was read.
type zeros struct {
	n    int64
	read *atomic.Int64
}

func (z *zeros) Read(p []byte) (int, error) {
	if z.n <= 0 {
		return 0, io.EOF
	}
	k := int(min(int64(len(p)), z.n))
	clear(p[:k])
	z.n -= int64(k)
	z.read.Add(int64(k))
	return k, nil
}

// tcpMemMB is the machine's TCP buffer memory (/proc/net/sockstat).
func tcpMemMB(t *testing.T) float64 {
	t.Helper()
	b, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		t.Fatalf("reading /proc/net/sockstat: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		for i := 0; f != nil && f[0] == "TCP:" && i+1 < len(f); i++ {
			if f[i] == "mem" {
				pages, _ := strconv.Atoi(f[i+1])
				return float64(pages) * float64(os.Getpagesize()) / (1 << 20)
			}
		}
	}
	t.Fatal("no TCP mem in /proc/net/sockstat")
	return 0
}

// CVE-2019-9517 (internal data buffering): uploads into an origin that
// never reads. What the proxy buffers is bounded by the windows it grants,
// and those by HTTP2_BODY_BUFFER_BYTES plus the protocol's 64 KiB per
// connection.
func TestAttackUploadIntoStalledOrigin(t *testing.T) {
	origin := echoOrigin(t)
	stalled, accepted := silentOrigin(t)
	const budget = 8 << 20
	p, _ := hostile(t, fmt.Sprintf("HTTP2_BODY_BUFFER_BYTES=%d", budget))
	bystander(t, p, origin.URL) // warm, so the baseline has the usual paths
	bystanderH2(t, p, origin.URL)
	rssBefore := rssMB(t, p)
	tcpBefore := tcpMemMB(t)

	const conns, uploads, perUpload = 20, 8, 16 << 20
	tok := mint(t, "stalled-uploads", "us-east")
	var read atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	var answered atomic.Int64
	m := meterCPU(t, p)
	for i := range conns {
		c, err := dialFrom(p, "127.0.0.34", "h2")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Time{})
		cc, err := (&http2.Transport{}).NewClientConn(c)
		if err != nil {
			t.Fatal(err)
		}
		for j := range uploads {
			u, _ := url.Parse(fmt.Sprintf("http://%s/upload/%d/%d", stalled, i, j))
			req := &http.Request{Method: http.MethodPost, URL: u, Host: u.Host, ContentLength: perUpload,
				Body: io.NopCloser(&zeros{n: perUpload, read: &read}), Header: http.Header{"Proxy-Authorization": {"Bearer " + tok}}}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if res, err := cc.RoundTrip(req.WithContext(ctx)); err == nil {
					answered.Add(1)
					res.Body.Close()
				}
			}()
		}
	}
	// Until the uploads stop moving: every window granted is used up.
	start, last, still := time.Now(), int64(-1), time.Now()
	for time.Since(start) < 3*failsafe && time.Since(still) < 2*time.Second {
		if n := read.Load(); n != last {
			last, still = n, time.Now()
		}
		time.Sleep(100 * time.Millisecond)
	}
	rssDuring := rssMB(t, p)
	tcpDuring := tcpMemMB(t)
	cpu := m.report("uploads into a stalled origin", int(last>>20), "MiB taken", "MiB")
	growth := rssDuring - rssBefore
	bound := float64(budget)/(1<<20) + conns*64.0/1024 + 64
	t.Logf("%d × %d uploads into an origin that never reads (HTTP2_BODY_BUFFER_BYTES=%d MiB): %.1f MiB taken from the clients in %v, %d origin connections, %d answered; proxy RSS %.1f → %.1f MB (+%.1f, bound %.1f)",
		conns, uploads, budget>>20, float64(last)/(1<<20), time.Since(start).Round(time.Millisecond), accepted.Load(), answered.Load(), rssBefore, rssDuring, growth, bound)
	// Not the proxy's heap: the upstream sockets' send buffers (and the
	// origin's receive buffers), kernel memory of the whole machine.
	t.Logf("kernel TCP buffer memory (whole machine, /proc/net/sockstat): %.1f → %.1f MB", tcpBefore, tcpDuring)
	if last >= conns*uploads*perUpload {
		t.Errorf("the uploads never stalled: all %d MiB were taken", last>>20)
	}
	if growth > bound {
		t.Errorf("the proxy's RSS grew by %.1f MB, want < %.1f (budget + 64 KiB per connection + 64 MB)", growth, bound)
	}
	if cpu > attackCPUCeiling*5 {
		t.Errorf("the stalled uploads cost the node %v of CPU", cpu)
	}
	// Served while the uploads are still stuck.
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
	cancel()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(failsafe):
		t.Error("uploads still running after their contexts were cancelled")
	}
}

// SETTINGS_MAX_CONCURRENT_STREAMS: the stream over the limit is refused
// (REFUSED_STREAM, never reaches the origin); a new one is served once
// one ends.
func TestHTTP2StreamLimit(t *testing.T) {
	release := map[string]chan struct{}{}
	for i := 1; i <= 7; i++ {
		release[fmt.Sprintf("/hold/%d", i)] = make(chan struct{})
	}
	var seen atomic.Int64
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ch, held := release[r.URL.Path]
		if !held {
			fmt.Fprintf(w, "origin: %s %s", r.Method, r.URL.Path) // the bystanders
			return
		}
		seen.Add(1)
		select {
		case <-ch:
		case <-r.Context().Done():
			return
		case <-time.After(2 * failsafe):
		}
		fmt.Fprintf(w, "origin: %s %s", r.Method, r.URL.Path)
	}))
	t.Cleanup(origin.Close)
	p, _ := hostile(t, "HTTP2_MAX_CONCURRENT_STREAMS=5")
	h := openH2(t, p, "127.0.0.35", true)
	if v, ok := h.settings[http2.SettingMaxConcurrentStreams]; !ok || v != 5 {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d (sent: %v), want 5", v, ok)
	}
	tok := mint(t, "stream-limit", "us-east")
	host := hostOf(origin.URL)
	m := meterCPU(t, p)
	for k := uint32(1); k <= 5; k++ {
		h.request(2*k-1, true, get(host, fmt.Sprintf("/hold/%d", k), tok)...)
	}
	waitFor(t, "five requests at the origin", func() bool { return seen.Load() == 5 })
	h.request(11, true, get(host, "/hold/6", tok)...)
	st := h.waitStream(11, "the sixth stream", func(s *peerStream) bool { return s.ended })
	if !st.rst || st.code != http2.ErrCodeRefusedStream {
		t.Fatalf("the sixth concurrent stream: %+v, want RST_STREAM REFUSED_STREAM", st)
	}
	close(release["/hold/1"])
	if st := h.waitStream(1, "the first stream", func(s *peerStream) bool { return s.ended }); st.status != http.StatusOK {
		t.Fatalf("the first stream: %+v, want 200", st)
	}
	if n := seen.Load(); n != 5 {
		t.Errorf("the origin saw %d requests, want 5: the refused one went through", n)
	}
	h.request(13, true, get(host, "/hold/7", tok)...)
	waitFor(t, "the stream after one ended to reach the origin", func() bool { return seen.Load() == 6 })
	close(release["/hold/7"])
	if st := h.waitStream(13, "the stream after one ended", func(s *peerStream) bool { return s.ended }); st.status != http.StatusOK || !strings.Contains(string(st.data), "/hold/7") {
		t.Fatalf("the stream after one ended: %d %q, want 200 from the origin", st.status, st.data)
	}
	for k := uint32(2); k <= 5; k++ {
		close(release[fmt.Sprintf("/hold/%d", k)])
		if st := h.waitStream(2*k-1, "a held stream", func(s *peerStream) bool { return s.ended }); st.status != http.StatusOK {
			t.Errorf("held stream %d: %+v, want 200", 2*k-1, st)
		}
	}
	m.report("stream limit", 7, "streams", "stream")
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// IDLE_TIMEOUT: a connection without streams gets GOAWAY(NO_ERROR), then
// is closed.
func TestHTTP2IdleConnectionGoAway(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, "IDLE_TIMEOUT=1s")
	h := openH2(t, p, "127.0.0.36", true)
	h.request(1, true, get(hostOf(origin.URL), "/before-idle", mint(t, "idle", "us-east"))...)
	if st := h.waitStream(1, "the request before the idle time", func(s *peerStream) bool { return s.ended }); st.status != http.StatusOK {
		t.Fatalf("the request before the idle time: %+v", st)
	}
	idle := time.Now()
	m := meterCPU(t, p)
	ga, closed := h.waitClosed(failsafe)
	m.report("idle connection", 1, "connection", "connection")
	h.mu.Lock()
	closedAfter := h.closedAt.Sub(idle)
	h.mu.Unlock()
	if ga == nil {
		t.Fatalf("no GOAWAY on an idle connection (closed: %v)", closed)
	}
	t.Logf("idle connection (IDLE_TIMEOUT=1s): GOAWAY %v (last stream %d) after %v, closed after %v",
		ga.code, ga.last, ga.at.Sub(idle).Round(time.Millisecond), closedAfter.Round(time.Millisecond))
	if ga.code != http2.ErrCodeNo || ga.last != 1 {
		t.Errorf("GOAWAY %v last stream %d, want NO_ERROR and 1", ga.code, ga.last)
	}
	if ga.at.Sub(idle) < 500*time.Millisecond {
		t.Errorf("GOAWAY %v after the last stream ended, before IDLE_TIMEOUT", ga.at.Sub(idle))
	}
	if !closed {
		t.Errorf("the idle connection was not closed within %v of its GOAWAY", failsafe)
	}
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}

// HEADER_READ_TIMEOUT bounds the wait for the client preface: a client
// that negotiates h2 and then sends nothing (or the preface and no
// SETTINGS) is closed.
func TestAttackNoPreface(t *testing.T) {
	origin := echoOrigin(t)
	p, _ := hostile(t, "HEADER_READ_TIMEOUT=2s")
	m := meterCPU(t, p)
	for _, leg := range []struct{ name, src, send string }{
		{"nothing after the TLS handshake", "127.0.0.37", ""},
		{"the preface and no SETTINGS", "127.0.0.38", http2.ClientPreface},
		{"half the preface", "127.0.0.39", http2.ClientPreface[:12]},
	} {
		c, err := dialFrom(p, leg.src, "h2")
		if err != nil {
			t.Fatal(err)
		}
		if proto := c.ConnectionState().NegotiatedProtocol; proto != "h2" {
			t.Fatalf("ALPN %q, want h2", proto)
		}
		start := time.Now()
		if leg.send != "" {
			if _, err := io.WriteString(c, leg.send); err != nil {
				t.Fatal(err)
			}
		}
		_ = c.SetDeadline(time.Now().Add(failsafe))
		n, err := io.Copy(io.Discard, c)
		took := time.Since(start)
		c.Close()
		t.Logf("%s: closed after %v (%d bytes from the proxy; %v)", leg.name, took.Round(time.Millisecond), n, err)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s: the connection is still open after %v", leg.name, failsafe)
		} else if took < 1800*time.Millisecond {
			t.Errorf("%s: closed after %v, before HEADER_READ_TIMEOUT (2s)", leg.name, took)
		}
	}
	m.report("connections without a preface", 3, "connections", "connection")
	bystander(t, p, origin.URL)
	bystanderH2(t, p, origin.URL)
}
