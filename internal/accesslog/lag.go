package accesslog

import (
	"strings"
	"time"

	"github.com/google/uuid"
)

// publishOldest sets pinaka_ship_lag_seconds' view of the spool: when its
// oldest batch was cut. Batch ids are UUIDv7, whose first 48 bits are the
// creation time in milliseconds, and the names sort oldest first; a file
// not named so (put there by something else) is skipped. Runs under s.mu
// whenever names changes.
func (s *spool) publishOldest() {
	var ns int64
	for _, name := range s.names {
		id, err := uuid.Parse(strings.TrimSuffix(name, spoolExt))
		if err != nil || id.Version() != 7 {
			continue
		}
		sec, nsec := id.Time().UnixTime()
		ns = time.Unix(sec, nsec).UnixNano()
		break
	}
	s.m.ShipSpoolOldest.Store(ns)
}
