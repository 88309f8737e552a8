package config

import (
	"strings"
	"testing"
	"time"
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

// CONNECT-UDP's settings: the documented defaults, and each variable
// named when it is wrong.
func TestConnectUDPSettings(t *testing.T) {
	load := func(vars map[string]string) (*Config, error) { return Load(lookupOf(vars), true) }
	c, err := load(nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.AllowedUDPPorts.String() != DefaultAllowedUDPPorts || c.MaxUDPFlowsPerToken != 128 || c.UDPIdleTimeout != 2*time.Minute {
		t.Fatalf("defaults: %s %d %v", c.AllowedUDPPorts, c.MaxUDPFlowsPerToken, c.UDPIdleTimeout)
	}
	for _, p := range []uint16{53, 443, 1024, 3478, 65535} {
		if !c.AllowedUDPPorts.Contains(p) {
			t.Errorf("default ALLOWED_UDP_PORTS refuses %d", p)
		}
	}
	for _, p := range []uint16{19, 123, 161, 389, 514, 1023} {
		if c.AllowedUDPPorts.Contains(p) {
			t.Errorf("default ALLOWED_UDP_PORTS allows %d", p)
		}
	}
	c, err = load(map[string]string{"ALLOWED_UDP_PORTS": "443", "MAX_UDP_FLOWS_PER_TOKEN": "4", "UDP_IDLE_TIMEOUT": "30s"})
	if err != nil || c.AllowedUDPPorts.Contains(53) || !c.AllowedUDPPorts.Contains(443) || c.MaxUDPFlowsPerToken != 4 || c.UDPIdleTimeout != 30*time.Second {
		t.Fatalf("set: %+v, %v", c, err)
	}
	for k, v := range map[string]string{"ALLOWED_UDP_PORTS": "0", "MAX_UDP_FLOWS_PER_TOKEN": "0", "UDP_IDLE_TIMEOUT": "0"} {
		if _, err := load(map[string]string{k: v}); err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("%s=%s: %v, want an error naming it", k, v, err)
		}
	}
}
