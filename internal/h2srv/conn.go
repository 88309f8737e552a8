package h2srv

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// conn is one HTTP/2 connection. Its state is guarded by mu and shared by
// three kinds of goroutines: the reader (serve), the writer (writeLoop) and
// handlers. Nobody holds mu across I/O.
type conn struct {
	srv      *Server
	cfg      *Config
	nc       *tls.Conn
	fr       *http2.Framer // reading only
	src      frameSource   // what fr reads
	hdec     *hpack.Decoder
	tlsState *tls.ConnectionState
	remote   string
	baseCtx  context.Context
	batch    batchFuncs

	mu    sync.Mutex
	wcond sync.Cond // the writer waits for work
	tcond sync.Cond // the reader waits for queued control frames to go out

	streams map[uint32]*stream
	maxID   uint32 // the highest client stream id seen
	err     error  // why the connection ended; set once
	// draining: GOAWAY sent; no new streams above lastID. closing: close
	// once what is queued is written.
	draining, closing bool
	lastID            uint32
	goneAway          bool // the client sent GOAWAY

	// Sinks (sink.go), the reader's own: streams with DATA gathered for
	// their sink, how much, and the scratch list of buffers handed to it.
	sinkStreams []*stream
	sinkBytes   int
	sinkBufs    [][]byte

	// Writer side. ctl holds encoded control frames in the order queued.
	ctl          []byte
	ctlFrames    int
	active       []*stream // streams with something to send, round-robin
	connWU       uint32    // connection WINDOW_UPDATE not yet written
	wuStreams    []*stream // streams with a WINDOW_UPDATE not yet written
	henc         *hpack.Encoder
	hbuf         bytes.Buffer
	peerMaxFrame int
	peerWindow   int64 // the peer's SETTINGS_INITIAL_WINDOW_SIZE
	sendWindow   int64 // connection send window
	writerDone   chan struct{}

	// Receive flow control: the client may send recvWindow more bytes;
	// buffered are held in streams. target bounds their sum; the part of
	// it above the protocol's 65,535 is reserved from the node budget.
	recvWindow, buffered, target, reserved int64
	lastData                               time.Time // for shrinking the target; read on tick only

	budget     frameBudget
	hb         *headerBlock // the header block being read, if any
	framesRead uint64
	// keepalive and idle, checked by tick
	timer           *time.Timer
	tickFrames      uint64
	lastRead        time.Time
	pingOut         bool
	pingSentAt      time.Time
	idleSince       time.Time
	dataSinceTick   bool
	recentResets    [8]uint32
	recentResetNext int
}

// batchFuncs lets the writer gather the TLS records of one flush into one
// write(2), when the listener supports it (see Config.Batch).
type batchFuncs struct {
	start func()
	flush func() error
}

func newConn(s *Server, tc *tls.Conn) *conn {
	c := &conn{
		srv:          s,
		cfg:          &s.cfg,
		nc:           tc,
		remote:       tc.RemoteAddr().String(),
		streams:      make(map[uint32]*stream),
		peerMaxFrame: defaultMaxFrame,
		peerWindow:   initialWindow,
		sendWindow:   initialWindow,
		recvWindow:   initialWindow,
		target:       initialWindow,
		writerDone:   make(chan struct{}),
	}
	c.wcond.L = &c.mu
	c.tcond.L = &c.mu
	st := tc.ConnectionState()
	c.tlsState = &st
	c.src.c = c
	c.fr = http2.NewFramer(nil, &c.src)
	c.fr.SetMaxReadFrameSize(maxReadFrame)
	c.hdec = hpack.NewDecoder(4096, c.emitField)
	// A single field longer than MaxHeaderBytes is a 431 like any header
	// list too large (emitField), not a decoding error that ends the
	// connection; the encoded block's own bound limits what is decoded.
	c.hdec.SetMaxStringLength(c.maxEncodedBlock())
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.budget.init()
	c.baseCtx = context.Background()
	if s.cfg.BaseContext != nil {
		c.baseCtx = s.cfg.BaseContext(tc)
	}
	// What net/http puts in every request's context. ReverseProxy looks for
	// ServerContextKey to know that a server recovers its abort panic;
	// without it, a response cut short would end as if complete.
	c.baseCtx = context.WithValue(c.baseCtx, http.ServerContextKey, s.httpSrv)
	c.baseCtx = context.WithValue(c.baseCtx, http.LocalAddrContextKey, tc.LocalAddr())
	if s.cfg.Batch != nil {
		c.batch.start, c.batch.flush = s.cfg.Batch(tc)
	}
	return c
}

