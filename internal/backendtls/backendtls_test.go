package backendtls_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

func parse(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNodeIdentity(t *testing.T) {
	ca := testutil.NewTestCA(t, "nodes")
	long := strings.Repeat("a", backendtls.MaxNodeNameLen+1)
	for _, tc := range []struct {
		name string
		uris []string
		want string // "" = error
	}{
		{"one node", []string{"urn:pinaka:node:node-a"}, "node-a"},
		{"prefix case-insensitive", []string{"URN:Pinaka:Node:eu-west-1.example"}, "eu-west-1.example"},
		{"other URIs ignored", []string{"spiffe://example/x", "urn:pinaka:node:n_1"}, "n_1"},
		{"none", []string{"spiffe://example/x"}, ""},
		{"two", []string{"urn:pinaka:node:a", "urn:pinaka:node:b"}, ""},
		{"empty name", []string{"urn:pinaka:node:"}, ""},
		{"bad character", []string{"urn:pinaka:node:a%20b"}, ""},
		{"colon", []string{"urn:pinaka:node:a:b"}, ""},
		{"too long", []string{"urn:pinaka:node:" + long}, ""},
		{"longest", []string{"urn:pinaka:node:" + long[1:]}, long[1:]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := ca.Issue(t, testutil.Leaf{CommonName: "node-a", URIs: tc.uris, DNSNames: []string{"node-a"}, Client: true})
			got, err := backendtls.NodeIdentity(parse(t, c))
			if tc.want == "" {
				if err == nil {
					t.Fatalf("NodeIdentity = %q, want an error", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("NodeIdentity = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// The CN and DNS SANs never make an identity: only the URI SAN does.
func TestNodeIdentityIgnoresCNAndDNS(t *testing.T) {
	ca := testutil.NewTestCA(t, "nodes")
	c, _ := ca.Issue(t, testutil.Leaf{CommonName: "node-a", DNSNames: []string{"node-a"}, Client: true})
	if got, err := backendtls.NodeIdentity(parse(t, c)); err == nil {
		t.Fatalf("NodeIdentity = %q from CN/DNS, want an error", got)
	}
}

func TestNewErrorsNameTheVariable(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewTestCA(t, "nodes")
	cert, key := ca.IssueFiles(t, dir, "node-a", testutil.Leaf{URIs: []string{"urn:pinaka:node:node-a"}, Client: true})
	serverCert, serverKey := ca.IssueFiles(t, dir, "server", testutil.Leaf{IPs: []string{"127.0.0.1"}})
	bad := filepath.Join(dir, "bad.pem")
	os.WriteFile(bad, []byte("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"), 0o600)
	cut := filepath.Join(dir, "cut.pem")
	os.WriteFile(cut, append(append([]byte{}, ca.CertPEM...), ca.CertPEM[:60]...), 0o600)
	keyAsCA := filepath.Join(dir, "keyasca.pem")
	k, _ := os.ReadFile(key)
	os.WriteFile(keyAsCA, k, 0o600)
	missing := filepath.Join(dir, "missing.pem")
	for _, tc := range []struct {
		name string
		o    backendtls.Options
		want []string
	}{
		{"cert without key", backendtls.Options{CertPath: cert}, []string{"BACKEND_CLIENT_CERT_PATH is set but BACKEND_CLIENT_KEY_PATH is not"}},
		{"key without cert", backendtls.Options{KeyPath: key}, []string{"BACKEND_CLIENT_KEY_PATH is set but BACKEND_CLIENT_CERT_PATH is not"}},
		{"missing cert file", backendtls.Options{CertPath: missing, KeyPath: key}, []string{"BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH", "missing.pem"}},
		{"cert and key mismatch", backendtls.Options{CertPath: cert, KeyPath: serverKey}, []string{"BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH"}},
		{"server certificate as client certificate", backendtls.Options{CertPath: serverCert, KeyPath: serverKey}, []string{"BACKEND_CLIENT_CERT_PATH", "clientAuth"}},
		{"other node", backendtls.Options{CertPath: cert, KeyPath: key, Node: "node-b"}, []string{"BACKEND_CLIENT_CERT_PATH", `names node "node-a" but PROBE_NODE_NAME is "node-b"`}},
		{"missing CA", backendtls.Options{CAPath: missing}, []string{"BACKEND_CA_PATH", "missing.pem"}},
		{"malformed CA", backendtls.Options{CAPath: bad}, []string{"BACKEND_CA_PATH"}},
		{"CA cut short", backendtls.Options{CAPath: cut}, []string{"BACKEND_CA_PATH", "cut short"}},
		{"key as CA", backendtls.Options{CAPath: keyAsCA}, []string{"BACKEND_CA_PATH", "want CERTIFICATE"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := backendtls.New(tc.o)
			if err == nil {
				t.Fatalf("New = %v, nil; want an error", c)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	if c, err := backendtls.New(backendtls.Options{CertPath: cert, KeyPath: key, Node: "node-a", CAPath: filepath.Join(dir, "ca.pem")}); err == nil {
		t.Errorf("New with a missing ca.pem = %v, want an error", c)
	}
	testutil.WriteFile(t, filepath.Join(dir, "ca.pem"), ca.CertPEM)
	if _, err := backendtls.New(backendtls.Options{CertPath: cert, KeyPath: key, Node: "node-a", CAPath: filepath.Join(dir, "ca.pem")}); err != nil {
		t.Errorf("New with good files: %v", err)
	}
	if c, err := backendtls.New(backendtls.Options{Node: "x"}); c != nil || err != nil {
		t.Errorf("New with nothing set = %v, %v; want nil, nil", c, err)
	}
}

// peerRecorder is a real TLS server that asks for client certificates and
// records the serial number of each one it was shown.
type peerRecorder struct {
	srv     *httptest.Server
	mu      sync.Mutex
	serials []string
}

func newPeerRecorder(t *testing.T, certPEM, keyPEM []byte) *peerRecorder {
	t.Helper()
	p := &peerRecorder{}
	p.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		defer p.mu.Unlock()
		s := "none"
		if len(r.TLS.PeerCertificates) > 0 {
			s = r.TLS.PeerCertificates[0].SerialNumber.String()
		}
		p.serials = append(p.serials, s)
		io.WriteString(w, "ok")
	}))
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	p.srv.TLS = &tls.Config{Certificates: []tls.Certificate{c}, ClientAuth: tls.RequestClientCert}
	p.srv.StartTLS()
	t.Cleanup(p.srv.Close)
	return p
}

func (p *peerRecorder) last() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.serials) == 0 {
		return ""
	}
	return p.serials[len(p.serials)-1]
}

func get(c *http.Client, url string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	c.CloseIdleConnections()
	return nil
}

// The client presents its certificate, verifies the server with
// BACKEND_CA_PATH (another CA's certificate, a wrong IP are refused), and a
// Reload — what SIGHUP calls — swaps both for new connections.
func TestClientVerifiesAndReloads(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewTestCA(t, "backend")
	other := testutil.NewTestCA(t, "other")
	sc, sk := ca.Issue(t, testutil.Leaf{IPs: []string{"127.0.0.1"}})
	good := newPeerRecorder(t, sc, sk)
	oc, ok := other.Issue(t, testutil.Leaf{IPs: []string{"127.0.0.1"}})
	foreign := newPeerRecorder(t, oc, ok)
	wc, wk := ca.Issue(t, testutil.Leaf{IPs: []string{"127.0.0.2"}, DNSNames: []string{"localhost"}})
	wrongName := newPeerRecorder(t, wc, wk)

	caPath := filepath.Join(dir, "ca.pem")
	testutil.WriteFile(t, caPath, ca.CertPEM)
	cert, key := ca.IssueFiles(t, dir, "node", testutil.Leaf{URIs: []string{"urn:pinaka:node:node-a"}, Client: true})
	bt, err := backendtls.New(backendtls.Options{CAPath: caPath, CertPath: cert, KeyPath: key, Node: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	client := func(url string) *http.Client {
		c, err := bt.HTTPClient(url, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if err := get(client(good.srv.URL), good.srv.URL); err != nil {
		t.Fatalf("trusted backend refused: %v", err)
	}
	first := good.last()
	if first == "none" || first == "" {
		t.Fatalf("backend saw client certificate %q", first)
	}
	if err := get(client(foreign.srv.URL), foreign.srv.URL); err == nil || !strings.Contains(err.Error(), "BACKEND_CA_PATH") {
		t.Errorf("backend with another CA's certificate: err = %v, want a verification error naming BACKEND_CA_PATH", err)
	}
	if err := get(client(wrongName.srv.URL), wrongName.srv.URL); err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Errorf("backend certificate for another IP: err = %v, want a name mismatch", err)
	}

	// Rotation: a new client certificate and the other CA added to the
	// bundle; the same client (no rebuild) uses both on new connections.
	c := client(foreign.srv.URL)
	cert2, key2 := ca.Issue(t, testutil.Leaf{URIs: []string{"urn:pinaka:node:node-a"}, Client: true})
	testutil.WriteFile(t, cert, cert2)
	testutil.WriteFile(t, key, key2)
	testutil.WriteFile(t, caPath, append(append([]byte{}, ca.CertPEM...), other.CertPEM...))
	if err := bt.Reload(); err != nil {
		t.Fatal(err)
	}
	if bt.CAs() != 2 {
		t.Errorf("CAs() = %d after reload, want 2", bt.CAs())
	}
	if err := get(c, foreign.srv.URL); err != nil {
		t.Errorf("after adding the other CA: %v", err)
	}
	if err := get(client(good.srv.URL), good.srv.URL); err != nil {
		t.Fatal(err)
	}
	if second := good.last(); second == first || second == "none" {
		t.Errorf("after reload the backend saw serial %s, before %s: want the new certificate", second, first)
	}

	// Bad files on reload are refused and what is in use kept.
	testutil.WriteFile(t, caPath, []byte("garbage"))
	testutil.WriteFile(t, cert, []byte("garbage"))
	err = bt.Reload()
	if err == nil || !strings.Contains(err.Error(), "BACKEND_CA_PATH") || !strings.Contains(err.Error(), "BACKEND_CLIENT_CERT_PATH") {
		t.Errorf("Reload with bad files = %v, want errors naming both variables", err)
	}
	if err := get(client(foreign.srv.URL), foreign.srv.URL); err != nil {
		t.Errorf("after a refused reload the old bundle should be in use: %v", err)
	}
	if got := good.last(); got == "none" {
		t.Error("after a refused reload no client certificate was presented")
	}
}

// A node with another PROBE_NODE_NAME than its new certificate keeps the old
// certificate on reload.
func TestReloadRefusesOtherNode(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewTestCA(t, "nodes")
	cert, key := ca.IssueFiles(t, dir, "node", testutil.Leaf{URIs: []string{"urn:pinaka:node:node-a"}, Client: true})
	bt, err := backendtls.New(backendtls.Options{CertPath: cert, KeyPath: key, Node: "node-a"})
	if err != nil {
		t.Fatal(err)
	}
	before := bt.Leaf().SerialNumber
	ca.IssueFiles(t, dir, "node", testutil.Leaf{URIs: []string{"urn:pinaka:node:node-b"}, Client: true})
	if err := bt.Reload(); err == nil || !strings.Contains(err.Error(), "node-b") {
		t.Errorf("Reload with node-b's certificate = %v", err)
	}
	if bt.Leaf().SerialNumber.Cmp(before) != 0 {
		t.Error("the refused certificate replaced the one in use")
	}
}
