// Package auth verifies the JWTs that clients present in Proxy-Authorization
// and mints them for operators (`pinaka token`).
//
// Browsers answer a 407 only with Basic (or NTLM/Negotiate), so besides
// "Bearer <jwt>" the token is accepted as the password of Basic credentials.
package auth

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	lru "github.com/hashicorp/golang-lru/v2"
)

// MaxHeaderLen caps Proxy-Authorization before any parsing: a JWT with our
// claims is a few hundred bytes, so anything near this is an attack.
const MaxHeaderLen = 4096

// Algorithms are the only accepted signing methods. Pinning them refuses
// "none" and every asymmetric algorithm (the classic HS/RS confusion).
var Algorithms = []string{"HS256", "HS384", "HS512"}

// Errors returned by Verifier.Authenticate. ErrMissing and ErrInvalid mean
// 407; ErrRegion means 403.
var (
	ErrMissing = errors.New("missing credentials")
	ErrInvalid = errors.New("invalid credentials")
	ErrRegion  = errors.New("token not allowed in this region")
)

// Identity is who a verified token speaks for.
type Identity struct {
	UserID    string
	TokenID   string
	TokenType string // "manual" or "session"
	Regions   []string
	Expires   time.Time
}

// Claims are the JWT claims Pinaka reads. user_id and token_id may be
// strings or numbers: the Rust proxy's tokens use both.
type Claims struct {
	UserID         FlexString `json:"user_id"`
	TokenID        FlexString `json:"token_id"`
	TokenType      string     `json:"token_type,omitempty"`
	AllowedRegions []string   `json:"allowed_regions"`
	jwt.RegisteredClaims
}

// FlexString is a JSON string or number, kept as its decimal text.
type FlexString string

// UnmarshalJSON accepts "abc", 42 and 4.2e1-style integers.
func (f *FlexString) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*f = FlexString(s)
		return nil
	}
	if string(b) == "null" {
		*f = ""
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("must be a string or a number: %w", err)
	}
	if i, err := n.Int64(); err == nil {
		*f = FlexString(strconv.FormatInt(i, 10))
		return nil
	}
	*f = FlexString(n.String())
	return nil
}

// Verifier checks tokens against one secret and this node's region.
type Verifier struct {
	secret []byte
	region string
	leeway time.Duration
	parser *jwt.Parser
	// verified caches tokens whose signature and claims were checked: a
	// browser sends the same token on every request and stream, and a full
	// HMAC + JSON decode costs microseconds and dozens of allocations. The
	// key is the exact token text, so a cached answer is only ever reused
	// for bytes that verified; entries expire with the token.
	verified *lru.Cache[string, verifiedToken]
	now      func() time.Time
}

type verifiedToken struct {
	id    *Identity
	err   error // nil or ErrRegion
	until time.Time
}

// verifiedCacheSize bounds the cache: enough for every active token of a
// busy node, at roughly 300 bytes each.
const verifiedCacheSize = 16384

// NewVerifier returns a Verifier for tokens signed with secret, valid in
// region, tolerating leeway of clock skew on exp and nbf.
func NewVerifier(secret []byte, region string, leeway time.Duration) *Verifier {
	cache, _ := lru.New[string, verifiedToken](verifiedCacheSize)
	v := &Verifier{secret: secret, region: region, leeway: leeway, verified: cache, now: time.Now}
	v.parser = jwt.NewParser(
		jwt.WithValidMethods(Algorithms),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(leeway),
		jwt.WithTimeFunc(func() time.Time { return v.now() }),
	)
	return v
}

// Authenticate verifies a Proxy-Authorization header value. On ErrRegion the
// returned Identity is non-nil so the refusal can be recorded against it.
func (v *Verifier) Authenticate(header string) (*Identity, error) {
	raw, err := TokenFromHeader(header)
	if err != nil {
		return nil, err
	}
	return v.Verify(raw)
}

// Verify checks a raw JWT. The returned Identity is shared: do not modify it.
func (v *Verifier) Verify(raw string) (*Identity, error) {
	if hit, ok := v.verified.Get(raw); ok {
		if v.now().Before(hit.until) {
			return hit.id, hit.err
		}
		v.verified.Remove(raw)
	}
	id, err := v.verify(raw)
	if id != nil && (err == nil || errors.Is(err, ErrRegion)) {
		v.verified.Add(raw, verifiedToken{id: id, err: err, until: id.Expires.Add(v.leeway)})
	}
	return id, err
}

