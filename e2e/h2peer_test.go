package e2e

// Tools of the HTTP/2 attack tests (h2attack_test.go): a raw HTTP/2 peer
// whose frames the test writes itself, at full speed when it floods, and
// whose reader records what the proxy answers; the node's CPU from /proc;
// and an HTTP/2 bystander.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc/PID/stat: 100
// on every Linux architecture Go runs on.
const clockTicks = 100

// procCPU is the CPU time (user + system, all threads) the proxy process
// has used so far, from /proc/PID/stat, in 10 ms steps.
func procCPU(t *testing.T, p *proc) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Cmd.Process.Pid))
	if err != nil {
		t.Fatalf("reading the proxy's CPU time: %v", err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		t.Fatalf("short /proc stat line %q", s)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("bad /proc stat line %q", s)
	}
	return time.Duration(ut+st) * (time.Second / clockTicks)
}

// procCPUPrecise sums the nanosecond run times of the proxy's threads
// (/proc/PID/task/*/schedstat): the resolution that per-frame figures of
// short floods need. It misses threads that exited in between (Go rarely
// ends its threads); -1 when schedstat is not available.
func procCPUPrecise(p *proc) time.Duration {
	dir := fmt.Sprintf("/proc/%d/task", p.Cmd.Process.Pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	var sum int64
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "schedstat"))
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return -1
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return -1
		}
		sum += ns
	}
	return time.Duration(sum)
}

// cpuMeter measures the node's CPU over one attack.
type cpuMeter struct {
	t            *testing.T
	p            *proc
	cpu, precise time.Duration
	start        time.Time
}

func meterCPU(t *testing.T, p *proc) *cpuMeter {
	return &cpuMeter{t: t, p: p, cpu: procCPU(t, p), precise: procCPUPrecise(p), start: time.Now()}
}

// report logs the node's CPU since the meter started, and per unit of
// the attack (n of them, called units; per is the singular), and returns
// the /proc/PID/stat figure.
func (m *cpuMeter) report(what string, n int, units, per string) time.Duration {
	m.t.Helper()
	used := procCPU(m.t, m.p) - m.cpu
	precise := time.Duration(-1)
	if m.precise >= 0 {
		if now := procCPUPrecise(m.p); now >= 0 {
			precise = now - m.precise
		}
	}
	each := "-"
	if n > 0 {
		base := used
		if precise >= 0 {
			base = precise
		}
		each = fmt.Sprintf("%.2f µs", float64(base.Nanoseconds())/1e3/float64(n))
	}
	m.t.Logf("%s: node CPU %v (utime+stime; %v by schedstat) in %v for %d %s: %s per %s",
		what, used, precise.Round(time.Microsecond), time.Since(m.start).Round(time.Millisecond), n, units, each, per)
	return used
}

// peerStream is what the proxy sent on one stream.
type peerStream struct {
	status int // of the final response; 0 before it
	header http.Header
	data   []byte // the first 64 KiB of the body
	ended  bool   // END_STREAM or RST_STREAM received
	rst    bool
	code   http2.ErrCode // of the RST_STREAM
}

// goAwayInfo is the proxy's first GOAWAY.
type goAwayInfo struct {
	code  http2.ErrCode
	last  uint32
	debug string
	at    time.Time
}

// lastID is the GOAWAY's last stream id; 0 without a GOAWAY.
func (g *goAwayInfo) lastID() uint32 {
	if g == nil {
		return 0
	}
	return g.last
}

// h2Peer is a raw HTTP/2 connection to the proxy. The test goroutine
// writes (frames built into a buffer, one TLS write per batch); one reader
// goroutine records the proxy's frames and never writes, so a flood that
// makes the proxy stop reading cannot wedge it.
type h2Peer struct {
	t        *testing.T
	p        *proc
	conn     net.Conn
	fr       *http2.Framer // the reader's
	settings map[http2.SettingID]uint32

	wmu  sync.Mutex
	wbuf bytes.Buffer
	wfr  *http2.Framer // writes into wbuf
	enc  *hpack.Encoder
	hbuf bytes.Buffer

	reading atomic.Bool

	mu       sync.Mutex
	goAway   *goAwayInfo
	readErr  error
	closedAt time.Time
	streams  map[uint32]*peerStream
	frames   map[http2.FrameType]int
	pingAcks map[[8]byte]bool
}

