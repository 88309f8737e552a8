package config

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// The node's backend TLS variables are loaded at start; every problem names
// its variable.
func TestBackendTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewTestCA(t, "nodes")
	cert, key := ca.IssueFiles(t, dir, "node-a", testutil.Leaf{URIs: []string{"urn:pinaka:node:node-a"}, Client: true})
	caPath := filepath.Join(dir, "ca.pem")
	testutil.WriteFile(t, caPath, ca.CertPEM)
	bad := filepath.Join(dir, "bad.pem")
	testutil.WriteFile(t, bad, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	base := func(kv ...string) map[string]string {
		m := map[string]string{"PROBE_NODE_NAME": "node-a", "BACKEND_URL": "https://collector.example:8443"}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	c, err := Load(lookupOf(base("BACKEND_CA_PATH", caPath, "BACKEND_CLIENT_CERT_PATH", cert, "BACKEND_CLIENT_KEY_PATH", key)), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.BackendTLS == nil || c.BackendTLS.CAs() != 1 || c.BackendTLS.Leaf() == nil {
		t.Errorf("BackendTLS = %+v", c.BackendTLS)
	}
	if c, err := Load(lookupOf(base()), true); err != nil || c.BackendTLS != nil {
		t.Errorf("without the variables: %v, %v; want no backend TLS", c.BackendTLS, err)
	}
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"BACKEND_CLIENT_CERT_PATH", cert}, "BACKEND_CLIENT_CERT_PATH is set but BACKEND_CLIENT_KEY_PATH is not"},
		{[]string{"BACKEND_CLIENT_KEY_PATH", key}, "BACKEND_CLIENT_KEY_PATH is set but BACKEND_CLIENT_CERT_PATH is not"},
		{[]string{"BACKEND_CA_PATH", bad}, "BACKEND_CA_PATH"},
		{[]string{"BACKEND_CA_PATH", filepath.Join(dir, "none.pem")}, "BACKEND_CA_PATH"},
		{[]string{"BACKEND_CLIENT_CERT_PATH", cert, "BACKEND_CLIENT_KEY_PATH", bad}, "BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH"},
		{[]string{"BACKEND_CLIENT_CERT_PATH", cert, "BACKEND_CLIENT_KEY_PATH", key, "PROBE_NODE_NAME", "node-b"}, "PROBE_NODE_NAME"},
		{[]string{"BACKEND_CA_PATH", caPath, "BACKEND_URL", "http://collector.example:8080"}, "BACKEND_URL must be https://"},
	} {
		_, err := Load(lookupOf(base(tc.env...)), true)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Load(%v) = %v, want an error containing %q", tc.env, err, tc.want)
		}
	}
}
