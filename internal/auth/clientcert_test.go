package auth

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

// The mapping, through real certificates: issued with crypto/x509,
// parsed back as a TLS server would see them.
func TestIdentityFromCertificate(t *testing.T) {
	ca := testpki.NewCA(t, "clients")
	leaf := ca.Issue(t, testpki.LeafOptions{CN: "Jane", URIs: []string{
		"spiffe://example.org/ignored", // another namespace: ignored
		"urn:pinaka:token:cert_7",
		"urn:pinaka:user:u%2042", // percent-decoded
		"URN:Pinaka:Region:us-east",
		"urn:pinaka:region:eu-west",
	}})
	id, err := IdentityFromCertificate(leaf.Cert)
	if err != nil {
		t.Fatal(err)
	}
	if id.TokenID != "cert_7" || id.UserID != "u 42" || id.TokenType != "certificate" ||
		!slices.Equal(id.Regions, []string{"us-east", "eu-west"}) || !id.Expires.Equal(leaf.Cert.NotAfter) {
		t.Fatalf("identity %+v", id)
	}

	// Without a user SAN the subject CN is the user_id; without region
	// SANs the certificate is allowed in no region, like a token
	// without allowed_regions.
	leaf = ca.Issue(t, testpki.LeafOptions{CN: "device-12", URIs: []string{"urn:pinaka:token:dev12"}})
	id, err = IdentityFromCertificate(leaf.Cert)
	if err != nil || id.UserID != "device-12" || id.TokenID != "dev12" || len(id.Regions) != 0 {
		t.Fatalf("identity %+v, %v", id, err)
	}
	v := NewVerifier(nil, "us-east", 0)
	v.SetClientTrust(NewClientTrust([]*x509.Certificate{ca.Cert}, nil))
	if _, err := v.AuthenticateTLS(verifiedState(leaf, ca)); !errors.Is(err, ErrRegion) {
		t.Fatalf("no region SAN: %v, want ErrRegion", err)
	}
	star := ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:t", "urn:pinaka:user:u", "urn:pinaka:region:*"}})
	if id, err := v.AuthenticateTLS(verifiedState(star, ca)); err != nil || id.TokenID != "t" {
		t.Fatalf("region *: %+v, %v", id, err)
	}
}

// Hostile or careless SANs are refused, each with a message that names
// the rule and quotes nothing from the certificate.
func TestIdentityFromCertificateRefusals(t *testing.T) {
	ca := testpki.NewCA(t, "clients")
	many := []string{"urn:pinaka:token:t"}
	for i := range 40 {
		many = append(many, fmt.Sprintf("urn:pinaka:region:r%d", i))
	}
	long := strings.Repeat("x", MaxIDLen+1)
	for _, c := range []struct {
		name string
		cn   string
		uris []string
		want string
	}{
		{"no SANs", "jane", nil, "no urn:pinaka:token"},
		{"only other namespaces", "jane", []string{"spiffe://td/w", "https://example.org/"}, "no urn:pinaka:token"},
		{"two token SANs", "jane", []string{"urn:pinaka:token:a", "urn:pinaka:token:b"}, "more than one urn:pinaka:token"},
		{"two user SANs", "", []string{"urn:pinaka:token:a", "urn:pinaka:user:a", "urn:pinaka:user:b"}, "more than one urn:pinaka:user"},
		{"too many SANs", "jane", many, "more than 32 URI SANs"},
		{"token id too long", "jane", []string{"urn:pinaka:token:" + long}, "longer than 50 bytes"},
		{"user id too long", "", []string{"urn:pinaka:token:a", "urn:pinaka:user:" + long}, "longer than 50 bytes"},
		{"region too long", "jane", []string{"urn:pinaka:token:a", "urn:pinaka:region:" + long}, "region is longer"},
		{"NUL in token id", "jane", []string{"urn:pinaka:token:a%00b"}, "control character"},
		{"newline in user id", "", []string{"urn:pinaka:token:a", "urn:pinaka:user:a%0Ab"}, "control character"},
		{"invalid UTF-8", "jane", []string{"urn:pinaka:token:%ff%fe"}, "not valid UTF-8"},
		{"bad percent-encoding", "jane", []string{"urn:pinaka:token:a%zz"}, "percent-encoding"},
		{"empty value", "jane", []string{"urn:pinaka:token:"}, "without a value"},
		{"no kind separator", "jane", []string{"urn:pinaka:token"}, "without a value"},
		{"unknown kind", "jane", []string{"urn:pinaka:token:a", "urn:pinaka:admin:yes"}, "unknown urn:pinaka kind"},
		{"query", "jane", []string{"urn:pinaka:token:a?x=1"}, "query or fragment"},
		{"fragment", "jane", []string{"urn:pinaka:token:a#f"}, "query or fragment"},
		{"CN unusable as user_id", long, []string{"urn:pinaka:token:a"}, "subject CN cannot be the user_id"},
	} {
		leaf := ca.Issue(t, testpki.LeafOptions{CN: c.cn, URIs: c.uris})
		id, err := IdentityFromCertificate(leaf.Cert)
		if err == nil {
			t.Errorf("%s: accepted as %+v", c.name, id)
			continue
		}
		if !errors.Is(err, ErrCertificate) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %q, want ErrCertificate saying %q", c.name, err, c.want)
		}
		if strings.Contains(err.Error(), "xxxxxxxx") {
			t.Errorf("%s: error quotes the value: %q", c.name, err)
		}
	}
}

