package config

// loadHTTP3 reads HTTP3_ENABLED. HTTP/3 is off by default: few clients
// speak HTTP/3 to a proxy yet, and it opens a UDP port that firewalls must
// allow on purpose.
func loadHTTP3(p *parser, c *Config) {
	c.HTTP3Enabled = p.bool("HTTP3_ENABLED", false)
}
