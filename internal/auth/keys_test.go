package auth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// testKeys are generated once per test binary: RSA generation is slow.
type testKeys struct {
	rsa, rsa2        *rsa.PrivateKey
	p256, p384, p521 *ecdsa.PrivateKey
	p256b            *ecdsa.PrivateKey
	ed, ed2          ed25519.PrivateKey
}

func genKeys(t *testing.T) *testKeys {
	t.Helper()
	must := func(k crypto.Signer, err error) crypto.Signer {
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	k := &testKeys{}
	k.rsa = must(rsa.GenerateKey(rand.Reader, 2048)).(*rsa.PrivateKey)
	k.rsa2 = must(rsa.GenerateKey(rand.Reader, 2048)).(*rsa.PrivateKey)
	k.p256 = must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)).(*ecdsa.PrivateKey)
	k.p256b = must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)).(*ecdsa.PrivateKey)
	k.p384 = must(ecdsa.GenerateKey(elliptic.P384(), rand.Reader)).(*ecdsa.PrivateKey)
	k.p521 = must(ecdsa.GenerateKey(elliptic.P521(), rand.Reader)).(*ecdsa.PrivateKey)
	_, k.ed, _ = ed25519.GenerateKey(rand.Reader)
	_, k.ed2, _ = ed25519.GenerateKey(rand.Reader)
	return k
}

