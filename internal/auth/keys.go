package auth

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"slices"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// MinRSABits is the smallest RSA modulus accepted in a key set or for
// signing: NIST and RFC 7518 §3.3 ask for 2048 bits at least.
const MinRSABits = 2048

// maxKeySetBytes bounds a key file: a set of a few dozen keys is a few tens
// of kilobytes, so a bigger file is a mistake (a log, a binary).
const maxKeySetBytes = 1 << 20

// PublicKey is one verification key of a KeySet.
type PublicKey struct {
	// ID is the token's kid that selects this key: the JWKS kid, or the RFC
	// 7638 thumbprint for PEM keys and JWKS keys without one.
	ID string
	// Key is *rsa.PublicKey, *ecdsa.PublicKey or ed25519.PublicKey.
	Key crypto.PublicKey
	// Alg, when a JWKS names one, is the only algorithm the key verifies.
	Alg string
}

// KeySet is an immutable set of verification keys with distinct ids.
type KeySet struct {
	keys []PublicKey
}

// Len is the number of keys.
func (s *KeySet) Len() int {
	if s == nil {
		return 0
	}
	return len(s.keys)
}

// IDs lists the key ids in file order, for logs.
func (s *KeySet) IDs() []string {
	if s == nil {
		return nil
	}
	ids := make([]string, len(s.keys))
	for i, k := range s.keys {
		ids[i] = k.ID
	}
	return ids
}

func (s *KeySet) lookup(kid string) *PublicKey {
	if s == nil {
		return nil
	}
	for i := range s.keys {
		if s.keys[i].ID == kid {
			return &s.keys[i]
		}
	}
	return nil
}

// LoadKeySet reads a key file (see ParseKeySet).
func LoadKeySet(path string) (*KeySet, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	// One byte over the cap tells a file at the cap from a bigger one.
	if _, err := buf.ReadFrom(io.LimitReader(f, maxKeySetBytes+1)); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if buf.Len() > maxKeySetBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxKeySetBytes)
	}
	ks, err := ParseKeySet(buf.Bytes())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ks, nil
}

// ParseKeySet reads either a JWKS document (RFC 7517 §5, a JSON object
// with "keys") or PEM public keys ("PUBLIC KEY" or "RSA PUBLIC KEY"
// blocks), chosen by the first non-space byte. Anything it does not
// understand is an error rather than skipped: a key silently dropped is a
// fleet refusing tokens with no hint why.
func ParseKeySet(data []byte) (*KeySet, error) {
	trimmed := bytes.TrimSpace(data)
	var keys []PublicKey
	var err error
	if len(trimmed) > 0 && trimmed[0] == '{' {
		keys, err = parseJWKS(trimmed)
	} else {
		keys, err = parsePEMKeys(trimmed)
	}
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, errors.New("no public keys found")
	}
	seen := map[string]bool{}
	for _, k := range keys {
		if seen[k.ID] {
			return nil, fmt.Errorf("kid %q appears twice", k.ID)
		}
		seen[k.ID] = true
	}
	return &KeySet{keys: keys}, nil
}

