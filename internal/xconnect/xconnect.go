// Package xconnect turns on RFC 8441 extended CONNECT in net/http's HTTP/2
// server. Import it for its side effect, as the first import of a main
// package or test:
//
//	import _ "github.com/pinaka-proxy/pinaka/internal/xconnect"
//
// Go 1.26 keeps extended CONNECT behind GODEBUG=http2xconnect=1, read once
// by net/http's init with os.Getenv; it is not a registered //go:debug
// setting, so a //go:debug line is rejected. Go initialises packages
// dependencies first and otherwise in import-path order, and this package
// depends only on os and strings, so its init runs before net/http's and
// the binary carries the setting without the operator exporting anything.
package xconnect

import (
	"os"
	"strings"
)

// Setting is the GODEBUG entry this package adds.
const Setting = "http2xconnect=1"

func init() {
	cur := os.Getenv("GODEBUG")
	if strings.Contains(cur, "http2xconnect=") {
		return // the operator chose explicitly
	}
	if cur != "" {
		cur += ","
	}
	os.Setenv("GODEBUG", cur+Setting)
}
