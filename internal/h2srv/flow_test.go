package h2srv

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// flowClient sends request bodies within the windows the server grants: a
// goroutine reads every frame, applies SETTINGS and WINDOW_UPDATEs, counts
// the updates and queues the other frames for the test.
type flowClient struct {
	c    *client
	mu   sync.Mutex
	cond sync.Cond

	settings       bool
	initWin        int64            // the server's SETTINGS_INITIAL_WINDOW_SIZE
	connWin        int64            // what we may still send on the connection
	streamWin      map[uint32]int64 // per stream: granted minus sent, over initWin
	wuConn, wuStrm int              // WINDOW_UPDATE frames seen
	frames         []frame
	err            error
	done           chan struct{}
}

func newFlowClient(c *client) *flowClient {
	fc := &flowClient{c: c, initWin: 65535, connWin: 65535, streamWin: map[uint32]int64{}, done: make(chan struct{})}
	fc.cond.L = &fc.mu
	go fc.readLoop()
	// The reader must be gone before the test's leak check.
	c.t.Cleanup(func() { c.Conn.Close(); <-fc.done })
	return fc
}

func (fc *flowClient) readLoop() {
	defer close(fc.done)
	for {
		f, err := fc.c.read()
		fc.mu.Lock()
		if err != nil {
			fc.err = err
			fc.cond.Broadcast()
			fc.mu.Unlock()
			return
		}
		switch {
		case f.Type == http2.FrameSettings && !f.Flags.Has(http2.FlagSettingsAck):
			for _, s := range f.Settings {
				if s.ID == http2.SettingInitialWindowSize {
					fc.initWin = int64(s.Val)
				}
			}
			fc.settings = true
		case f.Type == http2.FrameWindowUpdate && f.Stream == 0:
			fc.connWin += int64(f.Incr)
			fc.wuConn++
		case f.Type == http2.FrameWindowUpdate:
			fc.streamWin[f.Stream] += int64(f.Incr)
			fc.wuStrm++
		default:
			fc.frames = append(fc.frames, f)
		}
		fc.cond.Broadcast()
		fc.mu.Unlock()
	}
}

// window is what may be sent on stream id now.
func (fc *flowClient) windowLocked(id uint32) int64 {
	return min(fc.connWin, fc.initWin+fc.streamWin[id])
}

// waitLocked waits for cond with the failsafe.
func (fc *flowClient) waitLocked(what string, cond func() bool) {
	t := time.AfterFunc(failsafe, func() {
		fc.mu.Lock()
		if fc.err == nil {
			fc.err = fmt.Errorf("timed out waiting for %s", what)
		}
		fc.cond.Broadcast()
		fc.mu.Unlock()
	})
	defer t.Stop()
	for !cond() && fc.err == nil {
		fc.cond.Wait()
	}
}

