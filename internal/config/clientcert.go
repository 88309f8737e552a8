package config

import (
	"fmt"
	"strings"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// Client certificate modes (CLIENT_CERT_MODE).
const (
	ClientCertOff      = "off"      // no certificate is asked for
	ClientCertOptional = "optional" // asked for, verified if sent; tokens still work
	ClientCertRequire  = "require"  // a handshake without a valid certificate fails
)

// loadClientCerts reads CLIENT_CA_PATH, CLIENT_CERT_MODE and
// CLIENT_CRL_PATH. Without CLIENT_CERT_MODE the mode is optional when a
// CA bundle is configured (a bundle set up and silently unused would be a
// surprise) and off otherwise. Both files are parsed here, so that a
// malformed one stops start-up with the variable named.
func loadClientCerts(p *parser, c *Config) {
	c.ClientCAPath = p.str("CLIENT_CA_PATH", "")
	c.ClientCRLPath = p.str("CLIENT_CRL_PATH", "")
	def := ClientCertOff
	if c.ClientCAPath != "" {
		def = ClientCertOptional
	}
	c.ClientCertMode = strings.ToLower(p.str("CLIENT_CERT_MODE", def))
	if c.ClientCertMode == "" {
		c.ClientCertMode = def
	}
	switch c.ClientCertMode {
	case ClientCertOff:
	case ClientCertOptional, ClientCertRequire:
		if c.ClientCAPath == "" {
			p.fail("CLIENT_CA_PATH", "is required when CLIENT_CERT_MODE is %s", c.ClientCertMode)
		}
	default:
		p.fail("CLIENT_CERT_MODE", "must be off, optional or require, got %q", c.ClientCertMode)
	}
	if c.ClientCRLPath != "" && c.ClientCAPath == "" {
		p.fail("CLIENT_CRL_PATH", "needs CLIENT_CA_PATH (a CRL is checked against the CA that signed it)")
	}
	if c.ClientCAPath == "" {
		return
	}
	t, err := LoadClientTrust(c.ClientCAPath, c.ClientCRLPath)
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	c.ClientTrust = t
}

// LoadClientTrust reads the CA bundle and the CRLs (crlPath may be
// empty); its errors name the variable of the file at fault. SIGHUP
// reloads with it too.
func LoadClientTrust(caPath, crlPath string) (*auth.ClientTrust, error) {
	cas, err := auth.LoadClientCAs(caPath)
	if err != nil {
		return nil, fmt.Errorf("CLIENT_CA_PATH: %w", err)
	}
	var crls []*auth.CRL
	if crlPath != "" {
		if crls, err = auth.LoadCRLs(crlPath, cas); err != nil {
			return nil, fmt.Errorf("CLIENT_CRL_PATH: %w", err)
		}
	}
	return auth.NewClientTrust(cas, crls), nil
}
