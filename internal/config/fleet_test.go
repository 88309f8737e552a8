package config

import (
	"strings"
	"testing"
	"time"
)

func TestFleetDefaultsAndValues(t *testing.T) {
	c, err := Load(lookupOf(nil), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.RedisURL != "" || c.RedisKeyPrefix != "pinaka:" || c.RedisTimeout != 50*time.Millisecond ||
		c.FleetSize != 1 || c.TunnelLeaseTTL != 30*time.Second {
		t.Errorf("fleet defaults: url=%q prefix=%q timeout=%v size=%d ttl=%v",
			c.RedisURL, c.RedisKeyPrefix, c.RedisTimeout, c.FleetSize, c.TunnelLeaseTTL)
	}
	for _, u := range []string{"redis://127.0.0.1:6379/0", "rediss://:pw@redis.internal:6380/2", "redis://user:pw@127.0.0.1"} {
		c, err := Load(lookupOf(map[string]string{"REDIS_URL": u, "REDIS_KEY_PREFIX": "eu-west:",
			"REDIS_TIMEOUT": "100ms", "FLEET_SIZE": "3", "TUNNEL_LEASE_TTL": "10s"}), true)
		if err != nil {
			t.Fatalf("%s: %v", u, err)
		}
		if c.RedisURL != u || c.RedisKeyPrefix != "eu-west:" || c.RedisTimeout != 100*time.Millisecond ||
			c.FleetSize != 3 || c.TunnelLeaseTTL != 10*time.Second {
			t.Errorf("%s: %+v", u, c)
		}
	}
}

func TestFleetInvalidValuesNameTheVariable(t *testing.T) {
	for name, value := range map[string]string{
		"REDIS_URL":        "http://127.0.0.1:6379",
		"REDIS_KEY_PREFIX": "has space",
		"REDIS_TIMEOUT":    "0",
		"FLEET_SIZE":       "0",
		"TUNNEL_LEASE_TTL": "1s",
	} {
		_, err := Load(lookupOf(map[string]string{name: value}), true)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%s=%q: error %v does not name it", name, value, err)
		}
	}
	for _, u := range []string{"redis://:s3cret@127.0.0.1:6379/notadb", "redis://:s3cret@[::1", "redis://:s3cret@host:99999999"} {
		_, err := Load(lookupOf(map[string]string{"REDIS_URL": u}), true)
		if err == nil || !strings.Contains(err.Error(), "REDIS_URL") {
			t.Errorf("%q accepted or not named: %v", u, err)
		} else if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("the error shows the password: %v", err)
		}
	}
}