// pemOf is the PKIX PEM of pub.
func pemOf(t testing.TB, pub crypto.PublicKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func kidOf(t testing.TB, pub crypto.PublicKey) string {
	t.Helper()
	kid, err := KeyID(pub)
	if err != nil {
		t.Fatal(err)
	}
	return kid
}

func keySet(t testing.TB, pubs ...crypto.PublicKey) *KeySet {
	t.Helper()
	var b []byte
	for _, p := range pubs {
		b = append(b, pemOf(t, p)...)
	}
	ks, err := ParseKeySet(b)
	if err != nil {
		t.Fatal(err)
	}
	return ks
}

func claims() jwt.MapClaims {
	return jwt.MapClaims{"user_id": "u", "token_id": "t", "allowed_regions": []string{"r"},
		"exp": time.Now().Add(time.Hour).Unix()}
}

// signH signs claims with extra header fields.
func signH(t testing.TB, alg string, key any, header map[string]any, c jwt.MapClaims) string {
	t.Helper()
	tok := jwt.NewWithClaims(jwt.GetSigningMethod(alg), c)
	for k, v := range header {
		tok.Header[k] = v
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestEveryAlgorithmWithItsOwnKeyOnly(t *testing.T) {
	k := genKeys(t)
	cases := []struct {
		alg          string
		key, another crypto.Signer
	}{
		{"RS256", k.rsa, k.rsa2}, {"RS384", k.rsa, k.rsa2}, {"RS512", k.rsa, k.rsa2},
		{"PS256", k.rsa, k.rsa2}, {"PS384", k.rsa, k.rsa2}, {"PS512", k.rsa, k.rsa2},
		{"ES256", k.p256, k.p256b}, {"ES384", k.p384, k.p256}, {"ES512", k.p521, k.p384},
		{"EdDSA", k.ed, k.ed2},
	}
	for _, c := range cases {
		t.Run(c.alg, func(t *testing.T) {
			v := NewVerifier(nil, "r", 0)
			v.SetKeys(keySet(t, c.key.Public()))
			kid := kidOf(t, c.key.Public())
			good := signH(t, c.alg, c.key, map[string]any{"kid": kid}, claims())
			if id, err := v.Verify(good); err != nil || id.TokenID != "t" {
				t.Fatalf("own key: %v", err)
			}
			// Without kid the key of the family is found too.
			if _, err := v.Verify(signH(t, c.alg, c.key, nil, claims())); err != nil {
				t.Fatalf("own key, no kid: %v", err)
			}
			// Another key, claiming our kid or none, is refused. (ES384
			// and ES512 are signed with a key of another curve, since
			// golang-jwt refuses to sign them otherwise.)
			otherAlg := c.alg
			if c.alg == "ES384" {
				otherAlg = "ES256"
			} else if c.alg == "ES512" {
				otherAlg = "ES384"
			}
			for _, h := range []map[string]any{{"kid": kid}, nil} {
				bad := signH(t, otherAlg, c.another, h, claims())
				if _, err := v.Verify(bad); !errors.Is(err, ErrInvalid) {
					t.Errorf("another key (header %v) verified: %v", h, err)
				}
			}
		})
	}
}

// Existing claim checks hold for public-key tokens too.
func TestAsymmetricTokensKeepTheClaimChecks(t *testing.T) {
	k := genKeys(t)
	v := NewVerifier(nil, "r", time.Second)
	v.SetKeys(keySet(t, k.p256.Public()))
	with := func(key string, val any) jwt.MapClaims { c := claims(); c[key] = val; return c }
	for name, tc := range map[string]struct {
		tok  string
		want error
	}{
		"expired":     {signH(t, "ES256", k.p256, nil, with("exp", time.Now().Add(-time.Hour).Unix())), ErrInvalid},
		"string exp":  {signH(t, "ES256", k.p256, nil, with("exp", "9999999999")), ErrInvalid},
		"nbf later":   {signH(t, "ES256", k.p256, nil, with("nbf", time.Now().Add(time.Hour).Unix())), ErrInvalid},
		"long id":     {signH(t, "ES256", k.p256, nil, with("token_id", strings.Repeat("x", MaxIDLen+1))), ErrInvalid},
		"crit":        {signH(t, "ES256", k.p256, map[string]any{"crit": []string{"b64"}, "b64": false}, claims()), ErrInvalid},
		"region":      {signH(t, "ES256", k.p256, nil, with("allowed_regions", []string{"elsewhere"})), ErrRegion},
		"kid integer": {signH(t, "ES256", k.p256, map[string]any{"kid": 7}, claims()), ErrInvalid},
	} {
		if _, err := v.Verify(tc.tok); !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", name, err, tc.want)
		}
	}
}

func TestAlgorithmConfusion(t *testing.T) {
	k := genKeys(t)
	rsaPEM := pemOf(t, k.rsa.Public())
	rsaKid := kidOf(t, k.rsa.Public())
	// Both sources configured: the attack needs an HMAC path to exist.
	v := NewVerifier(secret, "r", 0)
	v.SetKeys(keySet(t, k.rsa.Public(), k.p256.Public(), k.ed.Public()))

	refused := map[string]string{
		// The classic: the public key's PEM text as the HMAC secret.
		"HS256 keyed with the RSA public PEM": signH(t, "HS256", rsaPEM, nil, claims()),
		"HS256 keyed with the RSA public PEM, kid": signH(t, "HS256", rsaPEM,
			map[string]any{"kid": rsaKid}, claims()),
		"HS256 keyed with the RSA public DER": signH(t, "HS256",
			mustPKIX(t, k.rsa.Public()), map[string]any{"kid": rsaKid}, claims()),
		// kid names a key of another type.
		"ES256 with the RSA kid":   signH(t, "ES256", k.p256, map[string]any{"kid": rsaKid}, claims()),
		"RS256 with the EC kid":    signH(t, "RS256", k.rsa2, map[string]any{"kid": kidOf(t, k.p256.Public())}, claims()),
		"EdDSA with the RSA kid":   signH(t, "EdDSA", k.ed, map[string]any{"kid": rsaKid}, claims()),
		"ES384 with the P-256 kid": signH(t, "ES384", k.p384, map[string]any{"kid": kidOf(t, k.p256.Public())}, claims()),
		"unknown kid":              signH(t, "ES256", k.p256, map[string]any{"kid": "nope"}, claims()),
		"none":                     signH(t, "none", jwt.UnsafeAllowNoneSignatureType, nil, claims()),
	}
	// alg swapped: a valid RS256 token whose header claims another
	// algorithm, signature unchanged.
	good := signH(t, "RS256", k.rsa, map[string]any{"kid": rsaKid}, claims())
	for _, alg := range []string{"PS256", "RS384", "HS256", "ES256", "EdDSA", "none"} {
		refused["RS256 relabelled "+alg] = relabel(t, good, map[string]any{"alg": alg, "kid": rsaKid, "typ": "JWT"})
	}
	for name, tok := range refused {
		if _, err := v.Verify(tok); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: verified (%v)", name, err)
		}
	}
	if _, err := v.Verify(good); err != nil {
		t.Fatalf("the untouched token: %v", err)
	}

	// Without a secret no HS* token passes, whatever the key.
	v2 := NewVerifier(nil, "r", 0)
	v2.SetKeys(keySet(t, k.rsa.Public()))
	if _, err := v2.Verify(signH(t, "HS256", []byte{}, nil, claims())); !errors.Is(err, ErrInvalid) {
		t.Errorf("HS256 with an empty key verified without JWT_SECRET: %v", err)
	}
}

func mustPKIX(t *testing.T, pub crypto.PublicKey) []byte {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// relabel replaces a token's header, keeping its payload and signature.
func relabel(t *testing.T, tok string, header map[string]any) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(tok, ".")
	parts[0] = base64.RawURLEncoding.EncodeToString(h)
	return strings.Join(parts, ".")
}

// jku, x5u, x5c and jwk name or carry keys; none is ever fetched or used.
func TestKeyURLHeadersAreNeverFetched(t *testing.T) {
	k := genKeys(t)
	var fetches atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		jwks, _ := MarshalJWKS([]PublicKey{{ID: "attacker", Key: k.p256b.Public()}})
		w.Write(jwks)
	}))
	defer srv.Close()
	v := NewVerifier(nil, "r", 0)
	v.SetKeys(keySet(t, k.p256.Public()))

	attackerJWK, _ := jwkMembers(k.p256b.Public())
	for name, h := range map[string]map[string]any{
		"jku":             {"jku": srv.URL, "kid": "attacker"},
		"x5u":             {"x5u": srv.URL},
		"embedded jwk":    {"jwk": attackerJWK},
		"jku, no kid":     {"jku": srv.URL},
		"jku, our kid":    {"jku": srv.URL, "kid": kidOf(t, k.p256.Public())},
		"x5c of attacker": {"x5c": []string{"MIIB"}},
	} {
		if _, err := v.Verify(signH(t, "ES256", k.p256b, h, claims())); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: the attacker's key verified: %v", name, err)
		}
	}
	// A genuine token that carries a jku is judged by the configured key.
	if _, err := v.Verify(signH(t, "ES256", k.p256, map[string]any{"jku": srv.URL}, claims())); err != nil {
		t.Errorf("genuine token with a jku header: %v", err)
	}
	if n := fetches.Load(); n != 0 {
		t.Errorf("the key URL was fetched %d times", n)
	}
}

