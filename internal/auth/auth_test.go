package auth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

var secret = []byte("0123456789abcdef0123456789abcdef")

func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestVerify(t *testing.T) {
	now := time.Now()
	exp := now.Add(time.Hour).Unix()
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	base := func() jwt.MapClaims {
		return jwt.MapClaims{"user_id": "u1", "token_id": "t1", "allowed_regions": []string{"us-east"}, "exp": exp}
	}
	with := func(k string, v any) jwt.MapClaims {
		c := base()
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
		return c
	}
	cases := []struct {
		name    string
		token   string
		wantErr error
		check   func(*Identity) bool
	}{
		{"HS256", sign(t, jwt.SigningMethodHS256, secret, base()), nil, nil},
		{"HS384", sign(t, jwt.SigningMethodHS384, secret, base()), nil, nil},
		{"HS512", sign(t, jwt.SigningMethodHS512, secret, base()), nil, nil},
		{"numeric ids", sign(t, jwt.SigningMethodHS256, secret, with("user_id", 42)), nil,
			func(id *Identity) bool { return id.UserID == "42" }},
		{"numeric token id", sign(t, jwt.SigningMethodHS256, secret, with("token_id", 1234567890123)), nil,
			func(id *Identity) bool { return id.TokenID == "1234567890123" }},
		{"session type from id", sign(t, jwt.SigningMethodHS256, secret, with("token_id", "session_5")), nil,
			func(id *Identity) bool { return id.TokenType == "session" }},
		{"explicit type", sign(t, jwt.SigningMethodHS256, secret, with("token_type", "session")), nil,
			func(id *Identity) bool { return id.TokenType == "session" }},
		{"manual by default", sign(t, jwt.SigningMethodHS256, secret, base()), nil,
			func(id *Identity) bool { return id.TokenType == "manual" }},
		{"wildcard region", sign(t, jwt.SigningMethodHS256, secret, with("allowed_regions", []string{"*"})), nil, nil},
		{"wrong region", sign(t, jwt.SigningMethodHS256, secret, with("allowed_regions", []string{"eu-west"})), ErrRegion, nil},
		{"no regions claim", sign(t, jwt.SigningMethodHS256, secret, with("allowed_regions", nil)), ErrRegion, nil},
		{"missing exp", sign(t, jwt.SigningMethodHS256, secret, with("exp", nil)), ErrInvalid, nil},
		{"expired", sign(t, jwt.SigningMethodHS256, secret, with("exp", now.Add(-time.Hour).Unix())), ErrInvalid, nil},
		{"expired within leeway", sign(t, jwt.SigningMethodHS256, secret, with("exp", now.Add(-5*time.Second).Unix())), nil, nil},
		{"nbf in future", sign(t, jwt.SigningMethodHS256, secret, with("nbf", now.Add(time.Hour).Unix())), ErrInvalid, nil},
		{"nbf within leeway", sign(t, jwt.SigningMethodHS256, secret, with("nbf", now.Add(5*time.Second).Unix())), nil, nil},
		{"wrong secret", sign(t, jwt.SigningMethodHS256, []byte("another-secret-another-secret-123"), base()), ErrInvalid, nil},
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, base()), ErrInvalid, nil},
		{"RS256", sign(t, jwt.SigningMethodRS256, rsaKey, base()), ErrInvalid, nil},
		{"ES256", sign(t, jwt.SigningMethodES256, ecKey, base()), ErrInvalid, nil},
		{"missing token_id", sign(t, jwt.SigningMethodHS256, secret, with("token_id", nil)), ErrInvalid, nil},
		{"garbage", "not.a.jwt", ErrInvalid, nil},
	}
	v := NewVerifier(secret, "us-east", 30*time.Second)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, err := v.Verify(c.token)
			if !errors.Is(err, c.wantErr) || (c.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, c.wantErr)
			}
			if c.check != nil && !c.check(id) {
				t.Errorf("identity %+v", id)
			}
			if err != nil && strings.Contains(err.Error(), c.token) {
				t.Error("error message contains the token")
			}
		})
	}
}

func TestNodeWithoutRegionAcceptsOnlyWildcard(t *testing.T) {
	v := NewVerifier(secret, "", 0)
	tok, _ := Mint(secret, MintOptions{TokenID: "t", Regions: []string{"us-east"}, TTL: time.Hour})
	if _, err := v.Verify(tok); !errors.Is(err, ErrRegion) {
		t.Errorf("regional token on a region-less node: %v", err)
	}
	tok, _ = Mint(secret, MintOptions{TokenID: "t", Regions: []string{"*"}, TTL: time.Hour})
	if _, err := v.Verify(tok); err != nil {
		t.Errorf("wildcard token: %v", err)
	}
}

