package proxy_test

import (
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// buildMasqueClient builds testdata/masqueclient, masque-go v0.4.0's
// CONNECT-UDP client as a program. It is a module of its own, with its
// go.sum committed: masque-go v0.4.0 builds only against quic-go v0.60.0,
// and Pinaka uses a later quic-go. The build needs that module's
// dependencies in the module cache or from the module proxy.
func buildMasqueClient(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds masque-go's client, a module of its own: not with -short")
	}
	out := filepath.Join(t.TempDir(), "masqueclient")
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Dir = filepath.Join("testdata", "masqueclient")
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly", "GOWORK=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building masque-go's client (testdata/masqueclient): %v\n%s", err, b)
	}
	return out
}

// TestConnectUDPMasqueGo: masque-go's client (the MASQUE client quic-go's
// authors ship) proxies UDP through Pinaka to an echo server and to a DNS
// server on loopback, and is refused like any client.
func TestConnectUDPMasqueGo(t *testing.T) {
	client := buildMasqueClient(t)
	ns := testutil.StartDNS(t, map[string]string{"dns.test.": "127.0.0.1", "www.example.test.": "192.0.2.80"})
	_, nsPort, _ := net.SplitHostPort(ns)
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true", "DNS_SERVERS": ns})
	ca := filepath.Join(t.TempDir(), "proxy.pem")
	testutil.WriteFile(t, ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: proxyCert.Certificate[0]}))
	echo := strconv.Itoa(udpEchoServer(t, "udp4", "127.0.0.1:0"))

	run := func(token, target string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(client, append([]string{"-proxy", e.h3Addr(), "-ca", ca, "-token", token, "-target", target}, args...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		code := 0
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != 0 && code != 3 {
			t.Fatalf("masqueclient %s: exit %d\n%s%s", target, code, out, stderr.String())
		}
		return string(out), code
	}

	if out, code := run(e.token, "127.0.0.1:"+echo, "first", "second"); code != 0 || out != "got echo:first\ngot echo:second\n" {
		t.Fatalf("echo through masque-go: exit %d, %q", code, out)
	}
	rec := e.waitRecord(func(r accesslog.Record) bool { return r.TargetURL == "udp://127.0.0.1:"+echo })
	if rec.Protocol != "HTTP/3" || rec.StatusCode != 200 || ptrVal(rec.DatagramsUp) != int64(2) || ptrVal(rec.DatagramsDown) != int64(2) ||
		rec.RequestSize != int64(len("firstsecond")) || rec.ResponseSize != int64(len("echo:firstecho:second")) || rec.CloseReason != "client_closed" {
		t.Fatalf("record of masque-go's flow: %+v", rec)
	}

	if out, code := run(e.token, "dns.test:"+nsPort, "-dns", "www.example.test"); code != 0 || out != "answer 192.0.2.80\n" {
		t.Fatalf("DNS through masque-go: exit %d, %q", code, out)
	}

	for _, c := range []struct {
		token, target, want string
	}{
		{"", "127.0.0.1:" + echo, "status 407\n"},
		{e.token, "10.0.0.1:53", "status 403\n"},
		{e.token, "127.0.0.1:123", "status 403\n"},
	} {
		if out, code := run(c.token, c.target); code != 3 || out != c.want {
			t.Errorf("masque-go to %s (token %v): exit %d, %q; want %q", c.target, c.token != "", code, out, c.want)
		}
	}
}