// SetKeys takes effect at once, cache included: a token verified with a
// key that is then removed is refused on its next use.
func TestSetKeysReplacesTheSetAndTheCache(t *testing.T) {
	k := genKeys(t)
	v := NewVerifier(nil, "r", 0)
	v.SetKeys(keySet(t, k.p256.Public()))
	old := signH(t, "ES256", k.p256, map[string]any{"kid": kidOf(t, k.p256.Public())}, claims())
	newer := signH(t, "EdDSA", k.ed, map[string]any{"kid": kidOf(t, k.ed.Public())}, claims())
	if _, err := v.Verify(old); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(newer); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unknown key verified: %v", err)
	}
	v.SetKeys(keySet(t, k.ed.Public()))
	if _, err := v.Verify(newer); err != nil {
		t.Errorf("new kid refused: %v", err)
	}
	if _, err := v.Verify(old); !errors.Is(err, ErrInvalid) {
		t.Errorf("removed kid still verifies: %v", err)
	}
}

func TestParseKeySetRefusesWhatItDoesNotUnderstand(t *testing.T) {
	k := genKeys(t)
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := x509.MarshalPKCS8PrivateKey(k.p256)
	p256 := pemOf(t, k.p256.Public())
	m, _ := jwkMembers(k.p256.Public())
	jwksWith := func(extra map[string]string) string {
		j := map[string]string{}
		for a, b := range m {
			j[a] = b
		}
		for a, b := range extra {
			if b == "" {
				delete(j, a)
			} else {
				j[a] = b
			}
		}
		out, _ := json.Marshal(map[string]any{"keys": []any{j}})
		return string(out)
	}
	for name, in := range map[string]string{
		"empty":              "",
		"garbage":            "hello",
		"trailing garbage":   string(p256) + "junk",
		"private key PEM":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: priv})),
		"bad DER":            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
		"small RSA":          string(pemOf(t, small.Public())),
		"duplicate key":      string(p256) + string(p256),
		"bad JSON":           `{"keys": [`,
		"no keys":            `{"keys": []}`,
		"private JWK":        jwksWith(map[string]string{"d": "AAAA"}),
		"oct JWK":            `{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}`,
		"unknown kty":        jwksWith(map[string]string{"kty": "XYZ"}),
		"wrong curve":        jwksWith(map[string]string{"crv": "P-384"}),
		"point not on curve": jwksWith(map[string]string{"y": m["x"]}),
		"alg of another key": jwksWith(map[string]string{"alg": "RS256"}),
		"short x":            jwksWith(map[string]string{"x": "AAAA"}),
	} {
		if _, err := ParseKeySet([]byte(in)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, maxKeySetBytes+1), 0o600)
	if _, err := LoadKeySet(big); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Errorf("oversized file: %v", err)
	}
}