// send sends p on stream id in DATA frames as the windows allow; with
// strict, running out of window (after a barrier) is an error rather than
// a wait.
func (fc *flowClient) send(id uint32, p []byte, end, strict bool) error {
	for first := true; first || len(p) > 0; first = false {
		fc.mu.Lock()
		fc.waitLocked("the server's SETTINGS", func() bool { return fc.settings })
		win := fc.windowLocked(id)
		fc.mu.Unlock()
		if win <= 0 && len(p) > 0 {
			if strict {
				fc.barrier()
				fc.mu.Lock()
				win = fc.windowLocked(id)
				cw, sw := fc.connWin, fc.initWin+fc.streamWin[id]
				fc.mu.Unlock()
				if win <= 0 {
					return fmt.Errorf("no window to send %d more bytes on stream %d (connection %d, stream %d)", len(p), id, cw, sw)
				}
			} else {
				fc.mu.Lock()
				fc.waitLocked("window", func() bool { return fc.windowLocked(id) > 0 })
				err := fc.err
				fc.mu.Unlock()
				if err != nil {
					return err
				}
				continue
			}
		}
		n := min(int64(len(p)), win, 16384)
		fc.mu.Lock()
		fc.connWin -= n
		fc.streamWin[id] -= n
		err := fc.err
		fc.mu.Unlock()
		if err != nil {
			return err
		}
		if err := fc.c.Framer.WriteData(id, end && int(n) == len(p), p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// take removes from the queue and returns the first frame that satisfies
// keep, waiting for it.
func (fc *flowClient) take(keep func(frame) bool) frame {
	fc.c.t.Helper()
	fc.mu.Lock()
	defer fc.mu.Unlock()
	for i := 0; ; i++ {
		if i == len(fc.frames) {
			fc.waitLocked("a frame", func() bool { return len(fc.frames) > i })
			if len(fc.frames) == i {
				fc.c.t.Fatalf("waiting for a frame: %v", fc.err)
			}
		}
		if f := fc.frames[i]; keep(f) {
			fc.frames = append(fc.frames[:i], fc.frames[i+1:]...)
			return f
		}
	}
}

// barrier is client.barrier through the reader goroutine.
func (fc *flowClient) barrier() {
	for range 2 {
		fc.c.ping++
		var data [8]byte
		copy(data[:], fmt.Sprintf("b%07d", fc.c.ping))
		if err := fc.c.Framer.WritePing(false, data); err != nil {
			fc.c.t.Errorf("writing PING: %v", err)
			return
		}
		fc.take(func(f frame) bool {
			return f.Type == http2.FramePing && f.Flags.Has(http2.FlagPingAck) && bytes.Equal(f.Data, data[:])
		})
	}
}

// response is client.response through the reader goroutine.
func (fc *flowClient) response(id uint32) (hdr frame, body []byte, last frame) {
	return collectResponse(id, func() frame { return fc.take(func(f frame) bool { return f.Stream == id }) })
}

func countingHandler(w http.ResponseWriter, r *http.Request) {
	n, err := io.Copy(io.Discard, r.Body)
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
	}
	fmt.Fprint(w, n)
}

// An 8 MiB upload costs few WINDOW_UPDATEs: they are granted in batches
// of a quarter window, not per frame.
func TestUploadWindowUpdates(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(countingHandler)})
	fc := newFlowClient(dial(t, addr))
	fc.c.mustHeaders(1, false, post("/")...)
	const size = 8 << 20
	if err := fc.send(1, make([]byte, size), true, false); err != nil {
		t.Fatal(err)
	}
	hdr, body, _ := fc.response(1)
	if statusOf(hdr) != "200" || string(body) != strconv.Itoa(size) {
		t.Fatalf("response %v %q", hdr, body)
	}
	fc.mu.Lock()
	conn, strm := fc.wuConn, fc.wuStrm
	fc.mu.Unlock()
	t.Logf("8 MiB upload: %d WINDOW_UPDATE frames (%d connection, %d stream)", conn+strm, conn, strm)
	if conn+strm > 100 {
		t.Errorf("%d WINDOW_UPDATE frames for 8 MiB, want at most 100", conn+strm)
	}
}

// A client whose stream window is zero (SETTINGS_INITIAL_WINDOW_SIZE=0)
// gets the response HEADERS and no DATA until it grants window, and then
// exactly as much as it granted.
func TestZeroWindowNoDataUntilUpdate(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello")
	})})
	c := dial(t, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	c.mustHeaders(1, true, get("/")...)
	hdr, _ := c.until(func(f frame) bool { return f.Stream == 1 })
	if hdr.Type != http2.FrameHeaders || hdr.endStream() {
		t.Fatalf("first frame %v, want HEADERS without END_STREAM", hdr)
	}
	if d := onStream(c.barrier(), 1, http2.FrameData); len(d) != 0 {
		t.Fatalf("DATA with a zero window: %v", d)
	}
	if err := c.Framer.WriteWindowUpdate(1, 2); err != nil {
		t.Fatal(err)
	}
	d := onStream(c.barrier(), 1, http2.FrameData)
	if len(d) != 1 || string(d[0].Data) != "he" || d[0].endStream() {
		t.Fatalf("after granting 2 bytes: %v", d)
	}
	if err := c.Framer.WriteWindowUpdate(1, 100); err != nil {
		t.Fatal(err)
	}
	if _, body, last := c.response(1); string(body) != "llo" || !last.endStream() {
		t.Errorf("after granting the rest: %q %v", body, last)
	}
}

