package h2srv

import (
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The writer (after grpc-go's loopy writer): one goroutine per connection
// takes everything queued — control frames, window updates, the HEADERS
// and DATA of every stream with window — into one buffer and writes it
// with one TLS write, so a flush carries the frames of many streams and
// nothing spawns a goroutine per frame.

// writeBufSize is what one flush gathers at most: four DATA frames of one
// TLS record each per stream turn, and a turn for several streams.
const writeBufSize = 64 << 10

// streamQuantum is how many DATA frames one stream sends per turn before
// the next stream with data gets its turn.
const streamQuantum = 4

var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, writeBufSize+4<<10); return &b }}

func (c *conn) writeLoop() {
	defer close(c.writerDone)
	var bufp *[]byte
	for {
		c.mu.Lock()
		for c.err == nil && !c.hasWorkLocked() && !c.closing {
			if bufp != nil {
				// An idle connection holds no write buffer.
				writeBufs.Put(bufp)
				bufp = nil
			}
			c.wcond.Wait()
		}
		if c.err != nil {
			c.mu.Unlock()
			break
		}
		if bufp == nil {
			bufp = writeBufs.Get().(*[]byte)
		}
		b := c.fillLocked((*bufp)[:0])
		done := c.closing && !c.hasWorkLocked()
		c.mu.Unlock()
		if len(b) > 0 {
			if err := c.write(b); err != nil {
				c.closeWithError(err)
				break
			}
		}
		*bufp = b[:0]
		if done {
			// Everything, GOAWAY last, is out. The client closes on GOAWAY
			// once its streams are done; if it does not, we do.
			time.AfterFunc(time.Second, func() { c.closeWithError(errDrained) })
			break
		}
	}
	if bufp != nil {
		writeBufs.Put(bufp)
	}
}

func (c *conn) write(b []byte) error {
	if c.batch.start != nil {
		c.batch.start()
	}
	_, err := c.nc.Write(b)
	if c.batch.flush != nil {
		if ferr := c.batch.flush(); err == nil {
			err = ferr
		}
	}
	return err
}

func (c *conn) hasWorkLocked() bool {
	return len(c.ctl) > 0 || c.connWU > 0 || len(c.wuStreams) > 0 || len(c.active) > 0
}

// activateLocked puts s on the writer's list if it has something to send.
func (c *conn) activateLocked(s *stream) {
	if s.queued {
		return
	}
	if !c.sendableLocked(s) {
		if s.hasData() && s.headerWritten && !s.localClosed && !s.blocked {
			// Data but no window: the stall limit counts from now (tick).
			s.blocked, s.blockedSince = true, time.Now()
		}
		return
	}
	s.queued = true
	c.active = append(c.active, s)
	c.wcond.Signal()
}

func (s *stream) hasData() bool { return len(s.small) > 0 || len(s.pending) > 0 }

// sendableLocked: the writer can send something of s now.
func (c *conn) sendableLocked(s *stream) bool {
	switch {
	case s.localClosed:
		return false
	case s.rstQueued, len(s.hdrs) > 0:
		return true
	case !s.headerWritten:
		return false
	case s.hasData():
		return s.sendWindow > 0 && c.sendWindow > 0
	}
	return s.endWanted
}

// fillLocked appends what can be sent to b.
func (c *conn) fillLocked(b []byte) []byte {
	if len(c.ctl) > 0 {
		b = append(b, c.ctl...)
		if cap(c.ctl) > 16<<10 {
			c.ctl = nil // a burst's buffer is not kept
		} else {
			c.ctl = c.ctl[:0]
		}
		c.ctlFrames = 0
		c.tcond.Broadcast()
	}
	if c.connWU > 0 {
		b = appendWindowUpdate(b, 0, c.connWU)
		c.connWU = 0
	}
	for _, s := range c.wuStreams {
		if s.wu > 0 && !s.remoteClosed {
			b = appendWindowUpdate(b, s.id, s.wu)
		}
		s.wu = 0
	}
	clear(c.wuStreams)
	c.wuStreams = c.wuStreams[:0]
	for len(c.active) > 0 && len(b) < writeBufSize {
		s := c.active[0]
		c.active[0] = nil
		c.active = c.active[1:]
		s.queued = false
		b = c.appendStreamLocked(b, s)
		c.activateLocked(s) // round-robin: back of the list if it has more
	}
	if len(c.active) == 0 {
		c.active = nil
	}
	return b
}