// refuse answers a connection that arrived during shutdown with GOAWAY(0).
func (c *conn) refuse() {
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	b := appendSettings(nil)
	b = appendGoAway(b, 0, http2.ErrCodeNo, "")
	_, _ = c.nc.Write(b)
	c.nc.Close()
}

// serve is the connection's reader: it reads and processes frames until
// the connection ends.
func (c *conn) serve() {
	go c.writeLoop()
	c.mu.Lock()
	c.queueSettings()
	c.mu.Unlock()

	c.src.setDeadline(time.Now().Add(c.cfg.HeaderReadTimeout))
	err := c.readPreface()
	if err == nil {
		c.src.setDeadline(time.Time{})
		c.mu.Lock()
		c.idleSince = time.Now()
		c.armTick()
		c.mu.Unlock()
		err = c.readLoop()
	}
	c.endReading(err)
}

func (c *conn) readPreface() error {
	var buf [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(&c.src, buf[:]); err != nil {
		return c.frameReadErr(err)
	}
	if string(buf[:]) != http2.ClientPreface {
		return connErr(http2.ErrCodeProtocol, "bad client preface")
	}
	// RFC 9113 §3.4: the preface continues with a SETTINGS frame.
	fh, err := c.fr.ReadFrameHeader()
	if err != nil {
		return c.frameReadErr(err)
	}
	if fh.Type != http2.FrameSettings || fh.Flags.Has(http2.FlagSettingsAck) {
		return connErr(http2.ErrCodeProtocol, "the preface must be followed by SETTINGS")
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		return c.frameReadErr(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.processSettings(f.(*http2.SettingsFrame))
}

// queueSettings sends our SETTINGS and opens the connection window.
func (c *conn) queueSettings() {
	c.ctl = appendSettings(c.ctl,
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.cfg.MaxConcurrentStreams},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: c.cfg.StreamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: uint32(c.cfg.MaxHeaderBytes)},
		http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxReadFrame},
		http2.Setting{ID: http2.SettingEnableConnectProtocol, Val: 1},
		http2.Setting{ID: settingNoRFC7540Priorities, Val: 1},
	)
	c.ctlFrames++
	if got := c.srv.reserve(int64(c.cfg.ConnWindow)-initialWindow, 0); got > 0 {
		c.reserved = got
		c.target += got
		c.recvWindow += got
		c.connWU += uint32(got)
	}
	c.wcond.Signal()
}

// settingNoRFC7540Priorities is SETTINGS_NO_RFC7540_PRIORITIES (RFC 9218
// §2.1): we ignore the priority tree, and say so.
const settingNoRFC7540Priorities http2.SettingID = 0x9

func (c *conn) readLoop() error {
	for {
		fh, err := c.fr.ReadFrameHeader()
		if err != nil {
			return c.frameReadErr(err)
		}
		f, err := c.fr.ReadFrameForHeader(fh)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.mu.Lock()
				c.streamErrorLocked(se.StreamID, se.Code, "malformed")
				c.mu.Unlock()
				continue
			}
			return c.frameReadErr(err)
		}
		c.mu.Lock()
		c.framesRead++
		err = c.process(f)
		// Stop reading while the client is not taking the answers to what
		// it sends (ACKs, resets): what we queue stays bounded, and a
		// client that floods without reading stalls itself.
		for err == nil && c.ctlFrames >= maxQueuedControl && c.err == nil {
			c.tcond.Wait()
		}
		if err == nil && c.err != nil {
			err = c.err
		}
		if err == nil && c.closing {
			err = errDrained
		}
		c.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// maxQueuedControl is how many control frames (ACKs, resets) may wait for
// the writer before the reader stops reading.
const maxQueuedControl = 64

var errDrained = errors.New("http2: connection drained")

