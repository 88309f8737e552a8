package config

import (
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

func TestClientCertConfig(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.NewCA(t, "clients")
	caPath := testpki.Write(t, dir, "ca.pem", ca.PEM)
	crlPath := testpki.Write(t, dir, "crl.pem", ca.CRLPEM(t, time.Now().Add(time.Hour), testpki.Serial(t)))
	junk := testpki.Write(t, dir, "junk.pem", []byte("not a certificate"))
	foreignCRL := testpki.Write(t, dir, "foreign.crl", testpki.NewCA(t, "other").CRLPEM(t, time.Now().Add(time.Hour)))

	load := func(vars map[string]string) (*Config, error) { return Load(lookupOf(vars), true) }

	c, err := load(nil)
	if err != nil || c.ClientCertMode != ClientCertOff || c.ClientTrust != nil {
		t.Fatalf("default: mode %q, trust %v, %v", c.ClientCertMode, c.ClientTrust, err)
	}
	// A bundle without a mode means optional: configured, so used.
	c, err = load(map[string]string{"CLIENT_CA_PATH": caPath, "CLIENT_CRL_PATH": crlPath})
	if err != nil || c.ClientCertMode != ClientCertOptional || c.ClientTrust == nil || c.ClientTrust.CAs() != 1 {
		t.Fatalf("CA without mode: %+v, %v", c, err)
	}
	if n, e := c.ClientTrust.CRLs(); n != 1 || e != 1 {
		t.Fatalf("CRL: %d lists, %d entries", n, e)
	}
	c, err = load(map[string]string{"CLIENT_CA_PATH": caPath, "CLIENT_CERT_MODE": "Require"})
	if err != nil || c.ClientCertMode != ClientCertRequire {
		t.Fatalf("require: %q, %v", c.ClientCertMode, err)
	}

	for _, tc := range []struct {
		vars map[string]string
		want string
	}{
		{map[string]string{"CLIENT_CERT_MODE": "require"}, "CLIENT_CA_PATH is required when CLIENT_CERT_MODE is require"},
		{map[string]string{"CLIENT_CERT_MODE": "optional"}, "CLIENT_CA_PATH is required when CLIENT_CERT_MODE is optional"},
		{map[string]string{"CLIENT_CERT_MODE": "yes", "CLIENT_CA_PATH": caPath}, "CLIENT_CERT_MODE must be off, optional or require"},
		{map[string]string{"CLIENT_CRL_PATH": crlPath}, "CLIENT_CRL_PATH needs CLIENT_CA_PATH"},
		{map[string]string{"CLIENT_CA_PATH": junk}, "CLIENT_CA_PATH: "},
		{map[string]string{"CLIENT_CA_PATH": dir + "/missing.pem"}, "CLIENT_CA_PATH: "},
		{map[string]string{"CLIENT_CA_PATH": caPath, "CLIENT_CRL_PATH": junk}, "CLIENT_CRL_PATH: "},
		{map[string]string{"CLIENT_CA_PATH": caPath, "CLIENT_CRL_PATH": foreignCRL}, "CLIENT_CRL_PATH: "},
	} {
		_, err := load(tc.vars)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want one saying %q", tc.vars, err, tc.want)
		}
	}
}
