package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisURL reads an optional Redis URL (redis:// or rediss://, with a
// password and a database number if wanted), checked by the parser the
// client itself uses, so that what passes here also connects the same way.
func (p *parser) redisURL(name string) string {
	v := p.str(name, "")
	if v == "" {
		return ""
	}
	opt, err := redis.ParseURL(v)
	if err == nil {
		// ParseURL leaves the port to the dial; a typo there should stop
		// start-up like any other.
		if _, port, serr := net.SplitHostPort(opt.Addr); serr != nil {
			err = serr
		} else if n, perr := strconv.Atoi(port); perr != nil || n < 1 || n > 65535 {
			err = fmt.Errorf("invalid port %q", port)
		}
	}
	if err != nil {
		// url.Error repeats the whole URL, password included: only its
		// cause is shown, since start-up errors end up in logs.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		p.fail(name, "must be a redis:// or rediss:// URL (redis://[:password@]host:port[/db]): %v", err)
	}
	return v
}

// keyPrefix reads the prefix of fleet mode's Redis keys: short and plain,
// so that keys stay bounded and easy to find with SCAN.
func (p *parser) keyPrefix(name, def string) string {
	v := p.str(name, def)
	if len(v) > 64 {
		p.fail(name, "must be at most 64 bytes, got %d", len(v))
		return def
	}
	for _, r := range v {
		if r <= ' ' || r > '~' {
			p.fail(name, "must be printable ASCII without spaces, got %q", v)
			return def
		}
	}
	return v
}

// durationIn is duration bounded to [min, max].
func (p *parser) durationIn(name string, def, min, max time.Duration) time.Duration {
	d := p.duration(name, def)
	if d < min || d > max {
		p.fail(name, "must be between %s and %s, got %s", min, max, d)
		return def
	}
	return d
}

// Redis reads REDIS_URL and REDIS_KEY_PREFIX alone, checked as serve
// checks them, for commands that publish to the fleet without serving
// (pinaka revoke). url is "" when REDIS_URL is not set.
func Redis(lookup Lookup) (url, prefix string, err error) {
	p := parser{lookup: lookup}
	url = p.redisURL("REDIS_URL")
	prefix = p.keyPrefix("REDIS_KEY_PREFIX", "pinaka:")
	return url, prefix, errors.Join(p.errs...)
}
