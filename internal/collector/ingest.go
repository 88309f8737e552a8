package collector

import (
	"context"
	"fmt"
	"time"
)

// store writes a batch (see store in handler.go) after making sure a
// partition holds each day its records fall on.
func (p *partitions) store(ctx context.Context, b *batch, good []row, bad []rejected) (bool, error) {
	var days []time.Time
	seen := map[time.Time]bool{}
	for _, r := range good {
		d := dayOf(r[0].(time.Time))
		if !seen[d] {
			seen[d] = true
			days = append(days, d)
		}
	}
	if err := p.ensure(ctx, days); err != nil {
		return false, fmt.Errorf("creating partitions for batch %s: %w", b.id, err)
	}
	stored, err := store(ctx, p.pool, b, good, bad)
	if err != nil {
		p.forget()
	}
	return stored, err
}
