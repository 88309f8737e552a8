//go:build !linux

package proxy

import (
	"errors"
	"log/slog"
)

// parker needs epoll; elsewhere idle directions keep their goroutine and
// block in Read.
type parker struct{}

func newParker(*slog.Logger) *parker            { return &parker{} }
func (*parker) start() error                    { return errors.ErrUnsupported }
func (*parker) park(*direction) error           { return errors.ErrUnsupported }
func (*parker) release(*tunnel) (up, down bool) { return false, false }
func (*parker) close()                          {}
func (*parker) len() int                        { return 0 }