func TestTokenFromHeader(t *testing.T) {
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	cases := []struct {
		header, want string
		err          error
	}{
		{"", "", ErrMissing},
		{"Bearer abc.def.ghi", "abc.def.ghi", nil},
		{"bearer   abc.def.ghi ", "abc.def.ghi", nil},
		{basic("anything:abc.def.ghi"), "abc.def.ghi", nil},
		{basic(":abc.def.ghi"), "abc.def.ghi", nil},
		{basic("user:pa:ss"), "pa:ss", nil},
		{basic("nopassword"), "", ErrInvalid},
		{basic("user:"), "", ErrInvalid},
		{"Basic !!!notbase64", "", ErrInvalid},
		{"Bearer", "", ErrInvalid},
		{"Bearer ", "", ErrInvalid},
		{"Digest abc", "", ErrInvalid},
		{"Bearer " + strings.Repeat("a", MaxHeaderLen), "", ErrInvalid},
	}
	for _, c := range cases {
		got, err := TokenFromHeader(c.header)
		if !errors.Is(err, c.err) || (c.err == nil && err != nil) || got != c.want {
			t.Errorf("TokenFromHeader(%.40q) = %q, %v; want %q, %v", c.header, got, err, c.want, c.err)
		}
	}
}

func TestMint(t *testing.T) {
	now := time.Now()
	tok, err := Mint(secret, MintOptions{UserID: "7", TokenID: "session_9", Regions: []string{"a", "b"}, TTL: 2 * time.Hour, Algorithm: "HS512", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	id, err := NewVerifier(secret, "b", 0).Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if id.UserID != "7" || id.TokenID != "session_9" || id.TokenType != "session" || id.Expires.Unix() != now.Add(2*time.Hour).Unix() {
		t.Errorf("identity %+v", id)
	}
	for _, bad := range []MintOptions{{TokenID: "t", TTL: 0}, {TTL: time.Hour}, {TokenID: "t", TTL: time.Hour, Algorithm: "RS256"}} {
		if _, err := Mint(secret, bad); err == nil {
			t.Errorf("Mint(%+v) succeeded", bad)
		}
	}
}

// FuzzTokenFromHeader: the header parser never panics, never returns a
// token for an over-long header, and a token it returns is part of what
// the client sent (after base64 decoding for Basic).
func FuzzTokenFromHeader(f *testing.F) {
	for _, s := range []string{"", "Bearer x.y.z", "Basic dXNlcjpwYXNz", "Basic Og==", "basic " + base64.StdEncoding.EncodeToString([]byte("a:b:c")),
		"Bearer\t", "Negotiate abc", "Basic ====", " Bearer  a ", "Basic " + strings.Repeat("A", 5000)} {
		f.Add(s)
	}
	// Public-key seeds, with a key derived from a fixed seed so that the
	// fuzzer mutates tokens that verify: a genuine EdDSA token, one with
	// a jku, one whose kid is a number, and the HS256 confusion token
	// keyed with the public key's PEM.
	fuzzKeys, fuzzEd := fuzzKeySet(f)
	edPEM := pemOf(f, fuzzEd.Public())
	for _, tok := range []string{
		signH(f, "EdDSA", fuzzEd, nil, claims()),
		signH(f, "EdDSA", fuzzEd, map[string]any{"kid": fuzzKeys.IDs()[0], "jku": "http://127.0.0.1:1/"}, claims()),
		signH(f, "EdDSA", fuzzEd, map[string]any{"kid": 1}, claims()),
		signH(f, "HS256", edPEM, map[string]any{"kid": fuzzKeys.IDs()[0]}, claims()),
	} {
		f.Add("Bearer " + tok)
	}
	f.Fuzz(func(t *testing.T, h string) {
		tok, err := TokenFromHeader(h)
		if err != nil {
			if tok != "" {
				t.Fatalf("token %q with error %v", tok, err)
			}
			if !errors.Is(err, ErrMissing) && !errors.Is(err, ErrInvalid) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if len(h) > MaxHeaderLen || tok == "" {
			t.Fatalf("accepted %q from a header of %d bytes", tok, len(h))
		}
		if !strings.Contains(h, tok) {
			_, rest, _ := strings.Cut(strings.TrimSpace(h), " ")
			dec, derr := base64.StdEncoding.DecodeString(strings.TrimSpace(rest))
			if derr != nil || !strings.Contains(string(dec), tok) {
				t.Fatalf("token %q is not in header %q", tok, h)
			}
		}
		// A verifier must reject whatever the fuzzer produced without
		// panicking. The seed corpus holds tokens signed with secret that
		// must be refused (crit header, string exp, a 60-character and a
		// NUL token_id); whatever is accepted has ids the record store can
		// hold.
		v := NewVerifier(secret, "r", 0)
		v.SetKeys(fuzzKeys)
		if id, err := v.Verify(tok); err == nil {
			if e := errors.Join(CheckID("token_id", id.TokenID), CheckID("user_id", id.UserID)); e != nil || id.TokenID == "" {
				t.Fatalf("accepted identity %+v: %v", id, e)
			}
			// Only HS* with the secret or EdDSA with the one key verify.
			if alg := jwtAlg(tok); alg != "EdDSA" && !strings.HasPrefix(alg, "HS") {
				t.Fatalf("accepted a %q token", alg)
			}
		}
	})
}

// fuzzKeySet is a one-key set from a fixed Ed25519 seed.
func fuzzKeySet(t testing.TB) (*KeySet, ed25519.PrivateKey) {
	ed := ed25519.NewKeyFromSeed([]byte("pinaka-fuzz-seed-0123456789abcde"))
	return keySet(t, ed.Public()), ed
}

// jwtAlg reads a token's alg header, "" if it has none.
func jwtAlg(tok string) string {
	seg, _, _ := strings.Cut(tok, ".")
	b, _ := base64.RawURLEncoding.DecodeString(seg)
	var h struct{ Alg string }
	json.Unmarshal(b, &h)
	return h.Alg
}

func BenchmarkVerify(b *testing.B) {
	tok, _ := Mint(secret, MintOptions{UserID: "u", TokenID: "t", Regions: []string{"us-east"}, TTL: time.Hour})
	v := NewVerifier(secret, "us-east", time.Second)
	h := "Bearer " + tok
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Authenticate(h); err != nil {
			b.Fatal(err)
		}
	}
}

// A cached verification ends with the token: exp plus leeway.
func TestVerifiedCacheExpires(t *testing.T) {
	v := NewVerifier(secret, "r", 2*time.Second)
	now := time.Now()
	v.now = func() time.Time { return now }
	tok, _ := Mint(secret, MintOptions{TokenID: "t", Regions: []string{"r"}, TTL: time.Minute, Now: now})
	if _, err := v.Verify(tok); err != nil {
		t.Fatal(err)
	}
	if v.verified.Len() != 1 {
		t.Fatalf("not cached")
	}
	v.now = func() time.Time { return now.Add(time.Minute + time.Second) }
	if _, err := v.Verify(tok); err != nil {
		t.Fatalf("within leeway: %v", err)
	}
	v.now = func() time.Time { return now.Add(time.Minute + 3*time.Second) }
	if _, err := v.Verify(tok); !errors.Is(err, ErrInvalid) {
		t.Fatalf("past exp+leeway: %v, want ErrInvalid (the cache must not outlive the token)", err)
	}
	if _, ok := v.verified.Get(tok); ok {
		t.Fatal("expired token still cached")
	}
	// A token that fails verification is never cached.
	bad := tok[:len(tok)-2] + "xx"
	if _, err := v.Verify(bad); err == nil {
		t.Fatal("tampered token verified")
	}
	if _, ok := v.verified.Get(bad); ok {
		t.Fatal("tampered token cached")
	}
	// Region refusals are cached as refusals.
	other, _ := Mint(secret, MintOptions{TokenID: "t2", Regions: []string{"elsewhere"}, TTL: time.Minute, Now: now})
	v.now = time.Now
	for i := 0; i < 2; i++ {
		if _, err := v.Verify(other); !errors.Is(err, ErrRegion) {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
}

// BenchmarkVerifyUncached is the full check a new token pays once.
func BenchmarkVerifyUncached(b *testing.B) {
	tok, _ := Mint(secret, MintOptions{UserID: "u", TokenID: "t", Regions: []string{"us-east"}, TTL: time.Hour})
	v := NewVerifier(secret, "us-east", time.Second)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}

// signRaw signs a header and payload given as JSON text, byte for byte, so
// tests can send what jwt.NewWithClaims would never encode (invalid UTF-8).
func signRaw(t *testing.T, header, payload string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString([]byte(header)) + "." + enc.EncodeToString([]byte(payload))
	sig, err := jwt.SigningMethodHS256.Sign(signing, secret)
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + enc.EncodeToString(sig)
}

// verifyCase is a token and what Verify must say about it: want "" means
// accepted; otherwise ErrInvalid with want in the message.
type verifyCase struct {
	name, token, want string
}

func runVerifyCases(t *testing.T, cases []verifyCase) {
	t.Helper()
	v := NewVerifier(secret, "us-east", 0)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, err := v.Verify(c.token)
			if c.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Verify = %+v, %v; want ErrInvalid saying %q", id, err, c.want)
			}
			if id != nil {
				t.Errorf("identity %+v returned with an invalid token", id)
			}
		})
	}
}

