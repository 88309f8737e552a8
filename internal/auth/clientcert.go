package auth

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"
)

// Client certificates as credentials (CLIENT_CA_PATH, CLIENT_CERT_MODE,
// CLIENT_CRL_PATH). A certificate that a configured CA issued for client
// authentication stands for an Identity, read from its URI SANs:
//
//	urn:pinaka:token:<token_id>    exactly one (required)
//	urn:pinaka:user:<user_id>      at most one; without it the subject CN
//	urn:pinaka:region:<region>     any number; "*" is every region, none is no region
//
// The values are percent-decoded and obey CheckID. The token_id is the
// key of the rate limit, the tunnel caps and revocation, shared with
// tokens: a certificate and a token with the same token_id are one
// credential to those. URNs in the pinaka namespace with another kind are
// refused rather than ignored, as a JWS crit header is: an issuer may mean
// a restriction this proxy does not know.

// TokenTypeCertificate is the token_type of an identity from a client
// certificate.
const TokenTypeCertificate = "certificate"

// maxCertURIs bounds the URI SANs of one client certificate: region
// lists are short, and a certificate with hundreds of SANs is a mistake
// or an attempt to make every request slow.
const maxCertURIs = 32

// The URI SAN prefixes of the mapping (after "urn:pinaka:").
const (
	sanToken  = "token"
	sanUser   = "user"
	sanRegion = "region"
)

// ErrCertificate marks a refusal of a verified client certificate whose
// SANs do not make an identity.
var ErrCertificate = errors.New("client certificate does not name an identity")

// IdentityFromCertificate maps a verified client certificate to the
// Identity it stands for (the mapping is described at the top of this file).
// It does not verify the certificate: callers pass a leaf of a verified
// chain. Errors wrap ErrCertificate and name the SAN and the rule, never
// a value.
func IdentityFromCertificate(c *x509.Certificate) (*Identity, error) {
	if len(c.URIs) > maxCertURIs {
		return nil, certRefusal("more than %d URI SANs", maxCertURIs)
	}
	id := &Identity{TokenType: TokenTypeCertificate, Expires: c.NotAfter}
	var haveUser bool
	for _, u := range c.URIs {
		kind, v, ok, err := pinakaURN(u)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue // another namespace: SPIFFE IDs, e-mail URIs, ...
		}
		switch kind {
		case sanToken:
			if id.TokenID != "" {
				return nil, certRefusal("more than one urn:pinaka:token SAN")
			}
			id.TokenID = v
		case sanUser:
			if haveUser {
				return nil, certRefusal("more than one urn:pinaka:user SAN")
			}
			id.UserID, haveUser = v, true
		case sanRegion:
			id.Regions = append(id.Regions, v)
		default:
			return nil, certRefusal("unknown urn:pinaka kind (token, user and region are known)")
		}
	}
	if id.TokenID == "" {
		return nil, certRefusal("no urn:pinaka:token:<token_id> URI SAN")
	}
	if !haveUser {
		if err := CheckID("user_id", c.Subject.CommonName); err != nil {
			return nil, certRefusal("subject CN cannot be the user_id (%v); add a urn:pinaka:user SAN", err)
		}
		id.UserID = c.Subject.CommonName
	}
	return id, nil
}

// pinakaURN splits a URI SAN of the form urn:pinaka:<kind>:<value>. ok is
// false for a URI of any other namespace. The URN scheme and namespace
// are matched without regard to case (RFC 8141 §3.1), the kind too.
func pinakaURN(u *url.URL) (kind, value string, ok bool, err error) {
	if !strings.EqualFold(u.Scheme, "urn") {
		return "", "", false, nil
	}
	nid, rest, _ := strings.Cut(u.Opaque, ":")
	if !strings.EqualFold(nid, "pinaka") {
		return "", "", false, nil
	}
	kind, raw, found := strings.Cut(rest, ":")
	kind = strings.ToLower(kind)
	if !found || raw == "" {
		return "", "", true, certRefusal("urn:pinaka SAN without a value")
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return "", "", true, certRefusal("urn:pinaka SAN with a query or fragment")
	}
	claim := map[string]string{sanToken: "token_id", sanUser: "user_id", sanRegion: "region"}[kind]
	if claim == "" {
		return kind, "", true, nil // the caller refuses it without quoting it
	}
	value, err = url.PathUnescape(raw)
	if err != nil {
		return "", "", true, certRefusal("urn:pinaka:%s SAN is not valid percent-encoding", kind)
	}
	if err := CheckID(claim, value); err != nil {
		return "", "", true, certRefusal("urn:pinaka:%s SAN: %v", kind, err)
	}
	return kind, value, true, nil
}

