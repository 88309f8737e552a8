// Package testutil holds small helpers shared by tests across packages.
// Only test code imports it.
package testutil

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/net/http2"
)

// SyncBuffer is a bytes.Buffer safe for concurrent Write and String: the
// sink for a logger or a child process's output while a test reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// ServerSettings sends the HTTP/2 client preface and an empty SETTINGS
// frame on c (a TLS connection that negotiated h2) and returns the
// server's first SETTINGS frame.
func ServerSettings(c net.Conn) (*http2.SettingsFrame, error) {
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		return nil, fmt.Errorf("writing preface: %w", err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		return nil, fmt.Errorf("writing SETTINGS: %w", err)
	}
	f, err := fr.ReadFrame()
	if err != nil {
		return nil, fmt.Errorf("reading the first frame: %w", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return nil, fmt.Errorf("first frame is %v, want the server's SETTINGS", f)
	}
	return sf, nil
}
