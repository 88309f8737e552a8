package testutil

import (
	"bufio"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Redis is a redis-server owned by one test: its own free port, nothing
// saved to disk, killed at cleanup. Tests that stop or restart Redis use
// one of these, never the machine's shared instance.
type Redis struct {
	Addr string // 127.0.0.1:port
	t    testing.TB
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

// StartRedis starts a redis-server on a free loopback port. It fails the
// test if the binary is missing (scripts/deps.sh installs it).
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server not found (scripts/deps.sh installs it)")
	}
	r := &Redis{t: t, dir: t.TempDir()}
	for attempt := 0; attempt < 5; attempt++ {
		r.Addr = "127.0.0.1:" + FreePort(t)
		if r.start() {
			t.Cleanup(r.Kill)
			return r
		}
	}
	t.Fatal("redis-server did not start on a free port after 5 attempts")
	return nil
}

// URL is the redis:// URL of the server, database 0.
func (r *Redis) URL() string { return "redis://" + r.Addr + "/0" }

func (r *Redis) start() bool {
	_, port, _ := net.SplitHostPort(r.Addr)
	r.cmd = exec.Command("redis-server", "--port", port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", r.dir)
	out := &SyncBuffer{}
	r.cmd.Stdout, r.cmd.Stderr = out, out
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(r.cmd, r.done)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-r.done:
			r.t.Logf("redis-server on %s exited:\n%s", r.Addr, out.String())
			return false
		default:
		}
		if r.Ping() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.Kill()
	return false
}

// Ping reports whether the server answers PING.
func (r *Redis) Ping() bool {
	c, err := net.DialTimeout("tcp", r.Addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}

// Kill stops the server at once (SIGKILL), as a crash would; its data is
// gone. Calling it again does nothing.
func (r *Redis) Kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGKILL)
	_ = r.cmd.Process.Signal(syscall.SIGCONT) // a paused process dies only once continued
	<-r.done
	r.cmd = nil
}

// Restart starts a fresh, empty server on the same port.
func (r *Redis) Restart() {
	r.t.Helper()
	r.Kill()
	if !r.start() {
		r.t.Fatalf("redis-server did not restart on %s", r.Addr)
	}
}

// Pause stops the server without closing its connections (SIGSTOP): a
// Redis that accepts and never answers, as a hung or overloaded one.
func (r *Redis) Pause() { _ = r.cmd.Process.Signal(syscall.SIGSTOP) }

// Resume continues a paused server (SIGCONT).
func (r *Redis) Resume() { _ = r.cmd.Process.Signal(syscall.SIGCONT) }
