package main

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// keygenJWKS runs `pinaka keygen` into dir and returns the key file and
// the printed JWKS's keys.
func keygenJWKS(t *testing.T, dir, alg string) (keyPath string, keys []json.RawMessage) {
	t.Helper()
	keyPath = filepath.Join(dir, alg+".pem")
	r := runCLI("keygen", "--alg", alg, "--out", keyPath)
	if r.code != 0 {
		t.Fatalf("keygen %s: %v", alg, r)
	}
	st, err := os.Stat(keyPath)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, mode %v", err, st.Mode())
	}
	var doc struct{ Keys []json.RawMessage }
	if err := json.Unmarshal([]byte(r.stdout), &doc); err != nil || len(doc.Keys) != 1 {
		t.Fatalf("keygen stdout is not a one-key JWKS (%v): %q", err, r.stdout)
	}
	if strings.Contains(r.stdout, `"d"`) {
		t.Fatalf("keygen printed private material: %s", r.stdout)
	}
	return keyPath, doc.Keys
}

func writeJWKS(t *testing.T, path string, keys ...json.RawMessage) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"keys": keys})
	if err != nil {
		t.Fatal(err)
	}
	// Write then rename, as an operator's deploy tool would: a SIGHUP never
	// reads a half-written file.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func tokenWithKey(t *testing.T, keyPath string, extra ...string) string {
	t.Helper()
	r := runCLI(append([]string{"token", "--env-file", emptyEnvFile(t), "--key", keyPath,
		"--token-id", "k1", "--user", "u", "--regions", "test"}, extra...)...)
	if r.code != 0 {
		t.Fatalf("token --key: %v", r)
	}
	return strings.TrimSpace(r.stdout)
}

// connectStatus sends one CONNECT through the proxy and returns the status.
func connectStatus(t *testing.T, addr, target, tok string) int {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req, _ := http.NewRequest(http.MethodConnect, "http://"+target, nil)
	req.Host = target
	req.Header.Set("Proxy-Authorization", "Bearer "+tok)
	if err := req.Write(c); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode
}

// keygen → token --key → a proxy with the printed JWKS as JWT_PUBLIC_KEYS
// and no JWT_SECRET lets the token through, for each keygen algorithm.
func TestKeygenTokenKeyThroughTheProxy(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	var all []json.RawMessage
	keyFiles := map[string]string{}
	for _, alg := range []string{"ES256", "EdDSA", "RS256"} {
		k, keys := keygenJWKS(t, dir, alg)
		keyFiles[alg] = k
		all = append(all, keys...)
	}
	jwks := filepath.Join(dir, "jwks.json")
	writeJWKS(t, jwks, all...)
	certPath, keyPath, _ := writeCert(t, dir)
	p := startPublicKeysOnly(t, certPath, keyPath, jwks)
	origin := echoOrigin(t)
	for alg, k := range keyFiles {
		tok := tokenWithKey(t, k)
		if got := connectStatus(t, p.Addr, origin, tok); got != http.StatusOK {
			t.Errorf("%s token: CONNECT status %d, want 200", alg, got)
		}
	}
	// The node holds no secret: an HS256 token is refused.
	if got := connectStatus(t, p.Addr, origin, testToken(t)); got != http.StatusProxyAuthRequired {
		t.Errorf("HS256 token on a public-key-only node: %d", got)
	}
	// An explicit --kid the set does not hold is refused.
	if got := connectStatus(t, p.Addr, origin, tokenWithKey(t, keyFiles["ES256"], "--kid", "other")); got != http.StatusProxyAuthRequired {
		t.Errorf("token with an unknown kid: %d", got)
	}
}

func startPublicKeysOnly(t *testing.T, certPath, keyPath, jwks string) *testutil.Pinaka {
	t.Helper()
	return testutil.StartPinaka(t, "TLS_CERT_PATH="+certPath, "TLS_KEY_PATH="+keyPath, "JWT_PUBLIC_KEYS="+jwks,
		"ADMIN_ADDR=off", "PROBE_NODE_REGION=test", "EGRESS_ALLOW_CIDRS=127.0.0.0/8")
}