// openH2 connects from src, sends the preface and SETTINGS (a huge
// initial window first, then settings), reads the proxy's SETTINGS, acks
// them and opens the connection window wide: a client that takes whatever
// the proxy sends. With read, the reader goroutine starts at once;
// otherwise startReader starts it.
func openH2(t *testing.T, p *proc, src string, read bool, settings ...http2.Setting) *h2Peer {
	t.Helper()
	raw := newH2Raw(t, p, src, append([]http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1}}, settings...)...)
	h := &h2Peer{t: t, p: p, conn: raw.Conn, fr: raw.Framer, settings: map[http2.SettingID]uint32{},
		streams: map[uint32]*peerStream{}, frames: map[http2.FrameType]int{}, pingAcks: map[[8]byte]bool{}}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	h.wfr = http2.NewFramer(&h.wbuf, nil)
	h.wfr.AllowIllegalWrites = true
	h.enc = hpack.NewEncoder(&h.hbuf)
	// The proxy speaks first: its SETTINGS are on their way already.
	f, err := h.fr.ReadFrame()
	if err != nil {
		t.Fatalf("reading the proxy's SETTINGS: %v", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		t.Fatalf("the proxy's first frame is %v, want SETTINGS", f)
	}
	_ = sf.ForeachSetting(func(s http2.Setting) error { h.settings[s.ID] = s.Val; return nil })
	if err := h.send(func(fw *http2.Framer) {
		_ = fw.WriteSettingsAck()
		_ = fw.WriteWindowUpdate(0, 1<<30)
	}); err != nil {
		t.Fatalf("acking SETTINGS: %v", err)
	}
	if read {
		h.startReader()
	}
	return h
}

func (h *h2Peer) startReader() {
	h.reading.Store(true)
	go h.readLoop()
}

func (h *h2Peer) readerRunning() bool { return h.reading.Load() }

func (h *h2Peer) readLoop() {
	_ = h.conn.SetReadDeadline(time.Now().Add(4 * failsafe))
	for {
		f, err := h.fr.ReadFrame()
		h.mu.Lock()
		if err != nil {
			h.readErr, h.closedAt = err, time.Now()
			h.mu.Unlock()
			return
		}
		h.frames[f.Header().Type]++
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			if h.goAway == nil {
				h.goAway = &goAwayInfo{code: f.ErrCode, last: f.LastStreamID, debug: string(f.DebugData()), at: time.Now()}
			}
		case *http2.MetaHeadersFrame:
			st := h.streamLocked(f.StreamID)
			if s, err := strconv.Atoi(f.PseudoValue("status")); err == nil && s >= 200 && st.status == 0 {
				st.status = s
				st.header = http.Header{}
				for _, hf := range f.RegularFields() {
					st.header.Add(hf.Name, hf.Value)
				}
			}
			st.ended = st.ended || f.StreamEnded()
		case *http2.DataFrame:
			st := h.streamLocked(f.StreamID)
			if len(st.data) < 64<<10 {
				st.data = append(st.data, f.Data()...)
			}
			st.ended = st.ended || f.StreamEnded()
		case *http2.PingFrame:
			if f.IsAck() {
				h.pingAcks[f.Data] = true
			}
		case *http2.RSTStreamFrame:
			st := h.streamLocked(f.StreamID)
			st.ended, st.rst, st.code = true, true, f.ErrCode
		}
		h.mu.Unlock()
	}
}

func (h *h2Peer) streamLocked(id uint32) *peerStream {
	st := h.streams[id]
	if st == nil {
		st = &peerStream{}
		h.streams[id] = st
	}
	return st
}

// send builds frames with build and writes them in one TLS write.
func (h *h2Peer) send(build func(fw *http2.Framer)) error {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	h.wbuf.Reset()
	build(h.wfr)
	_ = h.conn.SetWriteDeadline(time.Now().Add(failsafe))
	_, err := h.conn.Write(h.wbuf.Bytes())
	return err
}

// block HPACK-encodes fields (name, value pairs) with the connection's
// encoder: the blocks must then be sent in the order they were encoded.
func (h *h2Peer) block(fields ...string) []byte {
	hf := make([]hpack.HeaderField, 0, len(fields)/2)
	for i := 0; i+1 < len(fields); i += 2 {
		hf = append(hf, hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return h.encode(hf...)
}

func (h *h2Peer) encode(fields ...hpack.HeaderField) []byte {
	h.hbuf.Reset()
	for _, f := range fields {
		_ = h.enc.WriteField(f)
	}
	return bytes.Clone(h.hbuf.Bytes())
}

// writeBlock writes a header block as HEADERS and CONTINUATIONs of at
// most 16 KiB each.
func writeBlock(fw *http2.Framer, id uint32, endStream bool, block []byte) {
	first := true
	for {
		frag := block[:min(len(block), 16384)]
		block = block[len(frag):]
		if first {
			_ = fw.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: frag, EndStream: endStream, EndHeaders: len(block) == 0})
		} else {
			_ = fw.WriteContinuation(id, len(block) == 0, frag)
		}
		first = false
		if len(block) == 0 {
			return
		}
	}
}