// verifiedState is the ConnectionState crypto/tls gives after verifying
// leaf against ca.
func verifiedState(leaf *testpki.Leaf, ca *testpki.CA) *tls.ConnectionState {
	return &tls.ConnectionState{
		PeerCertificates: []*x509.Certificate{leaf.Cert},
		VerifiedChains:   [][]*x509.Certificate{{leaf.Cert, ca.Cert}},
	}
}

func TestAuthenticateTLS(t *testing.T) {
	ca := testpki.NewCA(t, "clients")
	leaf := ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:c1", "urn:pinaka:user:u1", "urn:pinaka:region:us-east"}})
	v := NewVerifier(nil, "us-east", 0)

	// Unverified certificates are no credentials; nor is anything
	// before a trust is installed.
	if _, err := v.AuthenticateTLS(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf.Cert}}); !errors.Is(err, ErrMissing) {
		t.Fatalf("peer certificate without verified chain: %v, want ErrMissing", err)
	}
	if _, err := v.AuthenticateTLS(nil); !errors.Is(err, ErrMissing) {
		t.Fatalf("no TLS: %v", err)
	}
	if _, err := v.AuthenticateTLS(verifiedState(leaf, ca)); !errors.Is(err, ErrInvalid) {
		t.Fatalf("no trust installed: %v, want ErrInvalid", err)
	}

	v.SetClientTrust(NewClientTrust([]*x509.Certificate{ca.Cert}, nil))
	id, err := v.AuthenticateTLS(verifiedState(leaf, ca))
	if err != nil || id.TokenID != "c1" || id.UserID != "u1" || id.TokenType != TokenTypeCertificate {
		t.Fatalf("%+v, %v", id, err)
	}

	// A reload that revokes the serial, or drops the CA, refuses the
	// next request of a connection verified before it.
	crl := &CRL{List: mustParseCRL(t, ca.CRL(t, time.Now().Add(time.Hour), leaf.Cert.SerialNumber)), Issuer: ca.Cert}
	v.SetClientTrust(NewClientTrust([]*x509.Certificate{ca.Cert}, []*CRL{crl}))
	if _, err := v.AuthenticateTLS(verifiedState(leaf, ca)); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked serial: %v", err)
	}
	other := testpki.NewCA(t, "other")
	v.SetClientTrust(NewClientTrust([]*x509.Certificate{other.Cert}, nil))
	if _, err := v.AuthenticateTLS(verifiedState(leaf, ca)); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "no longer in CLIENT_CA_PATH") {
		t.Fatalf("CA removed: %v", err)
	}
}

