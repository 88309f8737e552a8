package h2srv

import (
	"time"

	"golang.org/x/net/http2"
)

// frameBudget charges a connection for frames that make the server work
// without moving a request forward: SETTINGS, PING, WINDOW_UPDATE,
// PRIORITY, empty DATA and header fragments, unknown frames, streams reset
// before their answer, malformed or refused streams (the CVE-2019-9511…9518
// family, CVE-2023-44487, CVE-2024-27316). Credits refill with time and are
// earned by real traffic, so a browser never runs out and a flood costs the
// attacker a new TCP and TLS handshake after budgetCap frames.
type frameBudget struct {
	credits float64
	last    time.Time
}

const (
	// productiveWindowUpdate is the smallest WINDOW_UPDATE increment that
	// costs no credit (see process).
	productiveWindowUpdate = 1 << 10
	budgetCap              = 1000
	budgetRefill           = 100 // credits per second
	budgetPerByte          = 1.0 / 1024
)

func (b *frameBudget) init() { b.credits = budgetCap }

// spend takes cost credits and reports whether any were left.
func (b *frameBudget) spend(now time.Time, cost int) bool {
	if !b.last.IsZero() {
		b.credits = min(budgetCap, b.credits+now.Sub(b.last).Seconds()*budgetRefill)
	}
	b.last = now
	b.credits -= float64(cost)
	return b.credits >= 0
}

// earn credits n bytes of DATA moved.
func (b *frameBudget) earn(n int) {
	b.credits = min(budgetCap, b.credits+float64(n)*budgetPerByte)
}

// charge spends a credit for a frame of kind (a fixed set of names, for
// the metric) and fails the connection when the budget is gone.
func (c *conn) charge(kind string) error { return c.chargeN(kind, 1) }

// chargeN charges one frame that cost the work of several.
func (c *conn) chargeN(kind string, cost int) error {
	if h := c.cfg.Hooks.Unproductive; h != nil {
		h(kind)
	}
	if !c.budget.spend(time.Now(), cost) {
		return connErr(http2.ErrCodeEnhanceYourCalm, "too many frames that do no work")
	}
	return nil
}