// frameReadErr turns a Framer error into a connection error. A read
// deadline is only set for the preface and for a header block split over
// frames (HeaderReadTimeout): running out of it is the client's fault and
// gets a GOAWAY saying so.
func (c *conn) frameReadErr(err error) error {
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return connErr(http2.ErrCodeProtocol, "preface or header block not complete within the header timeout")
	case errors.As(err, &ce):
		reason := "frame"
		if d := c.fr.ErrorDetail(); d != nil {
			reason = d.Error()
		}
		return connErr(http2.ErrCode(ce), reason)
	case errors.Is(err, http2.ErrFrameTooLarge):
		return connErr(http2.ErrCodeFrameSize, "frame too large")
	}
	return err
}

// connError is a connection error (RFC 9113 §5.4.1): GOAWAY, then close.
type connError struct {
	code   http2.ErrCode
	reason string
}

func (e *connError) Error() string {
	return fmt.Sprintf("http2: connection error %v: %s", e.code, e.reason)
}

func connErr(code http2.ErrCode, reason string) error { return &connError{code, reason} }

// endReading ends the connection after the reader stops: on a connection
// error the client gets GOAWAY first, and has a moment to read it.
func (c *conn) endReading(err error) {
	var ce *connError
	if errors.As(err, &ce) {
		c.mu.Lock()
		c.goAwayLocked(ce.code, ce.reason)
		c.closing = true
		c.wcond.Signal()
		c.mu.Unlock()
		select {
		case <-c.writerDone:
		case <-time.After(time.Second):
		}
		c.cfg.Log.Debug("HTTP/2 connection error", "client", c.remote, "code", ce.code, "reason", ce.reason)
		c.linger()
	} else if errors.Is(err, errDrained) {
		// The writer closes once GOAWAY is out; give the client a moment to
		// close first, so no unread bytes turn the close into a reset.
		select {
		case <-c.writerDone:
		case <-time.After(time.Second):
		}
	}
	c.closeWithError(err)
}

// linger reads and drops what the client still sends, for a moment, before
// the socket closes: closing with unread bytes makes the kernel send a
// reset, which can destroy the GOAWAY (and ACKs) still on their way.
func (c *conn) linger() {
	// The reader is done: a deadline left in the past by frameSource's
	// probe must not cut the linger short.
	c.src.probing = false
	c.src.setDeadline(time.Now().Add(time.Second))
	_, _ = io.CopyN(io.Discard, c.nc, 1<<20)
}

// goAwayLocked queues GOAWAY with the last stream we will serve.
func (c *conn) goAwayLocked(code http2.ErrCode, reason string) {
	if !c.draining {
		c.lastID = c.maxID
	}
	c.draining = true
	debug := ""
	if code != http2.ErrCodeNo {
		debug = reason
		if len(debug) > 64 {
			debug = debug[:64]
		}
		if h := c.cfg.Hooks.GoAway; h != nil {
			h(goAwayReason(code))
		}
	}
	c.ctl = appendGoAway(c.ctl, c.lastID, code, debug)
	c.ctlFrames++
	c.wcond.Signal()
}

func goAwayReason(code http2.ErrCode) string {
	switch code {
	case http2.ErrCodeProtocol:
		return "protocol"
	case http2.ErrCodeEnhanceYourCalm:
		return "enhance_your_calm"
	case http2.ErrCodeFlowControl:
		return "flow_control"
	case http2.ErrCodeCompression:
		return "compression"
	case http2.ErrCodeFrameSize:
		return "frame_size"
	case http2.ErrCodeStreamClosed:
		return "stream_closed"
	}
	return "other"
}

// startDrain begins a graceful shutdown of the connection.
func (c *conn) startDrain() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.draining {
		return
	}
	c.goAwayLocked(http2.ErrCodeNo, "")
	c.maybeCloseLocked()
}

// maybeCloseLocked closes a draining connection once its last stream is gone.
func (c *conn) maybeCloseLocked() {
	if (c.draining || c.goneAway) && len(c.streams) == 0 && !c.closing {
		c.closing = true
		c.wcond.Signal()
		c.tcond.Broadcast()
	}
}

// closeWithError ends the connection: every stream fails with err, the
// writer stops, the socket closes.
func (c *conn) closeWithError(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if err == nil {
		err = io.EOF
	}
	c.err = err
	for _, s := range c.streams {
		s.connGoneLocked(err)
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	c.srv.unreserve(c.reserved)
	c.reserved = 0
	c.wcond.Broadcast()
	c.tcond.Broadcast()
	c.mu.Unlock()
	c.nc.Close()
}
