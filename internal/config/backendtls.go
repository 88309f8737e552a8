package config

import (
	"strings"

	"github.com/pinaka-proxy/pinaka/internal/backendtls"
)

// backendTLS reads the node-to-backend TLS variables and loads their files,
// so a missing or malformed file, or a client certificate naming another
// node than PROBE_NODE_NAME, stops start-up naming its variable. It runs
// after PROBE_NODE_NAME and BACKEND_URL are read.
func (p *parser) backendTLS(c *Config) {
	c.BackendCAPath = p.str("BACKEND_CA_PATH", "")
	c.BackendClientCertPath = p.str("BACKEND_CLIENT_CERT_PATH", "")
	c.BackendClientKeyPath = p.str("BACKEND_CLIENT_KEY_PATH", "")
	bt, err := backendtls.New(backendtls.Options{
		CAPath: c.BackendCAPath, CertPath: c.BackendClientCertPath, KeyPath: c.BackendClientKeyPath,
		Node: c.ProbeNodeName,
	})
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	c.BackendTLS = bt
	// A certificate or CA sent over plain HTTP would do nothing while
	// the operator believes the link is protected.
	if bt != nil && c.BackendURL != "" && !strings.HasPrefix(strings.ToLower(c.BackendURL), "https://") {
		p.fail("BACKEND_URL", "must be https:// when BACKEND_CA_PATH or BACKEND_CLIENT_CERT_PATH is set, got %q", c.BackendURL)
	}
}
