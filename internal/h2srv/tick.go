package h2srv

import (
	"errors"
	"time"

	"golang.org/x/net/http2"
)

// One timer per connection keeps its clocks: idle connection, keepalive,
// streams stalled on flow control, and the shrinking of a receive window
// grown for an upload that is over. The data path reads no clock: the
// reader counts frames and the tick compares counts.

var errKeepalive = errors.New("http2: client stopped answering")

// windowShrinkAfter: a connection window grown for an upload goes back to
// Config.ConnWindow after this long without DATA.
const windowShrinkAfter = 10 * time.Second

func (c *conn) tickPeriod() time.Duration {
	p := min(c.cfg.IdleTimeout, c.cfg.KeepaliveTimeout, c.cfg.WriteStallTimeout) / 4
	return min(max(p, 50*time.Millisecond), 5*time.Second)
}

func (c *conn) armTick() {
	now := time.Now()
	c.lastRead, c.lastData = now, now
	c.timer = time.AfterFunc(c.tickPeriod(), c.tick)
}

func (c *conn) tick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	now := time.Now()
	if c.framesRead != c.tickFrames {
		c.tickFrames = c.framesRead
		c.lastRead = now
	}
	switch {
	case len(c.streams) == 0:
		c.pingOut = false
		if !c.idleSince.IsZero() && now.Sub(c.idleSince) >= c.cfg.IdleTimeout && !c.draining {
			c.goAwayLocked(http2.ErrCodeNo, "")
			c.maybeCloseLocked()
		}
	case c.pingOut && now.Sub(c.pingSentAt) >= c.cfg.KeepaliveTimeout && now.Sub(c.lastRead) >= c.cfg.KeepaliveTimeout:
		go c.closeWithError(errKeepalive)
		return
	case !c.pingOut && now.Sub(c.lastRead) >= c.cfg.KeepaliveInterval:
		c.pingOut, c.pingSentAt = true, now
		c.ctl = appendPing(c.ctl, false, [8]byte{'p', 'i', 'n', 'a', 'k', 'a'})
		c.ctlFrames++
		c.wcond.Signal()
	}
	for _, s := range c.streams {
		if s.blocked && s.hasData() && now.Sub(s.blockedSince) >= c.cfg.WriteStallTimeout {
			s.resetLocked(ErrWriteStalled, true)
		}
	}
	if c.dataSinceTick {
		c.dataSinceTick = false
		c.lastData = now
	} else if now.Sub(c.lastData) >= windowShrinkAfter && c.target > int64(c.cfg.ConnWindow) {
		c.target = int64(c.cfg.ConnWindow)
		c.grantLocked()
	}
	c.timer.Reset(c.tickPeriod())
}
