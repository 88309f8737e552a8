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
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
	lru "github.com/hashicorp/golang-lru/v2"
)

// MaxHeaderLen caps Proxy-Authorization before any parsing: a JWT with our
// claims is a few hundred bytes, so anything near this is an attack.
const MaxHeaderLen = 4096

// MaxIDLen is the longest token_id or user_id accepted, in bytes. Records
// carry both ids to the collector, whose token_id column is VARCHAR(50)
// (SPEC §5); the collector checks records against this same constant.
// Counting bytes rather than characters keeps every accepted id inside that
// column whatever its characters, and bounds the rate limiter's keys.
const MaxIDLen = 50

// HMACAlgorithms are verified with JWT_SECRET and minted by Mint.
var HMACAlgorithms = []string{"HS256", "HS384", "HS512"}

// Algorithms are the only accepted signing methods: "none" is never one.
// Which key verifies which algorithm is the Verifier's key function's rule
// (keyFits): the HMAC secret only HS*, a public key only its own family.
var Algorithms = slices.Concat(HMACAlgorithms, AsymmetricAlgorithms)

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
//
// exp, nbf and iat shadow RegisteredClaims' fields (encoding/json prefers
// the shallower field of a name) because jwt.NumericDate also takes a
// string holding a number ("exp":"9999999999"), which RFC 7519 §2 does not
// allow: a NumericDate is a JSON number. The Get* methods below hand
// golang-jwt's validator these fields instead of the embedded ones.
type Claims struct {
	UserID         FlexString   `json:"user_id"`
	TokenID        FlexString   `json:"token_id"`
	TokenType      string       `json:"token_type,omitempty"`
	AllowedRegions []string     `json:"allowed_regions"`
	ExpiresAt      *NumericDate `json:"exp,omitempty"`
	NotBefore      *NumericDate `json:"nbf,omitempty"`
	IssuedAt       *NumericDate `json:"iat,omitempty"`
	jwt.RegisteredClaims
}

// GetExpirationTime implements jwt.Claims with the strict exp.
func (c Claims) GetExpirationTime() (*jwt.NumericDate, error) { return c.ExpiresAt.jwt(), nil }

// GetNotBefore implements jwt.Claims with the strict nbf.
func (c Claims) GetNotBefore() (*jwt.NumericDate, error) { return c.NotBefore.jwt(), nil }

// GetIssuedAt implements jwt.Claims with the strict iat.
func (c Claims) GetIssuedAt() (*jwt.NumericDate, error) { return c.IssuedAt.jwt(), nil }

// Validate is golang-jwt's hook (jwt.ClaimsValidator) for checks of our
// own, run with exp and nbf once the signature verified: identifiers the
// record store cannot hold are refused here rather than failing later, in
// the collector, for a whole batch of other tokens' records.
func (c Claims) Validate() error {
	if c.TokenID == "" {
		return &refusal{"token_id claim missing"}
	}
	for _, id := range []struct {
		claim string
		v     FlexString
	}{{"token_id", c.TokenID}, {"user_id", c.UserID}} {
		if err := CheckID(id.claim, string(id.v)); err != nil {
			return &refusal{err.Error()}
		}
	}
	return nil
}

// CheckID says why v cannot be the identifier claim named (token_id or
// user_id), or returns nil. An empty v passes: whether the claim is
// required is the caller's rule. Control characters (NUL included, which
// PostgreSQL text cannot hold) and invalid UTF-8 would corrupt log lines
// and records.
func CheckID(claim, v string) error {
	switch {
	case len(v) > MaxIDLen:
		return fmt.Errorf("%s is longer than %d bytes", claim, MaxIDLen)
	case !utf8.ValidString(v):
		return fmt.Errorf("%s is not valid UTF-8", claim)
	case strings.ContainsFunc(v, unicode.IsControl):
		return fmt.Errorf("%s contains a control character", claim)
	}
	return nil
}

// refusal is a token refusal of our own. Its text names the claim or
// header and the rule, never a value: it goes into the 407 body and the
// log.
type refusal struct{ msg string }

func (e *refusal) Error() string { return e.msg }

