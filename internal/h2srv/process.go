package h2srv

import (
	"time"

	"golang.org/x/net/http2"
)

// process handles one frame read by the reader. It runs with c.mu held and
// never blocks. A returned error ends the connection.
func (c *conn) process(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.processData(f)
	case *http2.HeadersFrame:
		return c.processHeaders(f)
	case *http2.ContinuationFrame:
		if len(f.HeaderBlockFragment()) == 0 && !f.HeadersEnded() {
			if err := c.charge("continuation"); err != nil {
				return err
			}
		}
		return c.continueHeaderBlock(f.HeaderBlockFragment(), f.HeadersEnded())
	case *http2.SettingsFrame:
		// Each entry costs a little too: a big frame costs more.
		if err := c.chargeN("settings", 1+f.NumSettings()/64); err != nil {
			return err
		}
		if f.IsAck() {
			return nil
		}
		return c.processSettings(f)
	case *http2.PingFrame:
		if err := c.charge("ping"); err != nil {
			return err
		}
		if f.IsAck() {
			c.pingOut = false
			return nil
		}
		c.ctl = appendPing(c.ctl, true, f.Data)
		c.ctlFrames++
		c.wcond.Signal()
		return nil
	case *http2.WindowUpdateFrame:
		// Opening a window by a KiB or more is a client reading what we
		// send: x/net's client sends a stream and a connection update for
		// every 4 KiB it reads, in bursts of hundreds when it drains its
		// buffer, and a download must not run out of credits for that.
		// Smaller increments are the dribble (CVE-2019-9517 family); a
		// stream of large ones ends in a window overflow.
		if f.Increment < productiveWindowUpdate {
			if err := c.charge("window_update"); err != nil {
				return err
			}
		}
		return c.processWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return c.processRSTStream(f)
	case *http2.PriorityFrame:
		if err := c.charge("priority"); err != nil {
			return err
		}
		// The priority tree is deprecated (RFC 9113 §5.3.2) and ignored;
		// only a stream depending on itself is an error (§5.3.1).
		if f.StreamDep == f.StreamID {
			c.streamErrorLocked(f.StreamID, http2.ErrCodeProtocol, "malformed")
		}
		return nil
	case *http2.GoAwayFrame:
		// The client opens no more streams; those open finish.
		c.goneAway = true
		c.maybeCloseLocked()
		return nil
	case *http2.PushPromiseFrame:
		return connErr(http2.ErrCodeProtocol, "PUSH_PROMISE from a client")
	}
	// Unknown frame types are ignored (RFC 9113 §5.5), PRIORITY_UPDATE too.
	return c.charge("other")
}

