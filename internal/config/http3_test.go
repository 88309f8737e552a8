package config

import (
	"strings"
	"testing"
)

func TestHTTP3Enabled(t *testing.T) {
	load := func(vars map[string]string) (*Config, error) { return Load(lookupOf(vars), true) }
	c, err := load(nil)
	if err != nil || c.HTTP3Enabled {
		t.Fatalf("default: enabled %v, %v", c.HTTP3Enabled, err)
	}
	for _, v := range []string{"true", "1", "TRUE"} {
		c, err = load(map[string]string{"HTTP3_ENABLED": v})
		if err != nil || !c.HTTP3Enabled {
			t.Fatalf("HTTP3_ENABLED=%s: enabled %v, %v", v, c.HTTP3Enabled, err)
		}
	}
	c, err = load(map[string]string{"HTTP3_ENABLED": "false"})
	if err != nil || c.HTTP3Enabled {
		t.Fatalf("HTTP3_ENABLED=false: enabled %v, %v", c.HTTP3Enabled, err)
	}
	_, err = load(map[string]string{"HTTP3_ENABLED": "maybe"})
	if err == nil || !strings.Contains(err.Error(), "HTTP3_ENABLED") {
		t.Fatalf("HTTP3_ENABLED=maybe: %v, want an error naming the variable", err)
	}
}