// NumericDate is a jwt.NumericDate that must be a JSON number.
type NumericDate struct{ jwt.NumericDate }

func newNumericDate(t time.Time) *NumericDate { return &NumericDate{*jwt.NewNumericDate(t)} }

// UnmarshalJSON refuses everything but a JSON number, then leaves the
// conversion to golang-jwt. The error is a json.UnmarshalTypeError so that
// encoding/json fills in the claim's name. (null never gets here: it sets
// the pointer to nil, a missing claim.)
func (d *NumericDate) UnmarshalJSON(b []byte) error {
	if len(b) == 0 || (b[0] != '-' && (b[0] < '0' || b[0] > '9')) {
		return &json.UnmarshalTypeError{Value: jsonKind(b), Type: reflect.TypeFor[float64]()}
	}
	return d.NumericDate.UnmarshalJSON(b)
}

// jwt returns the date in golang-jwt's type, nil for a missing claim.
func (d *NumericDate) jwt() *jwt.NumericDate {
	if d == nil {
		return nil
	}
	return &d.NumericDate
}

// jsonKind names the kind of a JSON value that is not a number.
func jsonKind(b []byte) string {
	switch {
	case len(b) == 0:
		return "nothing"
	case b[0] == '"':
		return "string"
	case b[0] == '{':
		return "object"
	case b[0] == '[':
		return "array"
	case b[0] == 't' || b[0] == 'f':
		return "bool"
	}
	return "value"
}

// FlexString is a JSON string or number, kept as its decimal text.
type FlexString string