func parsePEMKeys(data []byte) ([]PublicKey, error) {
	var keys []PublicKey
	rest := data
	for n := 1; ; n++ {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		var pub any
		var err error
		switch block.Type {
		case "PUBLIC KEY":
			pub, err = x509.ParsePKIXPublicKey(block.Bytes)
		case "RSA PUBLIC KEY":
			pub, err = x509.ParsePKCS1PublicKey(block.Bytes)
		default:
			// A private key here would be a leak waiting to happen; a
			// certificate is not what the operator meant to trust.
			return nil, fmt.Errorf("PEM block %d is %q, want PUBLIC KEY", n, block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		if err := checkPublicKey(pub); err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		kid, err := KeyID(pub)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %w", n, err)
		}
		keys = append(keys, PublicKey{ID: kid, Key: pub})
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, fmt.Errorf("not PEM after %d key(s): neither PEM public keys nor a JWKS document", len(keys))
	}
	return keys, nil
}

// jwk is the subset of RFC 7517/7518/8037 members Pinaka reads.
type jwk struct {
	Kty string `json:"kty"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
	Crv string `json:"crv"`
	N   string `json:"n"`
	E   string `json:"e"`
	X   string `json:"x"`
	Y   string `json:"y"`
	D   string `json:"d"`
	K   string `json:"k"`
}

func parseJWKS(data []byte) ([]PublicKey, error) {
	var doc struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("JWKS: %w", err)
	}
	var keys []PublicKey
	for i, j := range doc.Keys {
		if j.Use != "" && j.Use != "sig" {
			// An encryption key in the same published set is not ours.
			continue
		}
		k, err := j.publicKey()
		if err != nil {
			return nil, fmt.Errorf("JWKS key %d (kid %q): %w", i, j.Kid, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

func (j jwk) publicKey() (PublicKey, error) {
	if j.D != "" || j.K != "" {
		// "d" is a private exponent, "k" an HMAC secret: a document that
		// holds either must not be published, and an "oct" key would turn
		// a public set into a shared secret.
		return PublicKey{}, errors.New("holds private or symmetric key material")
	}
	var pub crypto.PublicKey
	switch j.Kty {
	case "RSA":
		n, err1 := b64int(j.N)
		e, err2 := b64int(j.E)
		if err1 != nil || err2 != nil || !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 {
			return PublicKey{}, errors.New("bad RSA n or e")
		}
		pub = &rsa.PublicKey{N: n, E: int(e.Int64())}
	case "EC":
		curve, size := curveByName(j.Crv)
		if curve == nil {
			return PublicKey{}, fmt.Errorf("unsupported EC curve %q", j.Crv)
		}
		x, err1 := base64.RawURLEncoding.DecodeString(j.X)
		y, err2 := base64.RawURLEncoding.DecodeString(j.Y)
		// RFC 7518 §6.2.1.2: coordinates are exactly the field size.
		if err1 != nil || err2 != nil || len(x) != size || len(y) != size {
			return PublicKey{}, errors.New("bad EC x or y")
		}
		p, err := ecdsa.ParseUncompressedPublicKey(curve, append(append([]byte{4}, x...), y...))
		if err != nil {
			return PublicKey{}, fmt.Errorf("EC point: %w", err)
		}
		pub = p
	case "OKP":
		if j.Crv != "Ed25519" {
			return PublicKey{}, fmt.Errorf("unsupported OKP curve %q", j.Crv)
		}
		x, err := base64.RawURLEncoding.DecodeString(j.X)
		if err != nil || len(x) != ed25519.PublicKeySize {
			return PublicKey{}, errors.New("bad Ed25519 x")
		}
		pub = ed25519.PublicKey(x)
	default:
		return PublicKey{}, fmt.Errorf("unsupported kty %q", j.Kty)
	}
	if err := checkPublicKey(pub); err != nil {
		return PublicKey{}, err
	}
	if j.Alg != "" && !keyFits(j.Alg, pub) {
		return PublicKey{}, fmt.Errorf("alg %q does not fit a %s key", j.Alg, j.Kty)
	}
	kid := j.Kid
	if kid == "" {
		var err error
		if kid, err = KeyID(pub); err != nil {
			return PublicKey{}, err
		}
	}
	return PublicKey{ID: kid, Key: pub, Alg: j.Alg}, nil
}

// b64int decodes a base64url unsigned big-endian integer.
func b64int(s string) (*big.Int, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) == 0 {
		return nil, errors.New("bad integer")
	}
	return new(big.Int).SetBytes(b), nil
}

func curveByName(crv string) (elliptic.Curve, int) {
	switch crv {
	case "P-256":
		return elliptic.P256(), 32
	case "P-384":
		return elliptic.P384(), 48
	case "P-521":
		return elliptic.P521(), 66
	}
	return nil, 0
}

// checkPublicKey refuses key types and sizes Pinaka does not verify with.
func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < MinRSABits {
			return fmt.Errorf("RSA key of %d bits; at least %d required", k.N.BitLen(), MinRSABits)
		}
	case *ecdsa.PublicKey:
		if c, _ := curveByName(k.Curve.Params().Name); c == nil {
			return fmt.Errorf("unsupported EC curve %s", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	default:
		return fmt.Errorf("unsupported public key type %T", pub)
	}
	return nil
}

// AsymmetricAlgorithms are the public-key algorithms a KeySet verifies.
var AsymmetricAlgorithms = []string{
	"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
	"ES256", "ES384", "ES512", "EdDSA",
}

// keyFits is the algorithm-family rule: RSA keys verify RS* and PS*, an
// EC key only the ES* of its own curve, Ed25519 only EdDSA. Nothing here
// ever accepts an HS* algorithm: the HMAC secret is a separate source.
func keyFits(alg string, pub crypto.PublicKey) bool {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(alg, "RS") || strings.HasPrefix(alg, "PS")
	case *ecdsa.PublicKey:
		return alg == map[string]string{"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[k.Curve.Params().Name]
	case ed25519.PublicKey:
		return alg == "EdDSA"
	}
	return false
}

// jwkMembers are the required public members of a key's JWK (RFC 7638 §3.2),
// the input of its thumbprint and the body of its published JWK.
func jwkMembers(pub crypto.PublicKey) (map[string]string, error) {
	enc := base64.RawURLEncoding.EncodeToString
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return map[string]string{"kty": "RSA", "n": enc(k.N.Bytes()), "e": enc(big.NewInt(int64(k.E)).Bytes())}, nil
	case *ecdsa.PublicKey:
		_, size := curveByName(k.Curve.Params().Name)
		raw, err := k.Bytes()
		if err != nil || size == 0 {
			return nil, fmt.Errorf("unsupported EC key: %v", err)
		}
		return map[string]string{"kty": "EC", "crv": k.Curve.Params().Name,
			"x": enc(raw[1 : 1+size]), "y": enc(raw[1+size:])}, nil
	case ed25519.PublicKey:
		return map[string]string{"kty": "OKP", "crv": "Ed25519", "x": enc(k)}, nil
	}
	return nil, fmt.Errorf("unsupported public key type %T", pub)
}

// KeyID is the kid Pinaka derives for a key that has none: its RFC 7638
// JWK thumbprint (SHA-256, base64url). It depends on the key alone, so
// `pinaka token --key`, `pinaka keygen` and the verifier agree without
// coordination, and any JOSE library can compute it too.
func KeyID(pub crypto.PublicKey) (string, error) {
	m, err := jwkMembers(pub)
	if err != nil {
		return "", err
	}
	// encoding/json sorts map keys and the values are base64url or fixed
	// names, so this is exactly RFC 7638's canonical form.
	b, err := json.Marshal(m)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return base64.RawURLEncoding.EncodeToString(sum[:]), nil
}

// MarshalJWKS renders keys as a JWKS document with kid, use and alg.
func MarshalJWKS(keys []PublicKey) ([]byte, error) {
	out := struct {
		Keys []map[string]string `json:"keys"`
	}{Keys: []map[string]string{}}
	for _, k := range keys {
		m, err := jwkMembers(k.Key)
		if err != nil {
			return nil, err
		}
		m["kid"], m["use"] = k.ID, "sig"
		if k.Alg != "" {
			m["alg"] = k.Alg
		}
		out.Keys = append(out.Keys, m)
	}
	return json.MarshalIndent(out, "", "  ")
}

// ParsePrivateKeyPEM reads the first private key of a PEM file: PKCS#8
// ("PRIVATE KEY"), PKCS#1 ("RSA PRIVATE KEY") or SEC 1 ("EC PRIVATE KEY").
// Other blocks (openssl's "EC PARAMETERS") are skipped.
func ParsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM private key found")
		}
		var key any
		var err error
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted private keys are not supported; decrypt it first")
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parsing %s: %w", block.Type, err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
		if err := checkPublicKey(signer.Public()); err != nil {
			return nil, err
		}
		return signer, nil
	}
}

// SigningAlgorithm is the algorithm a private key signs with by default:
// RS256 for RSA, ES256/384/512 by curve, EdDSA for Ed25519.
func SigningAlgorithm(key crypto.Signer) (string, error) {
	pub := key.Public()
	for _, alg := range []string{"RS256", "ES256", "ES384", "ES512", "EdDSA"} {
		if keyFits(alg, pub) {
			return alg, nil
		}
	}
	return "", fmt.Errorf("unsupported private key type %T", key)
}

// MintWithKey signs a token with a private key; the header carries kid.
// o.Algorithm, if set, must fit the key (RS* or PS* for RSA); empty means
// SigningAlgorithm's choice.
func MintWithKey(key crypto.Signer, kid string, o MintOptions) (string, error) {
	if o.Algorithm == "" {
		alg, err := SigningAlgorithm(key)
		if err != nil {
			return "", err
		}
		o.Algorithm = alg
	}
	if !slices.Contains(AsymmetricAlgorithms, o.Algorithm) || !keyFits(o.Algorithm, key.Public()) {
		return "", fmt.Errorf("algorithm %q does not fit a %T key", o.Algorithm, key)
	}
	c, err := mintClaims(o)
	if err != nil {
		return "", err
	}
	t := jwt.NewWithClaims(jwt.GetSigningMethod(o.Algorithm), c)
	if kid != "" {
		t.Header["kid"] = kid
	}
	return t.SignedString(key)
}