func mustParseCRL(t testing.TB, der []byte) *x509.RevocationList {
	t.Helper()
	rl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	return rl
}

func TestLoadClientCAsAndCRLs(t *testing.T) {
	dir := t.TempDir()
	ca1, ca2 := testpki.NewCA(t, "clients-1"), testpki.NewCA(t, "clients-2")
	bundle := testpki.Write(t, dir, "ca.pem", append(append([]byte("# our client CAs\n"), ca1.PEM...), ca2.PEM...))
	cas, err := LoadClientCAs(bundle)
	if err != nil || len(cas) != 2 {
		t.Fatalf("bundle: %d CAs, %v", len(cas), err)
	}

	leaf := ca1.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:x"}})
	for name, data := range map[string][]byte{
		"empty":    nil,
		"not PEM":  []byte("hello"),
		"a key":    leaf.KeyPEM,
		"a leaf":   leaf.CertPEM,
		"garbage":  []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
		"too big":  make([]byte, maxCABundleBytes+1),
		"key+CA":   append(append([]byte{}, ca1.PEM...), leaf.KeyPEM...),
		"leaf+CA ": append(append([]byte{}, ca1.PEM...), leaf.CertPEM...),
	} {
		if _, err := LoadClientCAs(testpki.Write(t, dir, "bad.pem", data)); err == nil {
			t.Errorf("CA bundle %s accepted", name)
		}
	}
	if _, err := LoadClientCAs(filepath.Join(dir, "missing.pem")); err == nil {
		t.Error("missing CA bundle accepted")
	}

	// PEM with one CRL per CA, and DER.
	s1, s2, s3 := testpki.Serial(t), testpki.Serial(t), testpki.Serial(t)
	soon := time.Now().Add(time.Hour).Truncate(time.Second)
	pemCRLs := append(ca1.CRLPEM(t, soon.Add(time.Hour), s1, s2), ca2.CRLPEM(t, soon, s2, s3)...)
	crls, err := LoadCRLs(testpki.Write(t, dir, "crl.pem", pemCRLs), cas)
	if err != nil || len(crls) != 2 {
		t.Fatalf("PEM CRLs: %d, %v", len(crls), err)
	}
	trust := NewClientTrust(cas, crls)
	if n, e := trust.CRLs(); n != 2 || e != 4 || trust.CAs() != 2 || !trust.NextUpdate().Equal(soon) {
		t.Fatalf("trust: %d CRLs, %d entries, %d CAs, next update %s (want %s)", n, e, trust.CAs(), trust.NextUpdate(), soon)
	}
	if crls, err := LoadCRLs(testpki.Write(t, dir, "crl.der", ca2.CRL(t, soon, s3)), cas); err != nil || len(crls) != 1 || crls[0].Issuer != cas[1] {
		t.Fatalf("DER CRL: %v", err)
	}

	// A CRL is refused unless a CA of the bundle signed it: another CA,
	// or a key that is not the CA's behind the same name.
	stranger := testpki.NewCA(t, "stranger")
	impostor := testpki.NewCA(t, "clients-1")
	for name, c := range map[string]struct {
		data []byte
		want string
	}{
		"other CA":     {stranger.CRLPEM(t, soon, s1), "no CA of CLIENT_CA_PATH has its issuer name"},
		"same name":    {impostor.CRLPEM(t, soon, s1), "signature does not verify"},
		"not a CRL":    {ca1.PEM, "not an X509 CRL"},
		"garbage DER":  {[]byte{0x30, 0x03, 0x01, 0x02, 0x03}, "CRL 1"},
		"empty":        {nil, "no CRL found"},
		"one bad of 2": {append(ca1.CRLPEM(t, soon, s1), stranger.CRLPEM(t, soon)...), "CRL 2"},
	} {
		_, err := LoadCRLs(testpki.Write(t, dir, "bad.crl", c.data), cas)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("CRL %s: %v, want an error saying %q", name, err, c.want)
		}
	}
}