// UnmarshalJSON accepts "abc", 42 and 4.2e1-style integers. Invalid UTF-8
// is refused rather than silently replaced by U+FFFD as encoding/json
// would, so a token's id is the id its issuer wrote or nothing.
func (f *FlexString) UnmarshalJSON(b []byte) error {
	if !utf8.Valid(b) {
		return &json.UnmarshalTypeError{Value: invalidUTF8, Type: reflect.TypeFor[string]()}
	}
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

// invalidUTF8 marks FlexString's refusal in a json.UnmarshalTypeError.
const invalidUTF8 = "invalid UTF-8"

// Verifier checks tokens against the HMAC secret and a set of public keys,
// and this node's region.
type Verifier struct {
	secret []byte
	// keys is swapped whole by SetKeys (SIGHUP) while requests verify.
	keys atomic.Pointer[KeySet]
	// onUnknownKid, if set, is told about a token whose kid is in no
	// key (JWKS_URL refreshes on it). It must not block.
	onUnknownKid func()
	region       string
	leeway       time.Duration
	parser       *jwt.Parser
	// verified caches tokens whose signature and claims were checked: a
	// browser sends the same token on every request and stream, and a full
	// HMAC + JSON decode costs microseconds and dozens of allocations. The
	// key is the exact token text, so a cached answer is only ever reused
	// for bytes that verified; entries expire with the token.
	verified *lru.Cache[string, verifiedToken]
	now      func() time.Time
	// clientTrust checks client certificates (see AuthenticateTLS).
	clientTrust atomic.Pointer[ClientTrust]
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
// region, tolerating leeway of clock skew on exp and nbf. An empty secret
// refuses every HS* token; SetKeys adds public keys.
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

// SetKeys replaces the public key set (nil: none). The cache of verified
// tokens is emptied so that a token signed by a key just removed stops
// working at once rather than when it expires.
func (v *Verifier) SetKeys(ks *KeySet) {
	v.keys.Store(ks)
	v.verified.Purge()
}

// OnUnknownKid registers f to be called, without waiting, when a token
// names a kid the set does not hold. Call it before the Verifier is used.
func (v *Verifier) OnUnknownKid(f func()) { v.onUnknownKid = f }

// Keys returns the current public key set (nil if none).
func (v *Verifier) Keys() *KeySet { return v.keys.Load() }

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
	_, err := v.parser.ParseWithClaims(raw, &c, v.key)
	if err != nil {
		if errors.Is(err, jwt.ErrTokenMalformed) {
			if named := v.mistypedClaim(raw); named != nil {
				err = named
			}
		}
		return nil, fmt.Errorf("%w: %s", ErrInvalid, reason(err))
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

// mistypedClaim is called when golang-jwt could not decode the claims of
// token. It decodes the claims Pinaka reads one at a time and returns a
// refusal naming the first whose value has the wrong type, or nil, so the
// reason is the same on every Go version: Go 1.26's encoding/json filled
// the field name into an error returned by a field's UnmarshalJSON
// (NumericDate, FlexString), Go 1.27's (built on encoding/json/v2) returns
// that error as it is, without the name, and names an array element by
// its index. Keys match as they do in Claims (encoding/json's rules:
// case-insensitive, the last duplicate wins). Only refused tokens pay for
// this second decode.
func (v *Verifier) mistypedClaim(token string) error {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil
	}
	b, err := v.parser.DecodeSegment(parts[1])
	if err != nil {
		return nil
	}
	var raw struct {
		UserID         json.RawMessage `json:"user_id"`
		TokenID        json.RawMessage `json:"token_id"`
		TokenType      json.RawMessage `json:"token_type"`
		AllowedRegions json.RawMessage `json:"allowed_regions"`
		ExpiresAt      json.RawMessage `json:"exp"`
		NotBefore      json.RawMessage `json:"nbf"`
		IssuedAt       json.RawMessage `json:"iat"`
	}
	if json.Unmarshal(b, &raw) != nil {
		return nil
	}
	var c Claims
	for _, f := range []struct {
		claim string
		raw   json.RawMessage
		dst   any
	}{
		{"user_id", raw.UserID, &c.UserID},
		{"token_id", raw.TokenID, &c.TokenID},
		{"token_type", raw.TokenType, &c.TokenType},
		{"allowed_regions", raw.AllowedRegions, &c.AllowedRegions},
		{"exp", raw.ExpiresAt, &c.ExpiresAt},
		{"nbf", raw.NotBefore, &c.NotBefore},
		{"iat", raw.IssuedAt, &c.IssuedAt},
	} {
		if f.raw == nil {
			continue
		}
		err := json.Unmarshal(f.raw, f.dst)
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
			return &refusal{typeRefusal(f.claim, te)}
		}
	}
	return nil
}

// key is the jwt.Keyfunc. golang-jwt ignores the crit header, so it is
// checked here, where the library hands over the parsed header before the
// signature is checked. RFC 7515 §4.1.11: a JWS whose crit lists an
// extension the recipient does not understand is invalid. Pinaka
// understands none, so any crit is refused; one that is not a non-empty
// array of strings is malformed (§4.1.11 forbids producers the empty list).
//
// Then the key: HS* tokens get the secret and nothing else; any other
// algorithm gets only public keys of its own family (keyFits), so neither
// an RSA public key used as an HMAC secret nor an EC key behind an RS256
// header can pass. The kid header picks the key; a token without kid is
// tried against every key of its family (a set has a handful of keys).
// jku, x5u, x5c and jwk headers are never read: keys come only from the
// configured set.
func (v *Verifier) key(t *jwt.Token) (any, error) {
	if err := checkCrit(t.Header); err != nil {
		return nil, err
	}
	alg := t.Method.Alg()
	if slices.Contains(HMACAlgorithms, alg) {
		if len(v.secret) == 0 {
			return nil, &refusal{"HMAC tokens are not accepted here (no JWT_SECRET)"}
		}
		return v.secret, nil
	}
	ks := v.keys.Load()
	if raw, ok := t.Header["kid"]; ok {
		kid, _ := raw.(string)
		if kid == "" {
			return nil, &refusal{"kid header is not a non-empty string"}
		}
		k := ks.lookup(kid)
		switch {
		case k == nil:
			if v.onUnknownKid != nil {
				v.onUnknownKid()
			}
			return nil, &refusal{"unknown kid"}
		case !keyFits(alg, k.Key) || (k.Alg != "" && k.Alg != alg):
			return nil, &refusal{"kid names a key of another algorithm"}
		}
		return k.Key, nil
	}
	var set jwt.VerificationKeySet
	if ks != nil {
		for _, k := range ks.keys {
			if keyFits(alg, k.Key) && (k.Alg == "" || k.Alg == alg) {
				set.Keys = append(set.Keys, k.Key)
			}
		}
	}
	if len(set.Keys) == 0 {
		return nil, &refusal{"no key for this algorithm"}
	}
	return set, nil
}

// checkCrit applies RFC 7515 §4.1.11 (see key).
func checkCrit(h map[string]any) error {
	crit, ok := h["crit"]
	if !ok {
		return nil
	}
	names, _ := crit.([]any)
	if len(names) == 0 {
		return &refusal{"crit header is not a list of extension names"}
	}
	for _, n := range names {
		if _, ok := n.(string); !ok {
			return &refusal{"crit header is not a list of extension names"}
		}
	}
	return &refusal{"crit header names extensions this proxy does not understand"}
}

// regionAllowed: "*" allows every node; a node without a region accepts only
// "*" tokens, and a token without the claim is allowed nowhere.
func regionAllowed(allowed []string, region string) bool {
	if slices.Contains(allowed, "*") {
		return true
	}
	return region != "" && slices.Contains(allowed, region)
}

// reason turns a jwt error into a short phrase safe to log and to send
// back in the 407 (it names claims and rules, never token text). Our own
// refusals come first: golang-jwt wraps them in its generic errors.
func reason(err error) string {
	if ce, ok := errors.AsType[*refusal](err); ok {
		return ce.msg
	}
	if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok && te.Field != "" {
		return typeRefusal(te.Field[strings.LastIndexByte(te.Field, '.')+1:], te)
	}
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

// typeRefusal says that claim's value has the wrong JSON type. Only the
// kind is named: Go 1.27's encoding/json appends some values to it
// ("number 1e999"), and a refusal never quotes token text.
func typeRefusal(claim string, te *json.UnmarshalTypeError) string {
	if te.Value == invalidUTF8 {
		return claim + " is not valid UTF-8"
	}
	kind, _, _ := strings.Cut(te.Value, " ")
	return fmt.Sprintf("%s claim must be %s, not %s", claim, jsonTypeName(te.Type), kind)
}

// jsonTypeName names the JSON type a Go type decodes from.
func jsonTypeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Float32, reflect.Float64, reflect.Int, reflect.Int64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Bool:
		return "a boolean"
	}
	return "another type"
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
	// Algorithm: for Mint HS256 (default), HS384 or HS512; for
	// MintWithKey one fitting the key (default SigningAlgorithm).
	Algorithm string
	Now       time.Time
}