// A change of SETTINGS_INITIAL_WINDOW_SIZE applies to open streams, by
// the difference, and may take a window below zero (RFC 9113 §6.9.2).
func TestInitialWindowSizeChangeAdjustsStreams(t *testing.T) {
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "0123456789")
	})})
	c := dial(t, addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	c.mustHeaders(1, true, get("/")...)
	c.until(func(f frame) bool { return f.Stream == 1 && f.Type == http2.FrameHeaders })
	var got []byte
	step := func(what string, send func() error, want string) {
		t.Helper()
		if err := send(); err != nil {
			t.Fatal(err)
		}
		var b []byte
		for _, f := range onStream(c.barrier(), 1, http2.FrameData) {
			b = append(b, f.Data...)
		}
		got = append(got, b...)
		if string(b) != want {
			t.Fatalf("%s: DATA %q, want %q", what, b, want)
		}
	}
	setWin := func(v uint32) func() error {
		return func() error { return c.Framer.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: v}) }
	}
	step("initial window 0 → 4", setWin(4), "0123")                                        // window 4, then 0
	step("initial window 4 → 2", setWin(2), "")                                            // window -2
	step("WINDOW_UPDATE 3", func() error { return c.Framer.WriteWindowUpdate(1, 3) }, "4") // 1, then 0
	step("initial window 2 → 100", setWin(100), "56789")                                   // 98
	if string(got) != "0123456789" {
		t.Errorf("body %q", got)
	}
}

// Windows may not pass 2^31-1: a stream's → RST_STREAM FLOW_CONTROL_ERROR,
// the connection's → GOAWAY FLOW_CONTROL_ERROR (§6.9.1).
func TestWindowOverflow(t *testing.T) {
	g := newGate()
	t.Cleanup(g.open)
	_, addr := newServer(t, Config{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { g.wait(r) })})
	c := dial(t, addr)
	c.mustHeaders(1, true, get("/")...)
	recv(t, g.started, "the handler")
	if err := c.Framer.WriteWindowUpdate(1, 1<<31-1); err != nil {
		t.Fatal(err)
	}
	if f, _ := c.until(isRST(1)); f.Code != http2.ErrCodeFlowControl {
		t.Errorf("stream window overflow: %v", f)
	}
	if err := c.Framer.WriteWindowUpdate(0, 1<<31-1); err != nil {
		t.Fatal(err)
	}
	if ga := c.closed(); ga == nil || ga.Code != http2.ErrCodeFlowControl {
		t.Errorf("connection window overflow: GOAWAY %v", ga)
	}
}

// budgetHooks tracks, from the hooks, the request-body bytes buffered and
// the budget reserved, node-wide, and their highest values.
type budgetHooks struct {
	buffered, maxBuffered atomic.Int64
	reserved, maxReserved atomic.Int64
}

func (b *budgetHooks) hooks() Hooks {
	track := func(v, max *atomic.Int64) func(int64) {
		return func(d int64) {
			n := v.Add(d)
			for m := max.Load(); n > m && !max.CompareAndSwap(m, n); m = max.Load() {
			}
		}
	}
	return Hooks{BodyBuffered: track(&b.buffered, &b.maxBuffered), Reserved: track(&b.reserved, &b.maxReserved)}
}

