package config

import (
	"strings"
	"testing"
	"time"
)

func TestRevocationSettings(t *testing.T) {
	for _, c := range []struct {
		name     string
		vars     map[string]string
		url      string
		interval time.Duration
	}{
		{"off without a backend", nil, "", 10 * time.Second},
		{"default from BACKEND_URL", map[string]string{"BACKEND_URL": "https://backend.example/"},
			"https://backend.example/api/forward-proxy/revocations", 10 * time.Second},
		{"explicit URL and interval", map[string]string{"BACKEND_URL": "https://backend.example",
			"REVOCATION_URL": "http://127.0.0.1:8080/revoked", "REVOCATION_INTERVAL": "3s"},
			"http://127.0.0.1:8080/revoked", 3 * time.Second},
		{"off despite BACKEND_URL", map[string]string{"BACKEND_URL": "https://backend.example", "REVOCATION_URL": "off"},
			"", 10 * time.Second},
		{"interval in seconds", map[string]string{"REVOCATION_URL": "https://r.example/x", "REVOCATION_INTERVAL": "30"},
			"https://r.example/x", 30 * time.Second},
	} {
		cfg, err := Load(lookupOf(c.vars), true)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if cfg.RevocationURL != c.url || cfg.RevocationInterval != c.interval {
			t.Errorf("%s: url %q interval %v, want %q %v", c.name, cfg.RevocationURL, cfg.RevocationInterval, c.url, c.interval)
		}
	}
}

func TestRevocationSettingsRefused(t *testing.T) {
	for _, c := range []struct{ name, value, want string }{
		{"REVOCATION_URL", "ftp://backend/revoked", "REVOCATION_URL must be an http:// or https:// URL"},
		{"REVOCATION_URL", "backend:8080", "REVOCATION_URL must be an http:// or https:// URL"},
		{"REVOCATION_URL", "http://", "REVOCATION_URL must be an http:// or https:// URL"},
		{"REVOCATION_INTERVAL", "500ms", "REVOCATION_INTERVAL must be at least 1s"},
		{"REVOCATION_INTERVAL", "0", "REVOCATION_INTERVAL must be at least 1s"},
		{"REVOCATION_INTERVAL", "often", "REVOCATION_INTERVAL must be a duration"},
		{"REVOCATION_INTERVAL", "-5", "REVOCATION_INTERVAL must not be negative"},
	} {
		_, err := Load(lookupOf(map[string]string{c.name: c.value}), true)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s=%q: error %v, want %q", c.name, c.value, err, c.want)
		}
	}
}