func (v *Verifier) verify(raw string) (*Identity, error) {
	var c Claims
	_, err := v.parser.ParseWithClaims(raw, &c, func(*jwt.Token) (any, error) { return v.secret, nil })
	if err != nil {
		return nil, fmt.Errorf("%w: %s", ErrInvalid, reason(err))
	}
	if c.TokenID == "" {
		return nil, fmt.Errorf("%w: token_id claim missing", ErrInvalid)
	}
	id := &Identity{
		UserID:    string(c.UserID),
		TokenID:   string(c.TokenID),
		TokenType: c.TokenType,
		Regions:   c.AllowedRegions,
	}
	if c.ExpiresAt != nil {
		id.Expires = c.ExpiresAt.Time
	}
	if id.TokenType == "" {
		id.TokenType = "manual"
		if strings.HasPrefix(id.TokenID, "session_") {
			id.TokenType = "session"
		}
	}
	if !regionAllowed(c.AllowedRegions, v.region) {
		return id, ErrRegion
	}
	return id, nil
}

// regionAllowed: "*" allows every node; a node without a region accepts only
// "*" tokens, and a token without the claim is allowed nowhere.
func regionAllowed(allowed []string, region string) bool {
	if slices.Contains(allowed, "*") {
		return true
	}
	return region != "" && slices.Contains(allowed, region)
}

// reason turns a jwt error into a short phrase safe to log (no token text).
func reason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed token"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return "bad signature"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "algorithm not allowed"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "exp claim missing"
	case errors.Is(err, jwt.ErrTokenExpired):
		return "token expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return "token not valid yet"
	case errors.Is(err, jwt.ErrTokenInvalidClaims):
		return "invalid claims"
	}
	return "invalid token"
}

// TokenFromHeader extracts the JWT from "Bearer <jwt>" or
// "Basic base64(anything:<jwt>)". The length is capped before decoding.
func TokenFromHeader(h string) (string, error) {
	if h == "" {
		return "", ErrMissing
	}
	if len(h) > MaxHeaderLen {
		return "", fmt.Errorf("%w: header too large", ErrInvalid)
	}
	scheme, rest, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok {
		return "", fmt.Errorf("%w: no credentials after scheme", ErrInvalid)
	}
	rest = strings.TrimSpace(rest)
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		if rest == "" {
			return "", fmt.Errorf("%w: empty bearer token", ErrInvalid)
		}
		return rest, nil
	case strings.EqualFold(scheme, "Basic"):
		dec, err := base64.StdEncoding.DecodeString(rest)
		if err != nil {
			return "", fmt.Errorf("%w: basic credentials are not base64", ErrInvalid)
		}
		_, pass, ok := strings.Cut(string(dec), ":")
		if !ok || pass == "" {
			return "", fmt.Errorf("%w: basic credentials have no password", ErrInvalid)
		}
		return pass, nil
	}
	return "", fmt.Errorf("%w: unsupported scheme", ErrInvalid)
}

// MintOptions describe a token to mint.
type MintOptions struct {
	UserID    string
	TokenID   string
	TokenType string
	Regions   []string
	TTL       time.Duration
	Algorithm string // HS256 (default), HS384 or HS512
	Now       time.Time
}

// Mint signs a token with secret.
func Mint(secret []byte, o MintOptions) (string, error) {
	if o.Algorithm == "" {
		o.Algorithm = "HS256"
	}
	if !slices.Contains(Algorithms, o.Algorithm) {
		return "", fmt.Errorf("algorithm %q not one of %v", o.Algorithm, Algorithms)
	}
	if o.TTL <= 0 {
		return "", errors.New("ttl must be positive")
	}
	if o.TokenID == "" {
		return "", errors.New("token id is required")
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	c := Claims{
		UserID:         FlexString(o.UserID),
		TokenID:        FlexString(o.TokenID),
		TokenType:      o.TokenType,
		AllowedRegions: o.Regions,
		RegisteredClaims: jwt.RegisteredClaims{
			IssuedAt:  jwt.NewNumericDate(o.Now),
			NotBefore: jwt.NewNumericDate(o.Now),
			ExpiresAt: jwt.NewNumericDate(o.Now.Add(o.TTL)),
		},
	}
	return jwt.NewWithClaims(jwt.GetSigningMethod(o.Algorithm), c).SignedString(secret)
}
