// Command pinaka is a forward proxy for browser traffic: TLS, HTTP/2 and
// HTTP/1.1 CONNECT, RFC 8441 WebSockets, plain HTTP forwarding, JWT
// authentication, per-token rate limits, SSRF-safe egress and shipped
// request records. This file is flags, subcommands and wiring only.
package main

import (
	// First: enables RFC 8441 before net/http initialises.

	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/auth"
	"github.com/pinaka-proxy/pinaka/internal/collector"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/selfsigned"
	"github.com/pinaka-proxy/pinaka/internal/server"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

const usage = `pinaka — a forward proxy for browser traffic

Usage:
  pinaka serve [--dev] [--env-file FILE]   run the proxy
  pinaka token [flags]                     mint a JWT with JWT_SECRET, or --key FILE
  pinaka keygen --alg ALG [--out FILE]     write a signing key, print its public JWKS
  pinaka collector [--env-file FILE]       run the reference log backend (PostgreSQL)
  pinaka revoke --token-id T [--until TIME] | --list | --remove T
                                           revoke token ids (DATABASE_URL)
  pinaka check-config [--env-file FILE]    validate the configuration and print it
  pinaka healthcheck [--path /readyz]      exit 0 if the admin listener says ready (for containers)
  pinaka version                           print the version

Configuration comes from the environment and an optional .env file (the
environment wins). See README.md and deploy/pinaka.env.example.
Run "pinaka COMMAND --help" for a command's flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "serve":
		err = serve(rest, stdout, stderr)
	case "token":
		err = token(rest, stdout, stderr)
	case "keygen":
		err = keygen(rest, stdout, stderr)
	case "collector":
		err = runCollector(rest, stderr)
	case "revoke":
		err = revoke(rest, stdout, stderr)
	case "check-config":
		err = checkConfig(rest, stdout, stderr)
	case "healthcheck":
		err = healthcheck(rest, stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "pinaka", buildVersion())
		return 0
	case "help", "--help", "-h":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "pinaka: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "pinaka %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// loadConfig reads the environment plus the .env file named by --env-file
// (default ./.env, optional).
func loadConfig(envFile string, envFileSet, dev bool) (*config.Config, error) {
	lookup, err := config.EnvWithDotEnv(envFile, envFileSet)
	if err != nil {
		return nil, err
	}
	return config.Load(lookup, dev)
}

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l}))
}

func envFileFlag(fs *flag.FlagSet) *string {
	return fs.String("env-file", ".env", "read variables from this .env file (the environment wins)")
}

// parseWithEnv adds --env-file, parses args and returns the environment
// lookup backed by that file.
func parseWithEnv(fs *flag.FlagSet, args []string) (config.Lookup, error) {
	envFile := envFileFlag(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return config.EnvWithDotEnv(*envFile, isSet(fs, "env-file"))
}

func flagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("pinaka "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func serve(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("serve", stderr)
	dev := fs.Bool("dev", false, "developer mode: loopback, generated certificate and secret, prints a token")
	envFile := envFileFlag(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := loadConfig(*envFile, isSet(fs, "env-file"), *dev)
	if err != nil {
		return err
	}
	// Unbuffered on purpose: slog writes each line with one Write, so a
	// record line is in the kernel (the pipe, journald, the file) as soon as
	// its request finishes, and a kill -9 cannot take it. The log is the copy
	// of the records that survives any shipping loss; the batched writer
	// used before lost up to 100 ms of lines.
	log := newLogger(stderr, cfg.LogLevel)

	if cfg.Dev && len(cfg.JWTSecret) == 0 {
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		cfg.JWTSecret = []byte(hex.EncodeToString(b))
	}
	// A configured pair is used, in dev mode too; only dev mode without one
	// generates a certificate (config refuses production without a pair).
	var certs *server.CertStore
	if cfg.TLSCertPath != "" {
		if certs, err = server.LoadCertStore(cfg.TLSCertPath, cfg.TLSKeyPath); err != nil {
			return fmt.Errorf("TLS_CERT_PATH/TLS_KEY_PATH: %w", err)
		}
	} else {
		c, _, _, err := selfsigned.Cert(7 * 24 * time.Hour)
		if err != nil {
			return err
		}
		certs = server.StaticCertStore(c)
	}
	if cfg.ProbeNodeRegion == "" {
		log.Warn("PROBE_NODE_REGION is empty: only tokens with allowed_regions [\"*\"] are accepted")
	}

	// Signals are caught before the listener opens: a SIGHUP from a
	// certificate renewal right after boot must reload, not kill.
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	// An early return (a JWKS_URL that cannot be fetched) must not leave
	// the signals caught with nobody reading them.
	defer signal.Stop(sig)

	app, err := server.NewApp(cfg, log, server.AppOptions{Certs: certs})
	if err != nil {
		return err
	}
	if err := app.Start(); err != nil {
		return err
	}
	if cfg.Dev {
		printDevBanner(stdout, cfg, app.Server.ProxyAddr().String())
	}

	for s := range sig {
		if s == syscall.SIGHUP {
			// Each logs its own outcome; a refusal keeps the old state.
			_ = app.Server.Reload()
			_ = app.ReloadKeys()
			_ = app.ReloadBackendTLS()
			_ = app.ReloadClientCerts()
			continue
		}
		log.Info("signal received, shutting down", "signal", s.String(), "timeout", cfg.ShutdownTimeout.String())
		break
	}
	// Signals stay caught until exit: a certificate renewal's SIGHUP or a
	// second SIGTERM during the drain must not kill the process before the
	// records are flushed.
	go func() {
		for s := range sig {
			log.Warn("signal ignored: already shutting down", "signal", s.String())
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := app.Shutdown(ctx); err != nil {
		// A drain that hit its deadline is still a clean exit: the
		// operator chose SHUTDOWN_TIMEOUT.
		log.Warn("shutdown finished with errors", "err", err)
	}
	log.Info("stopped")
	return nil
}

func printDevBanner(w io.Writer, cfg *config.Config, addr string) {
	tok, err := auth.Mint(cfg.JWTSecret, auth.MintOptions{
		UserID: "dev", TokenID: "dev", Regions: []string{"*"}, TTL: 24 * time.Hour,
	})
	if err != nil {
		fmt.Fprintln(w, "minting dev token:", err)
		return
	}
	fmt.Fprintf(w, `
Pinaka is running in developer mode on https://%[1]s (self-signed certificate, in-memory secret).
Token (24h, user "dev", all regions):

  %[2]s

Try it:

  curl -p --proxy https://%[1]s --proxy-insecure --proxy-header "Proxy-Authorization: Bearer %[2]s" https://example.com/

Private and loopback destinations are refused; set EGRESS_ALLOW_CIDRS=127.0.0.0/8 to reach local test servers.
JWT_SECRET for "pinaka token": %[3]s

`, addr, tok, cfg.JWTSecret)
}

func token(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("token", stderr)
	user := fs.String("user", "", fmt.Sprintf("user_id claim (at most %d bytes)", auth.MaxIDLen))
	tokenID := fs.String("token-id", "", fmt.Sprintf("token_id claim (required; used for rate limiting; at most %d bytes)", auth.MaxIDLen))
	regions := fs.String("regions", "", `allowed_regions, comma-separated ("*" for all)`)
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	tokenType := fs.String("type", "", `token_type claim: "manual" or "session" (optional)`)
	alg := fs.String("alg", "", "HS256 (default), HS384 or HS512; with --key, one fitting the key (default: RS256, ES256/384/512 by curve, EdDSA)")
	keyFile := fs.String("key", "", "sign with this PEM private key instead of JWT_SECRET")
	kid := fs.String("kid", "", "with --key: the kid header (default: the key's RFC 7638 thumbprint, as the verifier derives for PEM keys)")
	lookup, err := parseWithEnv(fs, args)
	if err != nil {
		return err
	}
	var signer crypto.Signer
	var secret string
	if *keyFile != "" {
		b, err := os.ReadFile(*keyFile)
		if err != nil {
			return fmt.Errorf("--key: %w", err)
		}
		if signer, err = auth.ParsePrivateKeyPEM(b); err != nil {
			return fmt.Errorf("--key %s: %w", *keyFile, err)
		}
		if *kid == "" {
			if *kid, err = auth.KeyID(signer.Public()); err != nil {
				return fmt.Errorf("--key %s: deriving kid: %w", *keyFile, err)
			}
		}
	} else {
		if *kid != "" {
			return errors.New("--kid needs --key (HMAC tokens carry no kid)")
		}
		secret, _ = lookup("JWT_SECRET")
		if len(secret) < config.MinSecretBytes {
			return fmt.Errorf("JWT_SECRET must be set and at least %d bytes (or sign with --key FILE)", config.MinSecretBytes)
		}
	}
	if *tokenID == "" {
		return errors.New("--token-id is required")
	}
	// The proxy refuses ids its record store cannot hold (auth.CheckID):
	// say so here instead of printing a token that never works.
	for _, f := range []struct{ flag, claim, v string }{{"--token-id", "token_id", *tokenID}, {"--user", "user_id", *user}} {
		if err := auth.CheckID(f.claim, f.v); err != nil {
			return fmt.Errorf("%s: %w", f.flag, err)
		}
	}
	var rs []string
	for _, r := range strings.Split(*regions, ",") {
		if r = strings.TrimSpace(r); r != "" {
			rs = append(rs, r)
		}
	}
	if len(rs) == 0 {
		return errors.New(`--regions is required (a token without regions is allowed nowhere; "*" means every region)`)
	}
	o := auth.MintOptions{
		UserID: *user, TokenID: *tokenID, TokenType: *tokenType, Regions: rs, TTL: *ttl, Algorithm: *alg,
	}
	var tok string
	if signer != nil {
		tok, err = auth.MintWithKey(signer, *kid, o)
	} else {
		tok, err = auth.Mint([]byte(secret), o)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

// keygen writes a new signing key (PKCS#8 PEM, mode 0600, never over an
// existing file) and prints its public half as a JWKS document with kid and
// alg: the file to give the proxies as JWT_PUBLIC_KEYS, or to merge into
// the one they have.
func keygen(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("keygen", stderr)
	alg := fs.String("alg", "ES256", "ES256, EdDSA or RS256")
	out := fs.String("out", "pinaka-signing-key.pem", "write the private key here (must not exist)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var key crypto.Signer
	var err error
	switch *alg {
	case "ES256":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "EdDSA":
		_, key, err = ed25519.GenerateKey(rand.Reader)
	case "RS256":
		key, err = rsa.GenerateKey(rand.Reader, 3072)
	default:
		return fmt.Errorf("--alg must be ES256, EdDSA or RS256, got %q", *alg)
	}
	if err != nil {
		return fmt.Errorf("generating %s key: %w", *alg, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding private key: %w", err)
	}
	kid, err := auth.KeyID(key.Public())
	if err != nil {
		return fmt.Errorf("deriving kid: %w", err)
	}
	jwks, err := auth.MarshalJWKS([]auth.PublicKey{{ID: kid, Key: key.Public(), Alg: *alg}})
	if err != nil {
		return fmt.Errorf("encoding JWKS: %w", err)
	}
	// O_EXCL: overwriting a signing key in use would orphan every token it
	// signed, and 0600 because it is a credential.
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", *out, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", *out, err)
	}
	fmt.Fprintf(stderr, "private key written to %s (kid %s); the public JWKS follows on stdout\n", *out, kid)
	fmt.Fprintf(stdout, "%s\n", jwks)
	return nil
}

func runCollector(args []string, stderr io.Writer) error {
	fs := flagSet("collector", stderr)
	lookup, err := parseWithEnv(fs, args)
	if err != nil {
		return err
	}
	cfg, err := collector.LoadConfig(lookup)
	if err != nil {
		return err
	}
	level, _ := lookup("LOG_LEVEL")
	if level == "" {
		level = "info"
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// SIGHUP re-reads the collector's certificate and client CA bundle.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	cfg.Reload = hup
	return collector.Run(ctx, cfg, newLogger(stderr, level))
}
