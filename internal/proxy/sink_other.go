//go:build !linux

package proxy

// sinkSupported: sinks need writev(2) (sink_linux.go).
const sinkSupported = false

func (d *direction) sink([][]byte) (int, error) { panic("proxy: no sinks on this platform") }