func (c *conn) processSettings(f *http2.SettingsFrame) error {
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return connErr(http2.ErrCode(err.(http2.ConnectionError)), "invalid setting "+s.ID.String())
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			// §6.9.2: the change applies to every open stream, and may
			// take a window below zero.
			delta := int64(s.Val) - c.peerWindow
			c.peerWindow = int64(s.Val)
			for _, st := range c.streams {
				st.sendWindow += delta
				if st.sendWindow > maxWindow {
					return connErr(http2.ErrCodeFlowControl, "window overflow")
				}
				if delta > 0 {
					c.activateLocked(st)
				}
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = int(s.Val)
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSizeLimit(s.Val)
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.ctl = appendSettingsAck(c.ctl)
	c.ctlFrames++
	c.wcond.Signal()
	return nil
}

func (c *conn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	if f.StreamID == 0 {
		c.sendWindow += int64(f.Increment)
		if c.sendWindow > maxWindow {
			return connErr(http2.ErrCodeFlowControl, "connection window overflow")
		}
		for _, s := range c.streams {
			if s.blocked {
				c.activateLocked(s)
			}
		}
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		if f.StreamID > c.maxID {
			return connErr(http2.ErrCodeProtocol, "WINDOW_UPDATE on an idle stream")
		}
		return nil // a closed stream: allowed for a while (§6.9)
	}
	s.sendWindow += int64(f.Increment)
	if s.sendWindow > maxWindow {
		c.streamErrorLocked(s.id, http2.ErrCodeFlowControl, "flow_control")
		return nil
	}
	c.activateLocked(s)
	return nil
}

func (c *conn) processRSTStream(f *http2.RSTStreamFrame) error {
	if f.StreamID > c.maxID {
		return connErr(http2.ErrCodeProtocol, "RST_STREAM on an idle stream")
	}
	s := c.streams[f.StreamID]
	if s == nil {
		return nil
	}
	if !s.finalSent {
		// Rapid reset (CVE-2023-44487): a stream reset before its answer
		// did work for nothing.
		if err := c.charge("rst_stream"); err != nil {
			return err
		}
	}
	s.peerReset = true
	s.resetLocked(ErrStreamReset, false)
	return nil
}

func (c *conn) processData(f *http2.DataFrame) error {
	n := int64(f.Length) // padding counts against windows too (§6.1)
	if n > c.recvWindow {
		return connErr(http2.ErrCodeFlowControl, "DATA beyond the connection window")
	}
	c.recvWindow -= n
	c.dataSinceTick = true // the window stays grown while DATA comes (tick)
	data := f.Data()
	if len(data) == 0 && !f.StreamEnded() {
		if err := c.charge("data"); err != nil {
			return err
		}
	} else {
		c.budget.earn(len(data))
	}
	s := c.streams[f.StreamID]
	switch {
	case s == nil && f.StreamID > c.maxID:
		return connErr(http2.ErrCodeProtocol, "DATA on an idle stream")
	case s == nil && c.recentlyReset(f.StreamID), s != nil && s.reset && !s.peerReset:
		c.grantLocked() // in flight when we reset it: dropped quietly
		return nil
	case s == nil || s.remoteClosed:
		c.streamErrorLocked(f.StreamID, http2.ErrCodeStreamClosed, "stream_closed")
		c.grantLocked()
		return nil
	case n > s.recvWindow:
		c.streamErrorLocked(s.id, http2.ErrCodeFlowControl, "flow_control")
		c.grantLocked()
		return nil
	}
	s.recvWindow -= n
	s.recvLen += int64(len(data))
	if s.declaredLen >= 0 && s.recvLen > s.declaredLen {
		c.streamErrorLocked(s.id, http2.ErrCodeProtocol, "malformed")
		c.grantLocked()
		return nil
	}
	if pad := n - int64(len(data)); pad > 0 {
		s.consumedLocked(int(pad))
	}
	if len(data) > 0 {
		if s.discard {
			s.consumedLocked(len(data))
		} else {
			s.recv.write(data)
			c.addBuffered(int64(len(data)))
			if !c.sinkDataLocked(s, len(data)) {
				s.rcond.Signal()
				s.fireReadReady()
			}
		}
	}
	if f.StreamEnded() {
		c.endRemoteLocked(s)
	}
	c.grantLocked()
	return nil
}

// endRemoteLocked handles the client's END_STREAM on s.
func (c *conn) endRemoteLocked(s *stream) {
	if s.declaredLen >= 0 && s.recvLen != s.declaredLen {
		// §8.1.1: content-length must match the DATA received.
		c.streamErrorLocked(s.id, http2.ErrCodeProtocol, "malformed")
		return
	}
	s.remoteClosed = true
	s.rcond.Broadcast()
	s.fireReadReady()
	c.maybeRemoveLocked(s)
}

func (c *conn) addBuffered(n int64) {
	c.buffered += n
	if h := c.cfg.Hooks.BodyBuffered; h != nil {
		h(n)
	}
}

// grantLocked opens the connection's receive window again once a quarter
// of it has been consumed, and grows it while the window, not the
// consumers, is what holds an upload back.
func (c *conn) grantLocked() {
	if c.err != nil {
		// The connection is gone and gave its reservation back; a
		// handler still reading what was buffered must not take more.
		return
	}
	if c.recvWindow < c.target/8 && c.buffered < c.target/4 && c.target < int64(c.cfg.MaxConnWindow) {
		want := min(c.target, int64(c.cfg.MaxConnWindow)-c.target)
		if got := c.srv.reserve(want, min(want, 64<<10)); got > 0 {
			c.reserved += got
			c.target += got
		}
	}
	if avail := c.target - c.recvWindow - c.buffered; avail > 0 && avail >= c.target/4 {
		c.recvWindow += avail
		c.connWU += uint32(avail)
		c.wcond.Signal()
	}
	// Give back the part of the reservation the client can no longer use.
	need := max(c.target, c.recvWindow+c.buffered) - initialWindow
	if c.reserved > need {
		c.srv.unreserve(c.reserved - need)
		c.reserved = need
	}
}

// streamErrorLocked resets stream id with code (RFC 9113 §5.4.2).
func (c *conn) streamErrorLocked(id uint32, code http2.ErrCode, reason string) {
	if h := c.cfg.Hooks.StreamError; h != nil {
		h(reason)
	}
	if s := c.streams[id]; s != nil && !s.reset {
		s.resetLocked(errStreamClosed, true)
		s.rstCode = code
		return
	}
	c.ctl = appendRSTStream(c.ctl, id, code)
	c.ctlFrames++
	c.wcond.Signal()
	// Each reset we send is work the client caused (CVE-2019-9514).
	c.budget.spend(time.Now(), 1)
}
