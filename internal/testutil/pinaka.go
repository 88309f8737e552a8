package testutil

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var build struct {
	once sync.Once
	path string
	err  error
}

// BuildPinaka returns the pinaka binary: PINAKA_BIN if set, else built once
// per test process into a temporary directory.
func BuildPinaka(t testing.TB) string {
	t.Helper()
	build.once.Do(func() {
		if build.path = os.Getenv("PINAKA_BIN"); build.path != "" {
			return
		}
		dir, err := os.MkdirTemp("", "pinaka-bin")
		if err != nil {
			build.err = err
			return
		}
		build.path = filepath.Join(dir, "pinaka")
		out, err := exec.Command("go", "build", "-o", build.path, "github.com/pinaka-proxy/pinaka/cmd/pinaka").CombinedOutput()
		if err != nil {
			build.err = fmt.Errorf("building pinaka: %v\n%s", err, out)
		}
	})
	if build.err != nil {
		t.Fatal(build.err)
	}
	return build.path
}

// RemoveBuilt deletes what BuildPinaka built; call it from TestMain.
func RemoveBuilt() {
	if build.path != "" && os.Getenv("PINAKA_BIN") == "" {
		os.RemoveAll(filepath.Dir(build.path))
	}
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// Pinaka is a running `pinaka serve` process.
type Pinaka struct {
	Addr   string // the proxy listener, 127.0.0.1:port
	Cmd    *exec.Cmd
	Log    *SyncBuffer // stderr: the JSON log lines
	exited chan struct{}
	err    error // from Wait, valid once exited is closed
}

// StartPinaka runs `pinaka serve` in an empty directory with exactly env
// (plus PATH, PROXY_BIND and a free PROXY_PORT): nothing of the test
// process's environment leaks in. It returns once the proxy logs that it
// listens; the cleanup sends SIGTERM and, after 10 s, kills it.
func StartPinaka(t testing.TB, env ...string) *Pinaka {
	t.Helper()
	bin := BuildPinaka(t)
	for attempt := 0; attempt < 5; attempt++ {
		port := FreePort(t)
		p := &Pinaka{Addr: "127.0.0.1:" + port, Log: &SyncBuffer{}, exited: make(chan struct{})}
		p.Cmd = exec.Command(bin, "serve")
		p.Cmd.Dir = t.TempDir() // no .env there
		p.Cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "PROXY_BIND=127.0.0.1", "PROXY_PORT=" + port}, env...)
		p.Cmd.Stderr = p.Log
		if err := p.Cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { p.err = p.Cmd.Wait(); close(p.exited) }()
		if p.waitListening() {
			t.Cleanup(func() {
				_ = p.Cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-p.exited:
				case <-time.After(10 * time.Second):
					_ = p.Cmd.Process.Kill()
					<-p.exited
				}
				if t.Failed() {
					t.Logf("pinaka log:\n%s", p.Log.String())
				}
			})
			return p
		}
		if !strings.Contains(p.Log.String(), "address already in use") {
			t.Fatalf("pinaka did not start:\n%s", p.Log.String())
		}
	}
	t.Fatal("pinaka: no free port after 5 attempts")
	return nil
}

func (p *Pinaka) waitListening() bool {
	deadline := time.After(15 * time.Second)
	for !strings.Contains(p.Log.String(), `"msg":"pinaka listening"`) {
		select {
		case <-p.exited:
			return false
		case <-deadline:
			_ = p.Cmd.Process.Kill()
			<-p.exited
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
	return true
}

// Signal sends sig to the process.
func (p *Pinaka) Signal(sig os.Signal) { _ = p.Cmd.Process.Signal(sig) }

// Exited is closed when the process has exited.
func (p *Pinaka) Exited() <-chan struct{} { return p.exited }

// Wait waits up to within for the process to exit and returns its exit
// code and how long the wait took.
func (p *Pinaka) Wait(t testing.TB, within time.Duration) (code int, took time.Duration) {
	t.Helper()
	start := time.Now()
	select {
	case <-p.exited:
	case <-time.After(within):
		t.Fatalf("pinaka did not exit within %s", within)
	}
	var ee *exec.ExitError
	switch {
	case errors.As(p.err, &ee):
		code = ee.ExitCode()
	case p.err != nil:
		t.Fatalf("waiting for pinaka: %v", p.err)
	}
	return code, time.Since(start)
}