// appendStreamLocked writes one turn of s: pending HEADERS, up to
// streamQuantum DATA frames, END_STREAM or RST_STREAM.
func (c *conn) appendStreamLocked(b []byte, s *stream) []byte {
	if s.localClosed {
		return b
	}
	if s.rstQueued {
		s.rstQueued = false
		s.localClosed = true
		b = appendRSTStream(b, s.id, s.rstCode)
		c.rememberReset(s.id)
		c.maybeRemoveLocked(s)
		return b
	}
	for len(s.hdrs) > 0 {
		h := s.hdrs[0]
		s.hdrs[0] = headerOut{}
		s.hdrs = s.hdrs[1:]
		final := h.status >= 200
		end := final && s.endWanted && !s.hasData() && s.trailers == nil
		b = c.appendHeadersLocked(b, s.id, h, end)
		if final {
			s.headerWritten = true
		}
		if end {
			return c.endedLocked(b, s)
		}
	}
	if len(s.hdrs) == 0 {
		s.hdrs = nil
	}
	if !s.headerWritten {
		return b
	}
	maxData := int64(min(dataChunk, c.peerMaxFrame))
	for frames := 0; s.hasData() && frames < streamQuantum; frames++ {
		win := min(s.sendWindow, c.sendWindow)
		if win <= 0 {
			if !s.blocked {
				s.blocked = true
				s.blockedSince = time.Now()
			}
			return b
		}
		var chunk []byte
		if len(s.small) > 0 {
			chunk = s.small[:min(int64(len(s.small)), maxData, win)]
		} else {
			chunk = s.pending[:min(int64(len(s.pending)), maxData, win)]
		}
		last := len(chunk) == len(s.small)+len(s.pending)
		end := last && s.endWanted && s.trailers == nil
		b = appendData(b, s.id, end, chunk)
		n := len(chunk)
		s.sendWindow -= int64(n)
		c.sendWindow -= int64(n)
		c.budget.earn(n)
		if len(s.small) > 0 {
			s.small = s.small[n:]
			if len(s.small) == 0 {
				s.freeSmallLocked()
			}
		} else {
			s.pending = s.pending[n:]
			if len(s.pending) == 0 {
				s.pending = nil
				s.wcond.Broadcast()
			}
		}
		s.blocked = false
		if end {
			return c.endedLocked(b, s)
		}
	}
	if !s.hasData() && s.endWanted {
		if s.trailers != nil {
			b = c.appendHeadersLocked(b, s.id, headerOut{header: s.trailers}, true)
			s.trailers = nil
		} else {
			b = appendData(b, s.id, true, nil)
		}
		return c.endedLocked(b, s)
	}
	return b
}

// endedLocked follows our END_STREAM on s: a client still sending a body
// nobody will read is told to stop (RFC 9113 §8.1).
func (c *conn) endedLocked(b []byte, s *stream) []byte {
	s.localClosed = true
	if !s.noCredit {
		c.budget.earn(2 << 10) // a completed response is worth two unproductive frames
	}
	if s.handlerDone && !s.remoteClosed {
		b = appendRSTStream(b, s.id, http2.ErrCodeNo)
		c.rememberReset(s.id)
		s.remoteClosed = true
		s.readErr = errHandlerDone
		s.discardLocked()
	}
	c.maybeRemoveLocked(s)
	return b
}

// rememberReset keeps the ids of the last streams we reset: DATA the
// client sent before it saw the reset is dropped quietly (§5.4.2).
func (c *conn) rememberReset(id uint32) {
	c.recentResets[c.recentResetNext%len(c.recentResets)] = id
	c.recentResetNext++
}

func (c *conn) recentlyReset(id uint32) bool {
	for _, r := range c.recentResets {
		if r == id {
			return true
		}
	}
	return false
}

// appendHeadersLocked HPACK-encodes a header block (a response with a
// status, or trailers) and appends it as frames. Only the writer encodes:
// the encoder's table must follow the order the client decodes in.
func (c *conn) appendHeadersLocked(b []byte, id uint32, h headerOut, end bool) []byte {
	c.hbuf.Reset()
	if h.status > 0 {
		c.writeField(":status", statusText(h.status))
	}
	for k, vv := range h.header {
		name, ok := lowerName(k)
		if !ok {
			continue
		}
		switch name {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te":
			continue // connection-specific: not in HTTP/2 (§8.2.2)
		}
		for _, v := range vv {
			if httpguts.ValidHeaderFieldValue(v) {
				c.writeField(name, v)
			}
		}
	}
	return appendHeaderBlock(b, id, end, c.hbuf.Bytes(), c.peerMaxFrame)
}

func (c *conn) writeField(name, value string) {
	_ = c.henc.WriteField(hpack.HeaderField{Name: name, Value: value})
}

func statusText(code int) string {
	switch code {
	case 200:
		return "200"
	case 204:
		return "204"
	case 304:
		return "304"
	case 407:
		return "407"
	}
	return strconv.Itoa(code)
}

// lowerName is a header key as HTTP/2 sends it (lowercase), and whether it
// is a valid field name at all.
func lowerName(k string) (string, bool) {
	if !httpguts.ValidHeaderFieldName(k) {
		return "", false
	}
	if v, ok := commonLower[k]; ok {
		return v, true
	}
	return strings.ToLower(k), true
}

var commonLower = func() map[string]string {
	m := make(map[string]string)
	for _, k := range []string{"Accept-Ranges", "Age", "Cache-Control", "Content-Encoding", "Content-Length",
		"Content-Type", "Date", "Etag", "Expires", "Last-Modified", "Location", "Proxy-Authenticate",
		"Proxy-Status", "Retry-After", "Server", "Set-Cookie", "Vary", "Via", "Alt-Svc", "Sec-Websocket-Protocol",
		"Sec-Websocket-Extensions", "Trailer", "X-Content-Type-Options", "Strict-Transport-Security",
		// The proxy's request id, on every answer it gives (a lowercase
		// copy per response otherwise).
		"Pinaka-Request-Id"} {
		m[k] = strings.ToLower(k)
	}
	return m
}()