// Mint signs a token with secret.
func Mint(secret []byte, o MintOptions) (string, error) {
	if o.Algorithm == "" {
		o.Algorithm = "HS256"
	}
	if !slices.Contains(HMACAlgorithms, o.Algorithm) {
		return "", fmt.Errorf("algorithm %q not one of %v", o.Algorithm, HMACAlgorithms)
	}
	c, err := mintClaims(o)
	if err != nil {
		return "", err
	}
	return jwt.NewWithClaims(jwt.GetSigningMethod(o.Algorithm), c).SignedString(secret)
}

// mintClaims checks o and builds the claims every minted token carries.
func mintClaims(o MintOptions) (Claims, error) {
	if o.TTL <= 0 {
		return Claims{}, errors.New("ttl must be positive")
	}
	if o.TokenID == "" {
		return Claims{}, errors.New("token id is required")
	}
	// A token the verifier would refuse is not worth minting.
	for _, id := range []struct{ claim, v string }{{"token_id", o.TokenID}, {"user_id", o.UserID}} {
		if err := CheckID(id.claim, id.v); err != nil {
			return Claims{}, err
		}
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	return Claims{
		UserID:         FlexString(o.UserID),
		TokenID:        FlexString(o.TokenID),
		TokenType:      o.TokenType,
		AllowedRegions: o.Regions,
		IssuedAt:       newNumericDate(o.Now),
		NotBefore:      newNumericDate(o.Now),
		ExpiresAt:      newNumericDate(o.Now.Add(o.TTL)),
	}, nil
}