// Identifiers the record store cannot hold are refused, and the refusal
// says why without quoting the value (it goes into the 407 body).
func TestVerifyRefusesUnstorableIDs(t *testing.T) {
	exp := time.Now().Add(time.Hour).Unix()
	tok := func(k string, v any) string {
		c := jwt.MapClaims{"user_id": "u1", "token_id": "t1", "allowed_regions": []string{"*"}, "exp": exp}
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
		return sign(t, jwt.SigningMethodHS256, secret, c)
	}
	long := strings.Repeat("x", MaxIDLen+1)
	runVerifyCases(t, []verifyCase{
		{"token_id of MaxIDLen bytes", tok("token_id", strings.Repeat("x", MaxIDLen)), ""},
		{"user_id of MaxIDLen bytes", tok("user_id", strings.Repeat("x", MaxIDLen)), ""},
		{"no user_id", tok("user_id", nil), ""},
		{"token_id of 60 characters", tok("token_id", strings.Repeat("t", 60)), "token_id is longer than 50 bytes"},
		{"user_id over MaxIDLen", tok("user_id", long), "user_id is longer than 50 bytes"},
		// 26 characters, 52 bytes: the limit is in bytes.
		{"multi-byte token_id", tok("token_id", strings.Repeat("é", 26)), "token_id is longer than 50 bytes"},
		{"numeric token_id of 51 digits", tok("token_id", json.Number("1"+strings.Repeat("0", 50))), "token_id is longer than 50 bytes"},
		{"NUL in token_id", tok("token_id", "a\x00b"), "token_id contains a control character"},
		{"newline in user_id", tok("user_id", "u\n1"), "user_id contains a control character"},
		{"DEL in token_id", tok("token_id", "t\x7f"), "token_id contains a control character"},
		{"C1 control in token_id", tok("token_id", "t\u0085"), "token_id contains a control character"},
		{"empty token_id", tok("token_id", ""), "token_id claim missing"},
		{"null token_id", tok("token_id", json.RawMessage("null")), "token_id claim missing"},
		{"invalid UTF-8 token_id", signRaw(t, `{"alg":"HS256","typ":"JWT"}`,
			fmt.Sprintf("{\"token_id\":\"t\xff\",\"allowed_regions\":[\"*\"],\"exp\":%d}", exp)), "token_id is not valid UTF-8"},
		{"invalid UTF-8 user_id", signRaw(t, `{"alg":"HS256","typ":"JWT"}`,
			fmt.Sprintf("{\"token_id\":\"t\",\"user_id\":\"\xc3(\",\"allowed_regions\":[\"*\"],\"exp\":%d}", exp)), "user_id is not valid UTF-8"},
	})
	v := NewVerifier(secret, "us-east", 0)
	_, err := v.Verify(tok("token_id", "hostile-"+long))
	if err == nil || strings.Contains(err.Error(), "hostile") {
		t.Errorf("error %v quotes the refused value", err)
	}
}