// SIGHUP re-reads JWT_PUBLIC_KEYS: a new kid is accepted and a removed
// one refused without a restart; a bad file is refused and the keys in
// use are kept.
func TestSIGHUPReloadsPublicKeys(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	keyA, jwkA := keygenJWKS(t, dir, "ES256")
	keyB, jwkB := keygenJWKS(t, dir, "EdDSA")
	jwks := filepath.Join(dir, "jwks.json")
	writeJWKS(t, jwks, jwkA...)
	certPath, keyPath, _ := writeCert(t, dir)
	p := startPublicKeysOnly(t, certPath, keyPath, jwks)
	origin := echoOrigin(t)
	tokA, tokB := tokenWithKey(t, keyA), tokenWithKey(t, keyB)
	if got := connectStatus(t, p.Addr, origin, tokA); got != 200 {
		t.Fatalf("key A before reload: %d", got)
	}
	if got := connectStatus(t, p.Addr, origin, tokB); got != 407 {
		t.Fatalf("key B before reload: %d", got)
	}

	writeJWKS(t, jwks, jwkB...)
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, "JWT_PUBLIC_KEYS reloaded")
	if got := connectStatus(t, p.Addr, origin, tokB); got != 200 {
		t.Errorf("new kid after reload: %d", got)
	}
	if got := connectStatus(t, p.Addr, origin, tokA); got != 407 {
		t.Errorf("removed kid after reload: %d", got)
	}

	if err := os.WriteFile(jwks, []byte(`{"keys": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, "JWT_PUBLIC_KEYS reload refused")
	if got := connectStatus(t, p.Addr, origin, tokB); got != 200 {
		t.Errorf("kept key after a bad reload: %d", got)
	}
}

func waitLog(t *testing.T, p *testutil.Pinaka, msg string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Log.String(), msg) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log:\n%s", msg, p.Log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestKeygenAndTokenKeyErrors(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	keyPath, _ := keygenJWKS(t, dir, "ES256")
	before, _ := os.ReadFile(keyPath)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"existing file", []string{"keygen", "--alg", "ES256", "--out", keyPath}, "file exists"},
		{"bad alg", []string{"keygen", "--alg", "HS256", "--out", filepath.Join(dir, "x.pem")}, "--alg must be"},
		{"kid without key", []string{"token", "--env-file", emptyEnvFile(t), "--kid", "k", "--token-id", "1", "--regions", "*"}, "--kid needs --key"},
		{"missing key file", []string{"token", "--env-file", emptyEnvFile(t), "--key", filepath.Join(dir, "nope"), "--token-id", "1", "--regions", "*"}, "--key"},
		{"public key as --key", []string{"token", "--env-file", emptyEnvFile(t), "--key", filepath.Join(dir, "pub.pem"), "--token-id", "1", "--regions", "*"}, "no PEM private key"},
		{"alg of another family", []string{"token", "--env-file", emptyEnvFile(t), "--key", keyPath, "--alg", "RS256", "--token-id", "1", "--regions", "*"}, "does not fit"},
	} {
		if tc.name == "public key as --key" {
			signer, _ := auth.ParsePrivateKeyPEM(before)
			pub, _ := auth.MarshalJWKS([]auth.PublicKey{{ID: "x", Key: signer.Public()}})
			os.WriteFile(filepath.Join(dir, "pub.pem"), pub, 0o600)
		}
		r := runCLI(tc.args...)
		if r.code != 1 || !strings.Contains(r.stderr, tc.want) || r.stdout != "" {
			t.Errorf("%s: want exit 1 naming %q, got %v", tc.name, tc.want, r)
		}
	}
	if after, _ := os.ReadFile(keyPath); string(after) != string(before) {
		t.Error("keygen overwrote an existing key")
	}
	// The default algorithm and kid of token --key: ES256 and the key's
	// thumbprint, which the JWKS from keygen carries too.
	tok := tokenWithKey(t, keyPath)
	signer, _ := auth.ParsePrivateKeyPEM(before)
	kid, _ := auth.KeyID(signer.Public())
	if h := jwtHeader(t, tok); h["alg"] != "ES256" || h["kid"] != kid {
		t.Errorf("header %v, want ES256 and kid %s", h, kid)
	}
}

func jwtHeader(t *testing.T, tok string) map[string]any {
	t.Helper()
	var h map[string]any
	seg, _, _ := strings.Cut(tok, ".")
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err == nil {
		err = json.Unmarshal(b, &h)
	}
	if err != nil {
		t.Fatal(fmt.Errorf("header of %q: %w", tok, err))
	}
	return h
}

// check-config shows the key file and its kids; JWT_SECRET may be unset.
func TestCheckConfigShowsPublicKeys(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	_, jwk := keygenJWKS(t, dir, "EdDSA")
	jwks := filepath.Join(dir, "jwks.json")
	writeJWKS(t, jwks, jwk...)
	var kid struct{ Kid string }
	json.Unmarshal(jwk[0], &kid)
	c := goodConfig(t)
	delete(c, "JWT_SECRET")
	c["JWT_PUBLIC_KEYS"] = jwks
	setEnv(t, c)
	r := runCLI("check-config", "--env-file", emptyEnvFile(t))
	if r.code != 0 {
		t.Fatalf("check-config: %v", r)
	}
	s := settings(r.stdout)
	if want := fmt.Sprintf("%s (1 keys, kids %s)", jwks, kid.Kid); s["JWT_PUBLIC_KEYS"] != want || s["JWT_SECRET"] != "(not set)" {
		t.Errorf("JWT_PUBLIC_KEYS row %q, want %q; JWT_SECRET row %q", s["JWT_PUBLIC_KEYS"], want, s["JWT_SECRET"])
	}
}

// JWKS_URL end to end with the real binary: the proxy fetches the set at
// start and saves it under STATE_DIR; restarted while the key server is
// down, it verifies with the saved set; with neither it does not start.
func TestJWKSURLWithTheBinary(t *testing.T) {
	clearEnv(t)
	dir := t.TempDir()
	keyPath, jwk := keygenJWKS(t, dir, "EdDSA")
	doc, _ := json.Marshal(map[string]any{"keys": jwk})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(doc) }))
	state := t.TempDir()
	certPath, certKey, _ := writeCert(t, dir)
	env := []string{"TLS_CERT_PATH=" + certPath, "TLS_KEY_PATH=" + certKey, "JWKS_URL=" + srv.URL,
		"STATE_DIR=" + state, "ADMIN_ADDR=off", "PROBE_NODE_REGION=test", "EGRESS_ALLOW_CIDRS=127.0.0.0/8"}
	origin := echoOrigin(t)
	tok := tokenWithKey(t, keyPath)

	p := testutil.StartPinaka(t, env...)
	if got := connectStatus(t, p.Addr, origin, tok); got != 200 {
		t.Fatalf("token with a JWKS_URL key: %d", got)
	}
	p.Signal(syscall.SIGTERM)
	p.Wait(t, 10*time.Second)

	srv.Close()
	p2 := testutil.StartPinaka(t, env...)
	if got := connectStatus(t, p2.Addr, origin, tok); got != 200 {
		t.Errorf("restart with the key server down: %d", got)
	}
	if !strings.Contains(p2.Log.String(), "using the saved key set") {
		t.Errorf("no warning about the saved set:\n%s", p2.Log.String())
	}

	clearEnv(t)
	setEnv(t, map[string]string{"TLS_CERT_PATH": certPath, "TLS_KEY_PATH": certKey, "JWKS_URL": srv.URL,
		"STATE_DIR": t.TempDir(), "ADMIN_ADDR": "off", "PROXY_BIND": "127.0.0.1", "PROXY_PORT": testutil.FreePort(t)})
	r := runCLI("serve", "--env-file", emptyEnvFile(t))
	if r.code != 1 || !strings.Contains(r.stderr, "JWKS_URL: fetching") {
		t.Errorf("start without key server or saved set: %v", r)
	}
}