func certRefusal(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCertificate, fmt.Sprintf(format, args...))
}

// SetClientTrust installs the trust client certificates are checked
// against on every request (nil: certificates are not credentials here).
// A SIGHUP that revokes a serial or removes a CA thus refuses the next
// request on a connection already open, not only new handshakes.
func (v *Verifier) SetClientTrust(t *ClientTrust) { v.clientTrust.Store(t) }

// AuthenticateTLS is Authenticate for a connection's client certificate:
// the leaf of the chains crypto/tls verified (PeerCertificates alone is
// only what the client claimed), checked against the current trust, and
// the Identity it maps to with this node's region check. ErrMissing: no
// verified certificate. On ErrRegion the Identity is returned, as for
// tokens.
func (v *Verifier) AuthenticateTLS(cs *tls.ConnectionState) (*Identity, error) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return nil, ErrMissing
	}
	t := v.clientTrust.Load()
	if t == nil {
		return nil, fmt.Errorf("%w: client certificates are not accepted here", ErrInvalid)
	}
	if _, err := t.checkChains(cs.VerifiedChains); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	id, err := IdentityFromCertificate(cs.VerifiedChains[0][0])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if !regionAllowed(id.Regions, v.region) {
		return id, ErrRegion
	}
	return id, nil
}

// Bounds of the files: a CA bundle is a handful of certificates; a CRL of
// a million entries is about 40 MB.
const (
	maxCABundleBytes = 4 << 20
	maxCRLBytes      = 64 << 20
)

// ClientTrust verifies client certificates: the CAs of CLIENT_CA_PATH and
// the serials their CRLs (CLIENT_CRL_PATH) revoke. It does not change; a
// reload builds another.
type ClientTrust struct {
	pool  *x509.CertPool
	cas   []*x509.Certificate
	caSet map[string]struct{} // the CAs' DER
	// revoked maps an issuing CA (its DER) to the serials it revoked
	// (hexadecimal).
	revoked    map[string]map[string]struct{}
	crls       int
	entries    int
	nextUpdate time.Time // the earliest NextUpdate of the CRLs; zero: none
}

// LoadClientCAs reads a PEM bundle of CA certificates. Every block must be
// a CERTIFICATE of a CA: a key or a leaf in the bundle is an error, not
// skipped, since an operator who put it there meant something by it.
func LoadClientCAs(path string) ([]*x509.Certificate, error) {
	data, err := readBounded(path, maxCABundleBytes)
	if err != nil {
		return nil, err
	}
	var cas []*x509.Certificate
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		n := len(cas) + 1
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%s: PEM block %d is a %q, not a CERTIFICATE", path, n, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", path, n, err)
		}
		if !c.BasicConstraintsValid || !c.IsCA {
			return nil, fmt.Errorf("%s: certificate %d (%s) is not a CA certificate", path, n, c.Subject)
		}
		cas = append(cas, c)
	}
	if len(cas) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificates found", path)
	}
	return cas, nil
}

