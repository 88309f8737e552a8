package tlsfiles_test

import (
	"bytes"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
	"github.com/pinaka-proxy/pinaka/internal/tlsfiles"
)

func TestLoadCAs(t *testing.T) {
	dir := t.TempDir()
	a, b := testutil.NewTestCA(t, "a"), testutil.NewTestCA(t, "b")
	_, key := a.Issue(t, testutil.Leaf{})
	write := func(name string, parts ...[]byte) string {
		p := filepath.Join(dir, name)
		testutil.WriteFile(t, p, bytes.Join(parts, nil))
		return p
	}
	for _, tc := range []struct {
		name, path string
		n          int
		want       string
	}{
		{"two", write("two.pem", []byte("# comment\n"), a.CertPEM, []byte("# Issuer: b\n"), b.CertPEM), 2, ""},
		{"empty", write("empty.pem"), 0, "holds no PEM certificate"},
		{"text", write("text.pem", []byte("hello")), 0, "holds no PEM certificate"},
		{"key", write("key.pem", a.CertPEM, key), 0, `block 2 is "PRIVATE KEY"`},
		{"cut short", write("cut.pem", a.CertPEM, b.CertPEM[:100]), 0, "cut short"},
		{"bad DER", write("der.pem", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")), 0, "certificate 1"},
		{"missing", filepath.Join(dir, "missing.pem"), 0, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pool, n, err := tlsfiles.LoadCAs(tc.path)
			if tc.want == "" {
				if err != nil || n != tc.n || pool == nil {
					t.Fatalf("LoadCAs = %v, %d, %v", pool, n, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadCAs error = %v, want %q", err, tc.want)
			}
		})
	}
	big := filepath.Join(dir, "big.pem")
	if err := os.WriteFile(big, bytes.Repeat([]byte("#"), tlsfiles.MaxFileBytes+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tlsfiles.LoadCAs(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized bundle: %v", err)
	}
}

func TestKeyPairReload(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewTestCA(t, "ca")
	cert, key := ca.IssueFiles(t, dir, "leaf", testutil.Leaf{CommonName: "one"})
	refuse := errors.New("refused by check")
	var check func(*tls.Certificate) error = func(c *tls.Certificate) error {
		if c.Leaf.Subject.CommonName == "refused" {
			return refuse
		}
		return nil
	}
	kp, err := tlsfiles.NewKeyPair(cert, key, check)
	if err != nil {
		t.Fatal(err)
	}
	ca.IssueFiles(t, dir, "leaf", testutil.Leaf{CommonName: "two"})
	if err := kp.Reload(); err != nil || kp.Leaf().Subject.CommonName != "two" {
		t.Fatalf("reload: %v, CN %s", err, kp.Leaf().Subject.CommonName)
	}
	got, _ := kp.GetClientCertificate(nil)
	if got.Leaf.Subject.CommonName != "two" {
		t.Errorf("GetClientCertificate gives %s", got.Leaf.Subject.CommonName)
	}
	for _, tc := range []struct {
		name string
		leaf testutil.Leaf
		junk bool
		want string
	}{
		{"check", testutil.Leaf{CommonName: "refused"}, false, "refused by check"},
		{"expired", testutil.Leaf{CommonName: "old", NotAfter: time.Now().Add(-time.Minute)}, false, "expired"},
		{"junk", testutil.Leaf{}, true, "loading certificate"},
	} {
		if tc.junk {
			testutil.WriteFile(t, cert, []byte("junk"))
		} else {
			ca.IssueFiles(t, dir, "leaf", tc.leaf)
		}
		if err := kp.Reload(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Reload = %v, want %q", tc.name, err, tc.want)
		}
		if cn := kp.Leaf().Subject.CommonName; cn != "two" {
			t.Errorf("%s: a refused pair replaced the one in use (CN %s)", tc.name, cn)
		}
	}
}
