// Package backendtls is the trust between probe nodes and the record
// backend: the TLS configuration a node uses towards the backend (its
// client certificate, BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH, and
// the CAs it trusts, BACKEND_CA_PATH), built in one place so that every
// client the node points at the backend — the record shipper, a JWKS_URL or
// REVOCATION_URL on the backend — presents and verifies the same thing; and
// the node identity a collector reads from a node certificate.
package backendtls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/tlsfiles"
)

// NodeURIPrefix starts the URI SAN that names a probe node in its client
// certificate: urn:pinaka:node:<PROBE_NODE_NAME>.
//
// A URI SAN rather than a DNS SAN or the subject CN: a DNS SAN says which
// host a certificate may serve, so a certificate naming a node that way
// could be taken for that host's server certificate (and vice versa), and
// the CN is a free-form field that verifiers stopped trusting long ago. A
// URN in our own namespace cannot be mistaken for anything else, and a CA
// that also issues other client certificates (item 4's user certificates)
// cannot issue a node identity by accident.
const NodeURIPrefix = "urn:pinaka:node:"

// MaxNodeNameLen bounds a node name taken from a certificate: a DNS name's
// length, since PROBE_NODE_NAME defaults to the host name.
const MaxNodeNameLen = 253

// ValidNodeName reports whether name can be a node identity: 1 to
// MaxNodeNameLen bytes of ASCII letters, digits, '.', '-' and '_' (what
// host names and PROBE_NODE_NAME values use). The bound keeps what a
// certificate claims out of logs and answers as arbitrary text.
func ValidNodeName(name string) bool {
	if name == "" || len(name) > MaxNodeNameLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == '_':
		default:
			return false
		}
	}
	return true
}

// ErrNoNodeIdentity means a certificate carries no urn:pinaka:node: URI SAN.
var ErrNoNodeIdentity = errors.New("certificate has no " + NodeURIPrefix + "<name> URI SAN")

// NodeIdentity is the node name a certificate carries: the <name> of its one
// urn:pinaka:node:<name> URI SAN. None, more than one, or a name outside
// ValidNodeName is an error: a certificate must name exactly one node.
func NodeIdentity(c *x509.Certificate) (string, error) {
	name := ""
	for _, u := range c.URIs {
		s := u.String()
		if len(s) < len(NodeURIPrefix) || !strings.EqualFold(s[:len(NodeURIPrefix)], NodeURIPrefix) {
			continue
		}
		if name != "" {
			return "", errors.New("certificate has more than one " + NodeURIPrefix + " URI SAN")
		}
		n := s[len(NodeURIPrefix):]
		if !ValidNodeName(n) {
			return "", fmt.Errorf("certificate's node name is not 1 to %d characters of letters, digits, '.', '-' and '_'", MaxNodeNameLen)
		}
		name = n
	}
	if name == "" {
		return "", ErrNoNodeIdentity
	}
	return name, nil
}

// Options say where the node's backend TLS material is. Paths are the
// variables' values; "" means not set.
type Options struct {
	CAPath   string // BACKEND_CA_PATH: PEM bundle; "" = the system roots
	CertPath string // BACKEND_CLIENT_CERT_PATH
	KeyPath  string // BACKEND_CLIENT_KEY_PATH
	// Node is PROBE_NODE_NAME. A client certificate that names a node
	// (urn:pinaka:node:) must name this one, at start and on reload: a
	// collector would refuse every batch of a node whose certificate and
	// name disagree.
	Node string
}

// Client is the node's TLS towards the backend. Reload (SIGHUP) re-reads the
// client certificate and the CA bundle; a bad file is refused and the one in
// use kept. Idle connections are closed on reload, so the next request
// shakes hands with what was reloaded; one in flight ends on its own.
type Client struct {
	cert *tlsfiles.KeyPair // nil: no client certificate
	cas  *tlsfiles.CAs     // nil: system roots

	// transports are those HTTPClient made (a few, at start): Reload
	// closes their idle connections, so that the next request makes a new
	// handshake with what was reloaded instead of reusing a connection
	// made with the old certificate.
	mu         sync.Mutex
	transports []*http.Transport
}