// RFC 7515 §4.1.11: a crit header naming extensions the recipient does not
// understand makes the JWS invalid; Pinaka understands none.
func TestVerifyRefusesCrit(t *testing.T) {
	exp := time.Now().Add(time.Hour).Unix()
	withHeader := func(k string, v any) string {
		tk := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"token_id": "t1", "allowed_regions": []string{"*"}, "exp": exp})
		tk.Header[k] = v
		s, err := tk.SignedString(secret)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	runVerifyCases(t, []verifyCase{
		{"no crit", withHeader("kid", "k1"), ""},
		{"unknown extension", withHeader("crit", []string{"x-ext"}), "crit header names extensions this proxy does not understand"},
		{"registered name", withHeader("crit", []string{"exp"}), "crit header names extensions"},
		{"empty list", withHeader("crit", []string{}), "crit header is not a list of extension names"},
		{"string", withHeader("crit", "x-ext"), "crit header is not a list"},
		{"number in list", withHeader("crit", []any{"x-ext", 1}), "crit header is not a list"},
		{"null", withHeader("crit", nil), "crit header is not a list"},
	})
}

// RFC 7519 §2: NumericDate is a JSON number. golang-jwt's NumericDate also
// takes a string holding a number; Claims does not.
func TestVerifyRefusesNonNumericDates(t *testing.T) {
	now := time.Now()
	exp := now.Add(time.Hour).Unix()
	tok := func(k string, v any) string {
		return sign(t, jwt.SigningMethodHS256, secret,
			jwt.MapClaims{"token_id": "t1", "allowed_regions": []string{"*"}, "exp": exp, k: v})
	}
	runVerifyCases(t, []verifyCase{
		{"numbers", tok("iat", now.Unix()), ""},
		{"fractional exp", tok("exp", float64(exp)+0.5), ""},
		{"string exp", tok("exp", "9999999999"), "exp claim must be a number, not string"},
		{"string nbf", tok("nbf", "0"), "nbf claim must be a number, not string"},
		{"string iat", tok("iat", strconv.FormatInt(now.Unix(), 10)), "iat claim must be a number, not string"},
		{"bool exp", tok("exp", true), "exp claim must be a number, not bool"},
		{"object nbf", tok("nbf", map[string]int{"n": 1}), "nbf claim must be a number, not object"},
		{"array exp", tok("exp", []int64{exp}), "exp claim must be a number, not array"},
		{"null exp", tok("exp", nil), "exp claim missing"},
		// Still decided by the date after the type check.
		{"expired number", tok("exp", now.Add(-time.Hour).Unix()), "token expired"},
	})
}

