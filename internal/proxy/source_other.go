//go:build !linux

package proxy

// sourceSupported: sources need readv(2) and the parker (source_linux.go).
const sourceSupported = false

func (d *direction) ReadSource([][]byte) (int, error) { panic("proxy: no sources on this platform") }
func (d *direction) WaitReadable(func()) bool         { return false }
func (d *direction) Returned()                        { d.sourcing = false; d.run() }