// LoadCRLs reads one or more CRLs (PEM "X509 CRL" blocks, or one DER CRL)
// and checks that a CA of cas signed each.
func LoadCRLs(path string, cas []*x509.Certificate) ([]*CRL, error) {
	data, err := readBounded(path, maxCRLBytes)
	if err != nil {
		return nil, err
	}
	var ders [][]byte
	if trimmed := bytes.TrimSpace(data); bytes.HasPrefix(trimmed, []byte("-----BEGIN")) {
		for rest := trimmed; ; {
			var b *pem.Block
			b, rest = pem.Decode(rest)
			if b == nil {
				break
			}
			if b.Type != "X509 CRL" {
				return nil, fmt.Errorf("%s: PEM block %d is a %q, not an X509 CRL", path, len(ders)+1, b.Type)
			}
			ders = append(ders, b.Bytes)
		}
	} else if len(trimmed) > 0 {
		ders = append(ders, data)
	}
	if len(ders) == 0 {
		return nil, fmt.Errorf("%s: no CRL found", path)
	}
	var out []*CRL
	for i, der := range ders {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			return nil, fmt.Errorf("%s: CRL %d: %w", path, i+1, err)
		}
		var issuer *x509.Certificate
		var sigErr error
		for _, ca := range cas {
			if !bytes.Equal(ca.RawSubject, rl.RawIssuer) {
				continue
			}
			if sigErr = rl.CheckSignatureFrom(ca); sigErr == nil {
				issuer = ca
				break
			}
		}
		if issuer == nil {
			why := "no CA of CLIENT_CA_PATH has its issuer name"
			if sigErr != nil {
				why = "its signature does not verify with the CA of its issuer name: " + sigErr.Error()
			}
			return nil, fmt.Errorf("%s: CRL %d (issuer %s): %s", path, i+1, rl.Issuer, why)
		}
		out = append(out, &CRL{List: rl, Issuer: issuer})
	}
	return out, nil
}

// CRL is a revocation list and the configured CA that signed it.
type CRL struct {
	List   *x509.RevocationList
	Issuer *x509.Certificate
}

func readBounded(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(f, limit+1)); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if int64(buf.Len()) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, limit)
	}
	return buf.Bytes(), nil
}

// NewClientTrust builds the trust of cas and crls (crls may be empty).
func NewClientTrust(cas []*x509.Certificate, crls []*CRL) *ClientTrust {
	t := &ClientTrust{pool: x509.NewCertPool(), cas: cas, caSet: map[string]struct{}{},
		revoked: map[string]map[string]struct{}{}, crls: len(crls)}
	for _, ca := range cas {
		t.pool.AddCert(ca)
		t.caSet[string(ca.Raw)] = struct{}{}
	}
	for _, c := range crls {
		key := string(c.Issuer.Raw)
		set := t.revoked[key]
		if set == nil {
			set = map[string]struct{}{}
			t.revoked[key] = set
		}
		for _, e := range c.List.RevokedCertificateEntries {
			if e.SerialNumber != nil {
				set[e.SerialNumber.Text(16)] = struct{}{}
			}
		}
		if nu := c.List.NextUpdate; !nu.IsZero() && (t.nextUpdate.IsZero() || nu.Before(t.nextUpdate)) {
			t.nextUpdate = nu
		}
	}
	for _, set := range t.revoked {
		t.entries += len(set)
	}
	return t
}

// Pool is the CA pool for tls.Config.ClientCAs.
func (t *ClientTrust) Pool() *x509.CertPool { return t.pool }

// CAs is the number of CA certificates.
func (t *ClientTrust) CAs() int { return len(t.cas) }

// CRLs is the number of CRLs and of distinct revoked serials in them.
func (t *ClientTrust) CRLs() (lists, entries int) { return t.crls, t.entries }

// NextUpdate is the earliest NextUpdate of the CRLs (zero without CRLs or
// without the field). A CRL past it is still enforced: the serials it
// lists stay revoked, and the metric says it is stale.
func (t *ClientTrust) NextUpdate() time.Time { return t.nextUpdate }

// Results of a client certificate check, the values of the metric's
// label: a fixed set.
const (
	CertOK          = "ok"
	CertNone        = "no_cert"
	CertUnknownCA   = "unknown_ca"
	CertExpired     = "expired"
	CertBadUsage    = "bad_usage" // not for client authentication (ExtKeyUsage)
	CertRevoked     = "revoked"
	CertBadIdentity = "bad_identity"
	CertInvalid     = "invalid" // any other verification failure
)