// A JWKS written by MarshalJWKS reads back to the same keys and kids, an
// encryption key in the set is skipped, and a JWK without kid gets its
// thumbprint, as a PEM key does.
func TestJWKSRoundTripAndKids(t *testing.T) {
	k := genKeys(t)
	var in []PublicKey
	for _, s := range []crypto.Signer{k.rsa, k.p256, k.p384, k.p521, k.ed} {
		in = append(in, PublicKey{ID: "kid-" + kidOf(t, s.Public())[:6], Key: s.Public()})
	}
	in[0].Alg = "PS256"
	doc, err := MarshalJWKS(in)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string][]map[string]any
	json.Unmarshal(doc, &raw)
	raw["keys"] = append(raw["keys"], map[string]any{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"})
	delete(raw["keys"][1], "kid")
	doc, _ = json.Marshal(raw)
	ks, err := ParseKeySet(doc)
	if err != nil {
		t.Fatal(err)
	}
	if ks.Len() != len(in) {
		t.Fatalf("%d keys read back, want %d", ks.Len(), len(in))
	}
	for i, got := range ks.keys {
		want := in[i].ID
		if i == 1 {
			want = kidOf(t, in[1].Key)
		}
		if got.ID != want || !got.Key.(interface{ Equal(crypto.PublicKey) bool }).Equal(in[i].Key) {
			t.Errorf("key %d: kid %q want %q, or the key differs", i, got.ID, want)
		}
	}
	// The JWKS alg pins the key: PS256 only, not RS256.
	v := NewVerifier(nil, "r", 0)
	v.SetKeys(ks)
	kid := in[0].ID
	if _, err := v.Verify(signH(t, "PS256", k.rsa, map[string]any{"kid": kid}, claims())); err != nil {
		t.Errorf("PS256 with its pinned key: %v", err)
	}
	if _, err := v.Verify(signH(t, "RS256", k.rsa, map[string]any{"kid": kid}, claims())); !errors.Is(err, ErrInvalid) {
		t.Errorf("RS256 with a key pinned to PS256: %v", err)
	}
}

// RFC 8037 Appendix A.3: the thumbprint of its Ed25519 example key.
func TestKeyIDIsTheRFC7638Thumbprint(t *testing.T) {
	x, _ := base64.RawURLEncoding.DecodeString("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
	if got := kidOf(t, ed25519.PublicKey(x)); got != "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k" {
		t.Errorf("KeyID = %s", got)
	}
}

func TestPrivateKeyFormsAndMintWithKey(t *testing.T) {
	k := genKeys(t)
	pkcs8 := func(key any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	sec1, _ := x509.MarshalECPrivateKey(k.p384)
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{6, 5, 43, 129, 4, 0, 34}})
	for _, tc := range []struct {
		name, alg string
		pem       []byte
		pub       crypto.PublicKey
	}{
		{"PKCS#8 RSA", "RS256", pkcs8(k.rsa), k.rsa.Public()},
		{"PKCS#1 RSA", "RS256", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k.rsa)}), k.rsa.Public()},
		{"SEC 1 EC after EC PARAMETERS", "ES384", append(params, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})...), k.p384.Public()},
		{"PKCS#8 P-521", "ES512", pkcs8(k.p521), k.p521.Public()},
		{"PKCS#8 Ed25519", "EdDSA", pkcs8(k.ed), k.ed.Public()},
	} {
		signer, err := ParsePrivateKeyPEM(tc.pem)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if alg, _ := SigningAlgorithm(signer); alg != tc.alg {
			t.Errorf("%s: algorithm %s, want %s", tc.name, alg, tc.alg)
		}
		kid := kidOf(t, tc.pub)
		tok, err := MintWithKey(signer, kid, MintOptions{TokenID: "t", Regions: []string{"r"}, TTL: time.Minute})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		v := NewVerifier(nil, "r", 0)
		v.SetKeys(keySet(t, tc.pub))
		if _, err := v.Verify(tok); err != nil {
			t.Errorf("%s: minted token refused: %v", tc.name, err)
		}
	}
	if _, err := MintWithKey(k.rsa, "", MintOptions{TokenID: "t", TTL: time.Minute, Algorithm: "ES256"}); err == nil {
		t.Error("ES256 with an RSA key minted")
	}
	if _, err := MintWithKey(k.rsa, "", MintOptions{TokenID: "t", TTL: time.Minute, Algorithm: "HS256"}); err == nil {
		t.Error("HS256 with an RSA key minted")
	}
	if _, err := ParsePrivateKeyPEM(pemOf(t, k.rsa.Public())); err == nil {
		t.Error("a public key parsed as a private key")
	}
}
