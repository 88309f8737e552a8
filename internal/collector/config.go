// Package collector is Pinaka's reference record backend: it accepts the
// batches the proxies ship and stores them in PostgreSQL, once per batch_id.
package collector

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

// Config is the collector's configuration.
type Config struct {
	Addr        string // COLLECTOR_ADDR
	APIKey      string // COLLECTOR_API_KEY, else BACKEND_API_KEY
	DatabaseURL string // DATABASE_URL

	// InsecureNoAuth (COLLECTOR_INSECURE_NO_AUTH) allows running without an
	// API key. It must be asked for: a collector open to anyone lets anyone
	// write records.
	InsecureNoAuth bool

	ShutdownTimeout time.Duration // SHUTDOWN_TIMEOUT

	// TLS and node certificates: COLLECTOR_TLS_CERT_PATH and
	// COLLECTOR_TLS_KEY_PATH make the collector speak HTTPS;
	// COLLECTOR_CLIENT_CA_PATH then requires a node certificate from those
	// CAs on every connection and binds each batch to the node it names.
	TLSCertPath, TLSKeyPath, ClientCAPath string
	// Reload, when not nil, delivers SIGHUP: the TLS files are re-read.
	// cmd/pinaka sets it; it is not read from the environment.
	Reload <-chan os.Signal
	tls    *serverTLS // loaded by LoadConfig, else by Run

	// RetentionDays (RECORDS_RETENTION_DAYS) drops the day partitions of
	// records older than this many days; 0 keeps everything.
	RetentionDays int
	// Writers (COLLECTOR_WRITERS) is how many transactions store batches
	// at once (writers.go); 0 means DefaultWriters.
	Writers int
}

func (c Config) writers() int {
	if c.Writers <= 0 {
		return DefaultWriters
	}
	return c.Writers
}

// LoadConfig reads the collector's variables. Every problem is reported,
// each naming its variable.
func LoadConfig(lookup config.Lookup) (Config, error) {
	var errs []error
	get := func(name, def string) string {
		if v, ok := lookup(name); ok && strings.TrimSpace(v) != "" {
			return strings.TrimSpace(v)
		}
		return def
	}
	c := Config{
		Addr:   get("COLLECTOR_ADDR", "127.0.0.1:8080"),
		APIKey: get("COLLECTOR_API_KEY", get("BACKEND_API_KEY", "")),
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		errs = append(errs, fmt.Errorf("COLLECTOR_ADDR must be host:port, got %q", c.Addr))
	}
	var err error
	if c.DatabaseURL, err = DatabaseURL(lookup); err != nil {
		errs = append(errs, err)
	}
	switch v := strings.ToLower(get("COLLECTOR_INSECURE_NO_AUTH", "false")); v {
	case "1", "true", "yes", "on":
		c.InsecureNoAuth = true
	case "0", "false", "no", "off":
	default:
		errs = append(errs, fmt.Errorf("COLLECTOR_INSECURE_NO_AUTH must be true or false, got %q", v))
	}
	c.ShutdownTimeout = 30 * time.Second
	if v := get("SHUTDOWN_TIMEOUT", ""); v != "" {
		d, err := parseDuration(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("SHUTDOWN_TIMEOUT must be a duration like 30s or a number of seconds, got %q", v))
		} else {
			c.ShutdownTimeout = d
		}
	}
	if err := c.loadTLS(get); err != nil {
		errs = append(errs, err)
	}
	if err := c.loadScale(get); err != nil {
		errs = append(errs, err)
	}
	if err := c.validate(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	return c, nil
}

// DatabaseURL reads and checks DATABASE_URL, for the collector and for
// `pinaka revoke`, which writes the same database.
func DatabaseURL(lookup config.Lookup) (string, error) {
	v, _ := lookup("DATABASE_URL")
	v = strings.TrimSpace(v)
	if v == "" {
		return "", errors.New("DATABASE_URL is required (postgres://user:password@host:5432/db)")
	}
	if _, err := pgxpool.ParseConfig(v); err != nil {
		return "", fmt.Errorf("DATABASE_URL is invalid: %w", err)
	}
	return v, nil
}

func (c Config) validate() error {
	// A node certificate is a credential of its own: with a client CA the
	// API key is optional (and checked too when set).
	if c.APIKey == "" && !c.InsecureNoAuth && c.ClientCAPath == "" {
		return errors.New("COLLECTOR_API_KEY is required (or COLLECTOR_CLIENT_CA_PATH for node certificates, or set COLLECTOR_INSECURE_NO_AUTH=true to accept batches from anyone)")
	}
	return nil
}

func parseDuration(v string) (time.Duration, error) {
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("invalid duration %q", v)
	}
	return d, nil
}

// loadTLS reads the TLS variables and loads their files, so that a missing
// or malformed file stops start-up naming its variable.
func (c *Config) loadTLS(get func(name, def string) string) error {
	c.TLSCertPath = get("COLLECTOR_TLS_CERT_PATH", "")
	c.TLSKeyPath = get("COLLECTOR_TLS_KEY_PATH", "")
	c.ClientCAPath = get("COLLECTOR_CLIENT_CA_PATH", "")
	t, err := loadServerTLS(c.TLSCertPath, c.TLSKeyPath, c.ClientCAPath)
	if err != nil {
		return err
	}
	c.tls = t
	return nil
}

// maxRetentionDays bounds RECORDS_RETENTION_DAYS (about 270 years): a
// larger value is a typo, not a policy.
const maxRetentionDays = 100000

// loadScale reads the collector-at-scale variables: RECORDS_RETENTION_DAYS
// (unset, empty or 0 keeps every record) and COLLECTOR_WRITERS.
func (c *Config) loadScale(get func(name, def string) string) error {
	var errs []error
	if v := get("RECORDS_RETENTION_DAYS", ""); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > maxRetentionDays {
			errs = append(errs, fmt.Errorf("RECORDS_RETENTION_DAYS must be a whole number of days from 0 (keep everything) to %d, got %q", maxRetentionDays, v))
		}
		c.RetentionDays = n
	}
	c.Writers = DefaultWriters
	if v := get("COLLECTOR_WRITERS", ""); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxWriters {
			errs = append(errs, fmt.Errorf("COLLECTOR_WRITERS must be a whole number from 1 to %d, got %q", maxWriters, v))
		}
		c.Writers = n
	}
	return errors.Join(errs...)
}
