package server

import (
	"crypto/tls"
	"crypto/x509"
	"sync/atomic"

	"github.com/pinaka-proxy/pinaka/internal/tlsfiles"
)

// CertStore holds the serving certificate. Reload swaps it atomically: new
// handshakes get the new pair, open connections keep theirs.
type CertStore struct {
	certPath, keyPath string
	cert              atomic.Pointer[tls.Certificate]
}

// LoadCertStore reads the PEM pair at certPath and keyPath.
func LoadCertStore(certPath, keyPath string) (*CertStore, error) {
	s := &CertStore{certPath: certPath, keyPath: keyPath}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// StaticCertStore serves a fixed certificate (dev mode); Reload is a no-op.
func StaticCertStore(c tls.Certificate) *CertStore {
	s := &CertStore{}
	s.cert.Store(&c)
	return s
}

// Reload re-reads the pair from disk. A pair that does not load, does not
// match, or has expired is refused and the current one kept.
func (s *CertStore) Reload() error {
	if s.certPath == "" {
		return nil
	}
	// The checks are tlsfiles', shared with the node's client certificate
	// and the collector's.
	c, err := tlsfiles.LoadKeyPair(s.certPath, s.keyPath)
	if err != nil {
		return err
	}
	s.cert.Store(c)
	return nil
}

// Leaf is the current certificate's leaf, for logs.
func (s *CertStore) Leaf() *x509.Certificate { return s.cert.Load().Leaf }

func (s *CertStore) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.cert.Load(), nil
}

// TLSConfig is the listener's TLS configuration: TLS 1.2 and 1.3, TLS 1.2
// limited to ECDHE AEAD suites, ALPN h2 then http/1.1. postQuantum keeps
// Go's default key exchanges, hybrid X25519MLKEM768 first, which protects
// the proxy leg (credentials, CONNECT targets, plain-HTTP content) from
// harvest-now-decrypt-later; without it only classical curves are offered,
// which makes each handshake roughly a third cheaper for the proxy.
func (s *CertStore) TLSConfig(postQuantum bool) *tls.Config {
	var curves []tls.CurveID
	if !postQuantum {
		curves = []tls.CurveID{tls.X25519, tls.CurveP256}
	}
	return &tls.Config{
		CurvePreferences: curves,
		MinVersion:       tls.VersionTLS12,
		GetCertificate:   s.getCertificate,
		NextProtos:       []string{"h2", "http/1.1"},
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
	}
}
