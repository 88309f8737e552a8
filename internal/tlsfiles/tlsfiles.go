// Package tlsfiles reads TLS material from PEM files and keeps it
// reloadable: a certificate and its key, and a bundle of CA certificates.
// The proxy's serving certificate, the node's client certificate towards the
// backend and the collector's certificate and client CA all go through it,
// so a file is checked the same way wherever it is used, and a reload that
// finds a bad file keeps what was in use.
package tlsfiles

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"
)

// MaxFileBytes bounds every file read here. A certificate chain or a CA
// bundle is a few KiB (the whole Mozilla bundle is about 220 KiB); a larger
// file is a wrong path, not a certificate.
const MaxFileBytes = 4 << 20

// readFile reads path, refusing files larger than MaxFileBytes.
func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if len(b) > MaxFileBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, MaxFileBytes)
	}
	return b, nil
}

// LoadKeyPair reads a PEM certificate chain and its private key. A pair that
// does not load, does not match, or whose leaf has expired is refused.
func LoadKeyPair(certPath, keyPath string) (*tls.Certificate, error) {
	certPEM, err := readFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("loading certificate %s: %w", certPath, err)
	}
	keyPEM, err := readFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("loading key %s: %w", keyPath, err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("loading certificate %s and key %s: %w", certPath, keyPath, err)
	}
	if c.Leaf == nil {
		return nil, errors.New("certificate has no leaf")
	}
	if now := time.Now(); now.After(c.Leaf.NotAfter) {
		return nil, fmt.Errorf("certificate %s expired on %s", certPath, c.Leaf.NotAfter.Format(time.RFC3339))
	}
	return &c, nil
}

// KeyPair is a certificate and key read from files. Reload swaps them
// atomically: new handshakes get the new pair, open connections keep theirs.
type KeyPair struct {
	certPath, keyPath string
	check             func(*tls.Certificate) error
	cert              atomic.Pointer[tls.Certificate]
}

// NewKeyPair reads the pair at certPath and keyPath. check, if not nil, is
// one more condition a pair must meet, at start and on every reload (the
// node's identity in a client certificate, for one).
func NewKeyPair(certPath, keyPath string, check func(*tls.Certificate) error) (*KeyPair, error) {
	p := &KeyPair{certPath: certPath, keyPath: keyPath, check: check}
	if err := p.Reload(); err != nil {
		return nil, err
	}
	return p, nil
}

// Reload re-reads the pair. A pair that does not load or fails the check is
// refused and the current one kept.
func (p *KeyPair) Reload() error {
	c, err := LoadKeyPair(p.certPath, p.keyPath)
	if err != nil {
		return err
	}
	if p.check != nil {
		if err := p.check(c); err != nil {
			return fmt.Errorf("certificate %s: %w", p.certPath, err)
		}
	}
	p.cert.Store(c)
	return nil
}

// Current is the pair in use.
func (p *KeyPair) Current() *tls.Certificate { return p.cert.Load() }

// Leaf is the current certificate's leaf, for logs.
func (p *KeyPair) Leaf() *x509.Certificate { return p.cert.Load().Leaf }

// GetCertificate is tls.Config.GetCertificate for a server.
func (p *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return p.cert.Load(), nil
}

// GetClientCertificate is tls.Config.GetClientCertificate for a client. The
// pair is presented whatever CAs the server names: a server that trusts
// another CA refuses the handshake, which is the clearer error.
func (p *KeyPair) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return p.cert.Load(), nil
}

// LoadCAs reads a PEM bundle of CA certificates. Every PEM block must be a
// CERTIFICATE that parses, and there must be at least one: a bundle that
// silently trusts less than the operator wrote is worse than no start.
func LoadCAs(path string) (*x509.CertPool, int, error) {
	b, err := readFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("loading CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := b; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			// Text between and around blocks (the comments some
			// bundles carry) is skipped; a block cut short is not.
			if bytes.Contains(rest, []byte("-----BEGIN")) {
				return nil, 0, fmt.Errorf("CA bundle %s: PEM block after certificate %d is malformed or cut short", path, n)
			}
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, 0, fmt.Errorf("CA bundle %s: block %d is %q, want CERTIFICATE", path, n+1, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, 0, fmt.Errorf("CA bundle %s: certificate %d: %w", path, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, 0, fmt.Errorf("CA bundle %s holds no PEM certificate", path)
	}
	return pool, n, nil
}

// CAs is a CA bundle read from a file, swapped atomically by Reload.
type CAs struct {
	path string
	pool atomic.Pointer[x509.CertPool]
	n    atomic.Int64
}

// NewCAs reads the bundle at path.
func NewCAs(path string) (*CAs, error) {
	c := &CAs{path: path}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload re-reads the bundle; a bad one is refused and the current kept.
func (c *CAs) Reload() error {
	pool, n, err := LoadCAs(c.path)
	if err != nil {
		return err
	}
	c.pool.Store(pool)
	c.n.Store(int64(n))
	return nil
}

// Pool is the bundle in use.
func (c *CAs) Pool() *x509.CertPool { return c.pool.Load() }

// Len is how many certificates the bundle in use holds.
func (c *CAs) Len() int { return int(c.n.Load()) }

// Path is the bundle's file.
func (c *CAs) Path() string { return c.path }
