// Package testutil holds small helpers shared by tests across packages.
// Only test code imports it.
package testutil

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"

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

// ServeTCP listens on a loopback port and runs serve for each accepted
// connection until the test ends; it returns the address.
func ServeTCP(t testing.TB, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serve(c)
		}
	}()
	return ln.Addr().String()
}

// TCPPair connects two loopback sockets: the accepted end and the dialling
// end. Both close when the test ends.
func TCPPair(t testing.TB) (accepted, dialed net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialed, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	accepted, err = ln.Accept()
	if err != nil {
		dialed.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { accepted.Close(); dialed.Close() })
	return accepted, dialed
}