// CheckVerified and ClassifyFailure on the outcomes of real chain
// verification, as crypto/tls runs it.
func TestClientTrustResults(t *testing.T) {
	ca, stranger := testpki.NewCA(t, "clients"), testpki.NewCA(t, "clients")
	ok := ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:a"}})
	revoked := ca.Issue(t, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:b"}})
	noIdentity := ca.Issue(t, testpki.LeafOptions{CN: "x"})
	crl := &CRL{List: mustParseCRL(t, ca.CRL(t, time.Now().Add(time.Hour), revoked.Cert.SerialNumber)), Issuer: ca.Cert}
	trust := NewClientTrust([]*x509.Certificate{ca.Cert}, []*CRL{crl})
	for _, c := range []struct {
		leaf *testpki.Leaf
		want string
	}{{ok, CertOK}, {revoked, CertRevoked}, {noIdentity, CertBadIdentity}} {
		if got, _ := trust.CheckVerified(verifiedState(c.leaf, ca).VerifiedChains); got != c.want {
			t.Errorf("CheckVerified = %s, want %s", got, c.want)
		}
	}
	if got, _ := trust.CheckVerified(verifiedState(ok, stranger).VerifiedChains); got != CertUnknownCA {
		t.Errorf("chain to a CA not in the trust: %s", got)
	}

	verify := func(l *testpki.Leaf) error {
		_, err := l.Cert.Verify(x509.VerifyOptions{Roots: trust.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		if err == nil {
			t.Fatal("verified")
		}
		return fmt.Errorf("tls: handshake: %w", &tls.CertificateVerificationError{UnverifiedCertificates: []*x509.Certificate{l.Cert}, Err: err})
	}
	past := time.Now().Add(-48 * time.Hour)
	for name, c := range map[string]struct {
		leaf *testpki.Leaf
		want string
	}{
		"other CA":                {stranger.Issue(t, testpki.LeafOptions{}), CertUnknownCA},
		"expired, ours":           {ca.Issue(t, testpki.LeafOptions{NotBefore: past, NotAfter: past.Add(time.Hour)}), CertExpired},
		"not yet valid, ours":     {ca.Issue(t, testpki.LeafOptions{NotBefore: time.Now().Add(time.Hour), NotAfter: time.Now().Add(2 * time.Hour)}), CertExpired},
		"expired, someone else's": {stranger.Issue(t, testpki.LeafOptions{NotBefore: past, NotAfter: past.Add(time.Hour)}), CertUnknownCA},
		"server certificate":      {ca.Issue(t, testpki.LeafOptions{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}), CertBadUsage},
	} {
		if got := trust.ClassifyFailure(verify(c.leaf)); got != c.want {
			t.Errorf("%s: ClassifyFailure = %q, want %q", name, got, c.want)
		}
	}
	if got := trust.ClassifyFailure(errors.New("tls: first record does not look like a TLS handshake")); got != "" {
		t.Errorf("unrelated handshake error classified as %q", got)
	}
}

// The per-request cost of a certificate credential: the CRL lookup and
// the mapping run on every request and HTTP/2 stream.
func BenchmarkAuthenticateTLS(b *testing.B) {
	ca := testpki.NewCA(b, "clients")
	leaf := ca.Issue(b, testpki.LeafOptions{URIs: []string{"urn:pinaka:token:c1", "urn:pinaka:user:u1", "urn:pinaka:region:us-east", "urn:pinaka:region:eu-west"}})
	var serials []*big.Int
	for range 10000 {
		serials = append(serials, testpki.Serial(b))
	}
	crl := &CRL{List: mustParseCRL(b, ca.CRL(b, time.Now().Add(time.Hour), serials...)), Issuer: ca.Cert}
	v := NewVerifier(nil, "us-east", 0)
	v.SetClientTrust(NewClientTrust([]*x509.Certificate{ca.Cert}, []*CRL{crl}))
	cs := verifiedState(leaf, ca)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.AuthenticateTLS(cs); err != nil {
			b.Fatal(err)
		}
	}
}