// A claim of the wrong JSON type is refused by name and kind, never with
// its value, the same on every Go version (Claims.UnmarshalJSON); keys
// still match as encoding/json matches them.
func TestVerifyNamesMistypedClaims(t *testing.T) {
	exp := time.Now().Add(time.Hour).Unix()
	tok := func(c jwt.MapClaims) string { return sign(t, jwt.SigningMethodHS256, secret, c) }
	runVerifyCases(t, []verifyCase{
		{"regions a string", tok(jwt.MapClaims{"token_id": "t1", "allowed_regions": "secret-region", "exp": exp}),
			"allowed_regions claim must be an array, not string"},
		{"number among regions", tok(jwt.MapClaims{"token_id": "t1", "allowed_regions": []any{"*", 7}, "exp": exp}),
			"allowed_regions claim must be a string, not number"},
		{"numeric token_type", tok(jwt.MapClaims{"token_id": "t1", "allowed_regions": []string{"*"}, "token_type": 5, "exp": exp}),
			"token_type claim must be a string, not number"},
		{"numeric iss", tok(jwt.MapClaims{"token_id": "t1", "allowed_regions": []string{"*"}, "iss": 5, "exp": exp}),
			"iss claim must be a string, not number"},
		{"keys in capitals", tok(jwt.MapClaims{"TOKEN_ID": "t1", "Allowed_Regions": []string{"*"}, "exp": exp}), ""},
	})
	_, err := NewVerifier(secret, "us-east", 0).Verify(tok(jwt.MapClaims{"token_id": "t1", "allowed_regions": "secret-region", "exp": exp}))
	if err == nil || strings.Contains(err.Error(), "secret-region") {
		t.Errorf("error %v quotes the refused value", err)
	}
}

// Mint refuses what Verify would refuse, with the same reason.
func TestMintRefusesUnstorableIDs(t *testing.T) {
	for _, c := range []struct {
		o    MintOptions
		want string
	}{
		{MintOptions{TokenID: strings.Repeat("t", 60)}, "token_id is longer than 50 bytes"},
		{MintOptions{TokenID: "t", UserID: strings.Repeat("u", 51)}, "user_id is longer than 50 bytes"},
		{MintOptions{TokenID: "t\x00"}, "token_id contains a control character"},
		{MintOptions{TokenID: "t", UserID: "\xff"}, "user_id is not valid UTF-8"},
	} {
		c.o.TTL, c.o.Regions = time.Hour, []string{"*"}
		if tok, err := Mint(secret, c.o); err == nil || err.Error() != c.want {
			t.Errorf("Mint(%q, %q) = %q, %v; want %q", c.o.TokenID, c.o.UserID, tok, err, c.want)
		}
	}
	tok, err := Mint(secret, MintOptions{TokenID: strings.Repeat("t", MaxIDLen), UserID: strings.Repeat("u", MaxIDLen), TTL: time.Hour, Regions: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewVerifier(secret, "r", 0).Verify(tok); err != nil {
		t.Errorf("ids of MaxIDLen bytes: %v", err)
	}
}