// CertResults lists every result, for metrics.
var CertResults = []string{CertOK, CertNone, CertUnknownCA, CertExpired, CertBadUsage, CertRevoked, CertBadIdentity, CertInvalid}

// CheckVerified checks the chains crypto/tls verified (a cross-signed CA
// can give several) against this trust: each ends at one of its CAs, no
// certificate of them but the root is revoked by its issuer's CRL, and
// the leaf names an identity. It returns the result and, if not CertOK,
// why.
func (t *ClientTrust) CheckVerified(chains [][]*x509.Certificate) (string, error) {
	if result, err := t.checkChains(chains); err != nil {
		return result, err
	}
	if _, err := IdentityFromCertificate(chains[0][0]); err != nil {
		return CertBadIdentity, err
	}
	return CertOK, nil
}

func (t *ClientTrust) checkChains(chains [][]*x509.Certificate) (string, error) {
	if len(chains) == 0 || len(chains[0]) == 0 {
		return CertInvalid, errors.New("client certificate was not verified")
	}
	for _, chain := range chains {
		if _, ok := t.caSet[string(chain[len(chain)-1].Raw)]; !ok {
			return CertUnknownCA, errors.New("client certificate's CA is no longer in CLIENT_CA_PATH")
		}
		for i := 0; i+1 < len(chain); i++ {
			set := t.revoked[string(chain[i+1].Raw)]
			if _, ok := set[chain[i].SerialNumber.Text(16)]; ok {
				return CertRevoked, fmt.Errorf("client certificate serial %s is revoked by the CRL of %s",
					chain[i].SerialNumber.Text(16), chain[i+1].Subject)
			}
		}
	}
	return CertOK, nil
}

// ClassifyFailure names the result of a client certificate crypto/tls
// refused (err wraps a *tls.CertificateVerificationError), or "" if err is
// no such refusal. Go reports a certificate outside its validity period
// before it looks for the issuer, so "expired" is said only of a
// certificate one of the CAs signed: anyone can make an expired
// certificate, and only ours say something about our clients.
func (t *ClientTrust) ClassifyFailure(err error) string {
	ve, ok := errors.AsType[*tls.CertificateVerificationError](err)
	if !ok {
		return ""
	}
	if ie, ok := errors.AsType[x509.CertificateInvalidError](ve.Err); ok {
		switch ie.Reason {
		case x509.Expired:
			if t.issuedByUs(ve.UnverifiedCertificates) {
				return CertExpired
			}
			return CertUnknownCA
		case x509.IncompatibleUsage:
			return CertBadUsage
		}
		return CertInvalid
	}
	if _, ok := errors.AsType[x509.UnknownAuthorityError](ve.Err); ok {
		return CertUnknownCA
	}
	return CertInvalid
}

// maxClientChain bounds the certificates a refused chain is re-verified
// with.
const maxClientChain = 8

// issuedByUs says whether the leaf of certs was signed by one of the
// CAs, directly or through the chain the client sent, whatever the time.
func (t *ClientTrust) issuedByUs(certs []*x509.Certificate) bool {
	if len(certs) == 0 {
		return false
	}
	leaf := certs[0]
	for _, ca := range t.cas {
		if bytes.Equal(leaf.RawIssuer, ca.RawSubject) && leaf.CheckSignatureFrom(ca) == nil {
			return true
		}
	}
	return t.verifiesAt(certs, leaf.NotAfter)
}

func (t *ClientTrust) verifiesAt(certs []*x509.Certificate, at time.Time) bool {
	if len(certs) > maxClientChain {
		return false
	}
	opts := x509.VerifyOptions{
		Roots: t.pool, Intermediates: x509.NewCertPool(), CurrentTime: at,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := certs[0].Verify(opts)
	return err == nil
}