// New loads the files named in o. Errors name the variable. With none of
// the three set it returns nil, nil: the node uses Go's defaults.
func New(o Options) (*Client, error) {
	if o.CAPath == "" && o.CertPath == "" && o.KeyPath == "" {
		return nil, nil
	}
	var errs []error
	if (o.CertPath == "") != (o.KeyPath == "") {
		set, unset := "BACKEND_CLIENT_CERT_PATH", "BACKEND_CLIENT_KEY_PATH"
		if o.CertPath == "" {
			set, unset = unset, set
		}
		errs = append(errs, fmt.Errorf("%s is set but %s is not: a client certificate needs both", set, unset))
	}
	c := &Client{}
	if o.CertPath != "" && o.KeyPath != "" {
		kp, err := tlsfiles.NewKeyPair(o.CertPath, o.KeyPath, nodeCheck(o.Node))
		if err != nil {
			errs = append(errs, fmt.Errorf("BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH: %w", err))
		}
		c.cert = kp
	}
	if o.CAPath != "" {
		cas, err := tlsfiles.NewCAs(o.CAPath)
		if err != nil {
			errs = append(errs, fmt.Errorf("BACKEND_CA_PATH: %w", err))
		}
		c.cas = cas
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// nodeCheck refuses a client certificate that names another node. One that
// names no node is accepted: the backend may not be a Pinaka collector.
func nodeCheck(node string) func(*tls.Certificate) error {
	return func(c *tls.Certificate) error {
		if ExtKeyUsageMissing(c.Leaf, x509.ExtKeyUsageClientAuth) {
			return errors.New("certificate is not for client authentication (its extended key usage lacks clientAuth)")
		}
		name, err := NodeIdentity(c.Leaf)
		if errors.Is(err, ErrNoNodeIdentity) || node == "" {
			return nil
		}
		if err != nil {
			return err
		}
		if name != node {
			return fmt.Errorf("certificate names node %q but PROBE_NODE_NAME is %q: the collector would refuse every batch", name, node)
		}
		return nil
	}
}

// ExtKeyUsageMissing reports whether c restricts its extended key usages
// and want is not among them (no extension at all allows every usage, as
// Go's verifier treats it).
func ExtKeyUsageMissing(c *x509.Certificate, want x509.ExtKeyUsage) bool {
	if len(c.ExtKeyUsage) == 0 && len(c.UnknownExtKeyUsage) == 0 {
		return false
	}
	for _, u := range c.ExtKeyUsage {
		if u == want || u == x509.ExtKeyUsageAny {
			return false
		}
	}
	return true
}

// Reload re-reads the client certificate and the CA bundle, each on its
// own: a bad certificate does not keep a good bundle from loading.
func (c *Client) Reload() error {
	if c == nil {
		return nil
	}
	var errs []error
	if c.cert != nil {
		if err := c.cert.Reload(); err != nil {
			errs = append(errs, fmt.Errorf("BACKEND_CLIENT_CERT_PATH/BACKEND_CLIENT_KEY_PATH: %w", err))
		}
	}
	if c.cas != nil {
		if err := c.cas.Reload(); err != nil {
			errs = append(errs, fmt.Errorf("BACKEND_CA_PATH: %w", err))
		}
	}
	c.mu.Lock()
	for _, t := range c.transports {
		t.CloseIdleConnections()
	}
	c.mu.Unlock()
	return errors.Join(errs...)
}

// Leaf is the client certificate in use, nil without one.
func (c *Client) Leaf() *x509.Certificate {
	if c == nil || c.cert == nil {
		return nil
	}
	return c.cert.Leaf()
}

// CAs is how many certificates BACKEND_CA_PATH holds, 0 for the system roots.
func (c *Client) CAs() int {
	if c == nil || c.cas == nil {
		return 0
	}
	return c.cas.Len()
}

// TLSConfig is the configuration for connections to rawURL's host. Give
// each backend URL its own (they are cheap): with BACKEND_CA_PATH the
// certificate is verified against the host name here, because verifying
// against the bundle in use at each handshake — so that a SIGHUP can add a
// CA — means verifying in VerifyConnection, which is not told the name
// dialed when it is an IP address. The client certificate, if any, is the
// one in use at each handshake. A nil Client gives Go's defaults.
func (c *Client) TLSConfig(rawURL string) (*tls.Config, error) {
	u, err := url.Parse(rawURL)
	if err != nil || u.Hostname() == "" {
		return nil, fmt.Errorf("backend TLS for %q: not a URL with a host", rawURL)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c == nil {
		return cfg, nil
	}
	if c.cert != nil {
		cfg.GetClientCertificate = c.cert.GetClientCertificate
	}
	if c.cas != nil {
		host := u.Hostname()
		cfg.ServerName = host
		// Verification is not skipped: VerifyConnection below does
		// what crypto/tls would (chain to a root in the bundle, the
		// host name or IP, serverAuth usage, validity), with the
		// bundle loaded now rather than when the config was made. It
		// runs on every handshake, resumed ones too.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			return verifyServer(cs, host, c.cas.Pool())
		}
	}
	return cfg, nil
}

func verifyServer(cs tls.ConnectionState, host string, roots *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("backend presented no certificate")
	}
	opts := x509.VerifyOptions{
		DNSName:       host,
		Roots:         roots,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, ic := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(ic)
	}
	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return &tls.CertificateVerificationError{UnverifiedCertificates: cs.PeerCertificates, Err: fmt.Errorf("backend certificate not trusted by BACKEND_CA_PATH: %w", err)}
	}
	return nil
}

// HTTPClient is an HTTP client for rawURL's host using TLSConfig: Go's
// default transport settings (proxy from the environment, keep-alives,
// HTTP/2), timeout per request (0 = none; the shipper bounds its attempts
// with a context instead), and redirects not followed — a backend that
// redirects is misconfigured, and following would re-send credentials and
// fail verification against the pinned host name anyway. A nil Client
// gives the same client with Go's TLS defaults.
func (c *Client) HTTPClient(rawURL string, timeout time.Duration) (*http.Client, error) {
	cfg, err := c.TLSConfig(rawURL)
	if err != nil {
		return nil, err
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = cfg
	c.mu.Lock()
	c.transports = append(c.transports, t)
	c.mu.Unlock()
	return &http.Client{
		Transport:     t,
		Timeout:       timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}