// With a small node budget and several connections uploading to handlers
// that do not read yet, the budget is never exceeded, nothing is buffered
// beyond the windows granted (budget + 64 KiB per connection), every
// upload completes once the handlers read, and all is given back.
func TestBodyBudget(t *testing.T) {
	const budget, conns, size = 1 << 20, 4, 2 << 20
	var bh budgetHooks
	g := newGate()
	t.Cleanup(g.open)
	s, addr := newServer(t, Config{BodyBudget: budget, Hooks: bh.hooks(), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.wait(r)
		countingHandler(w, r)
	})})
	var maxInUse atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if n := s.BudgetInUse(); n > maxInUse.Load() {
				maxInUse.Store(n)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	body := make([]byte, size)
	_, _ = rand.Read(body)
	results := make(chan string, conns)
	var ccs []*http2.ClientConn
	for range conns {
		cc := dialH2(t, addr)
		ccs = append(ccs, cc)
		go func() {
			req, _ := http.NewRequest("POST", "https://example.com/", bytes.NewReader(body))
			resp, err := cc.RoundTrip(req)
			if err != nil {
				results <- err.Error()
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results <- string(b)
		}()
	}
	for range conns {
		recv(t, g.started, "the handlers")
	}
	// Let the uploads fill what the windows allow (they can reach more
	// than the budget: 64 KiB per connection is not reserved).
	waitFor(t, "the windows to fill", func() bool { return bh.buffered.Load() >= budget })
	g.open()
	for range conns {
		if got := recv(t, results, "the uploads"); got != strconv.Itoa(size) {
			t.Errorf("upload: %s", got)
		}
	}
	close(stop)
	<-sampled
	t.Logf("budget %d: at most %d in use, %d buffered (hooks: %d reserved)", budget, maxInUse.Load(), bh.maxBuffered.Load(), bh.maxReserved.Load())
	if m := maxInUse.Load(); m > budget {
		t.Errorf("BudgetInUse reached %d, over the budget %d", m, budget)
	}
	if m := bh.maxReserved.Load(); m > budget {
		t.Errorf("the Reserved hook reached %d, over the budget %d", m, budget)
	}
	if m, limit := bh.maxBuffered.Load(), int64(budget+conns*65535); m > limit {
		t.Errorf("%d bytes buffered, over budget + 64 KiB per connection (%d)", m, limit)
	}
	if n := bh.buffered.Load(); n != 0 {
		t.Errorf("BodyBuffered hook at %d after every body was read", n)
	}
	for _, cc := range ccs {
		cc.Close()
	}
	waitFor(t, "the connections to close", func() bool { return s.Conns() == 0 })
	if n, m := bh.reserved.Load(), s.BudgetInUse(); n != 0 || m != 0 {
		t.Errorf("after the connections closed: Reserved hook at %d, BudgetInUse %d", n, m)
	}
}

// A body the handler does not read gives its connection window back when
// the handler returns: uploads on the connection go on (were the bytes
// still counted as buffered, the window would shrink with every such
// request until nothing more could be sent). The buffered-bytes gauge
// follows, also when the connection closes with a body unread.
func TestUnreadBodyReturnsConnectionWindow(t *testing.T) {
	var bh budgetHooks
	release := make(chan struct{})
	done := make(chan struct{}, 8)
	_, addr := newServer(t, Config{ConnWindow: 256 << 10, MaxConnWindow: 256 << 10, Hooks: bh.hooks(),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			defer func() { done <- struct{}{} }()
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})})
	fc := newFlowClient(dial(t, addr))
	const part = 200 << 10
	for i := range 4 {
		id := uint32(2*i + 1)
		fc.c.mustHeaders(id, false, post("/")...)
		if err := fc.send(id, make([]byte, part), false, true); err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		fc.barrier() // the bytes are buffered
		release <- struct{}{}
		recv(t, done, "the handler")
		// The response, then RST_STREAM NO_ERROR: the client need not
		// send the rest (§8.1).
		if hdr, _, last := fc.response(id); statusOf(hdr) != "200" || !last.endStream() {
			t.Errorf("request %d: response %v ended with %v", i+1, hdr, last)
		}
		if f := fc.take(isRST(id)); f.Code != http2.ErrCodeNo {
			t.Errorf("request %d: %v, want RST_STREAM NO_ERROR after the response", i+1, f)
		}
	}
	if n := bh.buffered.Load(); n != 0 {
		t.Errorf("BodyBuffered hook at %d after the handlers returned", n)
	}
	// And a connection that goes away with a body unread.
	fc.c.mustHeaders(9, false, post("/")...)
	if err := fc.send(9, make([]byte, part), false, true); err != nil {
		t.Fatal(err)
	}
	fc.barrier()
	fc.c.Conn.Close()
	recv(t, done, "the handler")
	waitFor(t, "the BodyBuffered hook to reach 0", func() bool { return bh.buffered.Load() == 0 })
}

// A handler that reads its buffered body after the connection is gone
// makes the connection reserve nothing more of the node budget: the
// connection gave its reservation back when it closed, and nothing would
// give back one taken later.
func TestReadAfterCloseReservesNothing(t *testing.T) {
	g := newGate()
	t.Cleanup(g.open)
	read := make(chan int64, 1)
	s, addr := newServer(t, Config{ConnWindow: 256 << 10, MaxConnWindow: 1 << 20, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.started <- r.URL.Path
		<-g.ch // not the context: the connection will be gone
		// One Read takes all that is buffered, as a relay's large buffer
		// would.
		n, _ := r.Body.Read(make([]byte, 1<<20))
		read <- int64(n)
	})})
	fc := newFlowClient(dial(t, addr))
	fc.c.mustHeaders(1, false, post("/")...)
	recv(t, g.started, "the handler")
	// Nearly all of the connection window: the next grant would grow it.
	if err := fc.send(1, make([]byte, 250<<10), false, true); err != nil {
		t.Fatal(err)
	}
	fc.barrier()
	fc.c.Conn.Close()
	waitFor(t, "the connection to close", func() bool { return s.Conns() == 0 })
	g.open()
	if n := recv(t, read, "the handler's read"); n != 250<<10 {
		t.Logf("the handler read %d of the %d bytes buffered", n, 250<<10)
	}
	if n := s.BudgetInUse(); n != 0 {
		t.Errorf("BudgetInUse %d after the connection closed and its handler read the body", n)
	}
}