// request sends a request on stream id.
func (h *h2Peer) request(id uint32, endStream bool, fields ...string) {
	h.t.Helper()
	b := h.block(fields...)
	if err := h.send(func(fw *http2.Framer) { writeBlock(fw, id, endStream, b) }); err != nil {
		h.t.Fatalf("sending the request on stream %d: %v", id, err)
	}
}

// ended reports whether the proxy sent GOAWAY or the connection is gone.
func (h *h2Peer) ended() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.goAway != nil || h.readErr != nil
}

// waitClosed waits up to within for the connection to close and returns
// the GOAWAY seen before, if any, and whether it closed.
func (h *h2Peer) waitClosed(within time.Duration) (*goAwayInfo, bool) {
	deadline := time.Now().Add(within)
	for {
		h.mu.Lock()
		ga, err := h.goAway, h.readErr
		h.mu.Unlock()
		if err != nil || time.Now().After(deadline) {
			return ga, err != nil
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitPingAck waits for the ACK of a PING with data d, or the end of
// the connection.
func (h *h2Peer) waitPingAck(d [8]byte) {
	deadline := time.Now().Add(failsafe)
	for time.Now().Before(deadline) {
		h.mu.Lock()
		ok := h.pingAcks[d] || h.readErr != nil || h.goAway != nil
		h.mu.Unlock()
		if ok {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// waitStream waits for cond on stream id and returns the stream's state;
// it fails the test if the connection closes first or failsafe passes.
func (h *h2Peer) waitStream(id uint32, what string, cond func(*peerStream) bool) peerStream {
	h.t.Helper()
	deadline := time.Now().Add(failsafe)
	for {
		h.mu.Lock()
		st := h.streamLocked(id)
		ok, snap, err, ga := cond(st), *st, h.readErr, h.goAway
		h.mu.Unlock()
		switch {
		case ok:
			return snap
		case err != nil:
			h.t.Fatalf("%s: connection closed first (GOAWAY %+v): %v", what, ga, err)
		case time.Now().After(deadline):
			h.t.Fatalf("%s: timed out; stream %d is %+v", what, id, snap)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (h *h2Peer) frameCounts() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var parts []string
	for t, n := range h.frames {
		parts = append(parts, fmt.Sprintf("%v:%d", t, n))
	}
	return strings.Join(parts, " ")
}

// floodResult is what a flood wrote before it stopped.
type floodResult struct {
	units, frames int
	took          time.Duration
	stop          string
}

// flood writes units of frames (unit(fw, i) appends unit i and returns
// its frame count), batch units per TLS write, as fast as the proxy takes
// them, until the proxy sent GOAWAY or closed (seen by the reader, if it
// runs), a write fails, maxUnits are written or limit has passed.
func (h *h2Peer) flood(limit time.Duration, maxUnits, batch int, unit func(fw *http2.Framer, i int) int) floodResult {
	var res floodResult
	start := time.Now()
	res.stop = "time limit"
	for {
		if res.units >= maxUnits {
			res.stop = "all units written"
			break
		}
		if time.Since(start) >= limit {
			break
		}
		if h.ended() {
			res.stop = "GOAWAY or close seen"
			break
		}
		h.wmu.Lock()
		h.wbuf.Reset()
		n, frames := 0, 0
		for ; n < batch && res.units+n < maxUnits; n++ {
			frames += unit(h.wfr, res.units+n)
		}
		_ = h.conn.SetWriteDeadline(start.Add(limit + 2*time.Second))
		_, err := h.conn.Write(h.wbuf.Bytes())
		h.wmu.Unlock()
		if err != nil {
			res.stop = "write failed: " + err.Error()
			break
		}
		res.units += n
		res.frames += frames
	}
	res.took = time.Since(start)
	return res
}

// expectCalm checks that the proxy ended an attack connection with GOAWAY
// ENHANCE_YOUR_CALM and closed it. A GOAWAY the client never saw counts if
// the proxy logged it for this connection (LOG_LEVEL=debug): closing with
// the client's frames unread makes the kernel reset the connection, and a
// reset drops what the proxy had not sent yet.
func expectCalm(t *testing.T, h *h2Peer, what string) *goAwayInfo {
	t.Helper()
	ga, closed := h.waitClosed(failsafe)
	if !closed {
		t.Errorf("%s: the connection is still open %v after the attack", what, failsafe)
	}
	switch {
	case ga != nil && ga.code != http2.ErrCodeEnhanceYourCalm:
		t.Errorf("%s: GOAWAY %v %q, want ENHANCE_YOUR_CALM", what, ga.code, ga.debug)
	case ga == nil:
		h.mu.Lock()
		err := h.readErr
		h.mu.Unlock()
		code, logged := h.loggedConnError()
		switch {
		case !logged:
			t.Errorf("%s: no GOAWAY, and the proxy logged no connection error (closed: %v, %v; frames from the proxy: %s)", what, closed, err, h.frameCounts())
		case code != http2.ErrCodeEnhanceYourCalm:
			t.Errorf("%s: the proxy logged a connection error %v, want ENHANCE_YOUR_CALM", what, code)
		default:
			t.Logf("%s: GOAWAY ENHANCE_YOUR_CALM logged by the proxy but lost to a reset: the client read %v after frames %s",
				what, err, h.frameCounts())
		}
	}
	return ga
}

// loggedConnError finds the proxy's debug line for a connection error on
// h's connection.
func (h *h2Peer) loggedConnError() (http2.ErrCode, bool) {
	deadline := time.Now().Add(2 * time.Second)
	for {
		for _, line := range strings.Split(h.p.Log.String(), "\n") {
			if !strings.Contains(line, `"msg":"HTTP/2 connection error"`) || !strings.Contains(line, `"client":"`+h.conn.LocalAddr().String()+`"`) {
				continue
			}
			var rec struct{ Code uint32 }
			if json.Unmarshal([]byte(line), &rec) == nil {
				return http2.ErrCode(rec.Code), true
			}
		}
		if time.Now().After(deadline) {
			return 0, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoTCP is a TCP origin that echoes what it reads.
func echoTCP(t *testing.T) string {
	t.Helper()
	return testutil.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(4 * failsafe))
		_, _ = io.Copy(c, c)
	})
}

// bystanderH2 opens a fresh HTTP/2 connection from 127.0.0.1 with its own
// token and fails the test unless a CONNECT tunnel to an echo server
// echoes and a forwarded GET to origin is answered by the origin.
func bystanderH2(t *testing.T, p *proc, origin string) {
	t.Helper()
	echo := echoTCP(t)
	h := openH2(t, p, "127.0.0.1", true)
	defer h.conn.Close()
	tok := "Bearer " + mint(t, "bystander-h2", "us-east")

	h.request(1, false, ":method", "CONNECT", ":authority", echo, "proxy-authorization", tok)
	st := h.waitStream(1, "HTTP/2 bystander CONNECT", func(s *peerStream) bool { return s.status != 0 || s.ended })
	if st.status != http.StatusOK {
		t.Fatalf("HTTP/2 bystander CONNECT: %+v, want 200", st)
	}
	msg := []byte("bystander over an HTTP/2 tunnel")
	if err := h.send(func(fw *http2.Framer) { _ = fw.WriteData(1, false, msg) }); err != nil {
		t.Fatalf("HTTP/2 bystander: writing into the tunnel: %v", err)
	}
	st = h.waitStream(1, "HTTP/2 bystander echo", func(s *peerStream) bool { return len(s.data) >= len(msg) || s.ended })
	if !bytes.Equal(st.data, msg) {
		t.Fatalf("HTTP/2 bystander: the tunnel echoed %q, want %q", st.data, msg)
	}
	_ = h.send(func(fw *http2.Framer) { _ = fw.WriteRSTStream(1, http2.ErrCodeCancel) })

	u := strings.TrimPrefix(origin, "http://")
	h.request(3, true, ":method", "GET", ":scheme", "http", ":authority", u, ":path", "/bystander-h2", "proxy-authorization", tok)
	st = h.waitStream(3, "HTTP/2 bystander GET", func(s *peerStream) bool { return s.ended })
	if st.status != http.StatusOK || !strings.Contains(string(st.data), "/bystander-h2") {
		t.Fatalf("HTTP/2 bystander GET: %d %q, want 200 from the origin", st.status, st.data)
	}
}
