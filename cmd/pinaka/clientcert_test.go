package main

import (
	"bufio"
	"crypto/tls"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

// writeAtomically replaces path as a deploy tool would (write, rename):
// a SIGHUP never reads a half-written file.
func writeAtomically(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path+".tmp", data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

// certConnect sends one CONNECT without a token over a TLS connection
// presenting cert. It returns the status, or 0 when the handshake or the
// exchange failed (with TLS 1.3 a refused client certificate shows on the
// first read).
func certConnect(t *testing.T, addr, target string, cert tls.Certificate) int {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"},
		Certificates: []tls.Certificate{cert}})
	if err != nil {
		return 0
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req, _ := http.NewRequest(http.MethodConnect, "http://"+target, nil)
	req.Host = target
	if err := req.Write(c); err != nil {
		return 0
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		return 0
	}
	return resp.StatusCode
}

// SIGHUP re-reads CLIENT_CRL_PATH and CLIENT_CA_PATH in the real binary:
// a serial revoked on disk is refused without a restart; a malformed CRL
// is refused and the one in force kept.
func TestSIGHUPReloadsClientCRL(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	ca := testpki.NewCA(t, "clients")
	caPath := testpki.Write(t, dir, "client-ca.pem", ca.PEM)
	crlPath := testpki.Write(t, dir, "client.crl", ca.CRL(t, time.Now().Add(time.Hour))) // DER
	alice := ca.Issue(t, testpki.LeafOptions{CN: "alice", URIs: []string{"urn:pinaka:token:cert-alice", "urn:pinaka:region:test"}})
	bob := ca.Issue(t, testpki.LeafOptions{CN: "bob", URIs: []string{"urn:pinaka:token:cert-bob", "urn:pinaka:region:test"}})

	p := startBinary(t, certPath, keyPath, "CLIENT_CA_PATH="+caPath, "CLIENT_CRL_PATH="+crlPath, "CLIENT_CERT_MODE=require")
	origin := echoOrigin(t)
	if got := certConnect(t, p.Addr, origin, alice.TLS); got != 200 {
		t.Fatalf("before the reload: %d", got)
	}

	writeAtomically(t, crlPath, ca.CRLPEM(t, time.Now().Add(time.Hour), alice.Cert.SerialNumber))
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, `"msg":"client certificate trust reloaded"`)
	if got := certConnect(t, p.Addr, origin, alice.TLS); got != 0 {
		t.Fatalf("revoked certificate after SIGHUP: status %d, want a failed handshake", got)
	}
	waitLog(t, p, `"result":"revoked"`)
	if got := certConnect(t, p.Addr, origin, bob.TLS); got != 200 {
		t.Fatalf("another certificate after SIGHUP: %d", got)
	}

	writeAtomically(t, crlPath, []byte("not a CRL"))
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, "client certificate trust reload refused")
	if !strings.Contains(p.Log.String(), "CLIENT_CRL_PATH") {
		t.Errorf("the refusal does not name CLIENT_CRL_PATH:\n%s", p.Log.String())
	}
	if got := certConnect(t, p.Addr, origin, alice.TLS); got != 0 {
		t.Fatalf("revoked certificate after a refused reload: %d", got)
	}
	if got := certConnect(t, p.Addr, origin, bob.TLS); got != 200 {
		t.Fatalf("good certificate after a refused reload: %d", got)
	}
}

// Malformed client certificate settings stop start-up naming the variable.
func TestClientCertConfigRefusedAtStart(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	certPath, keyPath, _ := writeCert(t, dir)
	ca := testpki.NewCA(t, "clients")
	caPath := testpki.Write(t, dir, "ca.pem", ca.PEM)
	base := map[string]string{"JWT_SECRET": lifecycleSecret, "TLS_CERT_PATH": certPath, "TLS_KEY_PATH": keyPath}
	for _, c := range []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{"CLIENT_CERT_MODE": "require"}, "CLIENT_CA_PATH is required"},
		{map[string]string{"CLIENT_CA_PATH": filepath.Join(dir, "nope.pem")}, "CLIENT_CA_PATH: "},
		{map[string]string{"CLIENT_CA_PATH": caPath, "CLIENT_CRL_PATH": caPath}, "CLIENT_CRL_PATH: "},
	} {
		vars := map[string]string{}
		for k, v := range base {
			vars[k] = v
		}
		for k, v := range c.vars {
			vars[k] = v
		}
		r := runCLI("check-config", "--env-file", envFile(t, vars))
		if r.code == 0 || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%v: %v; want a failure saying %q", c.vars, r, c.want)
		}
	}
	base["CLIENT_CA_PATH"] = caPath
	r := runCLI("check-config", "--env-file", envFile(t, base))
	if r.code != 0 || !strings.Contains(r.stdout, "optional") || !strings.Contains(r.stdout, "(1 CAs)") {
		t.Errorf("check-config with a CA: %v", r)
	}
}
