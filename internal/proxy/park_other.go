//go:build !linux

package proxy

import (
	"errors"
	"log/slog"
	"sync/atomic"
)

// parker needs epoll; elsewhere idle directions keep their goroutine and
// block in Read.
type parker struct {
	streams atomic.Int64 // directions parked on an HTTP/2 stream
	workers relayWorkers // run the directions that wake
}

func newParker(*slog.Logger) *parker            { return &parker{workers: newRelayWorkers()} }
func (*parker) start() error                    { return errors.ErrUnsupported }
func (*parker) park(*direction) error           { return errors.ErrUnsupported }
func (*parker) release(*tunnel) (up, down bool) { return false, false }
func (*parker) close()                          {}
func (p *parker) len() int                      { return int(p.streams.Load()) }
