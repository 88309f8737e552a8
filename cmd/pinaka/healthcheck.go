package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// healthcheck asks the admin listener's /readyz and exits 0 only on 200.
// Container images without a shell or curl (ours is FROM scratch) use it
// as their HEALTHCHECK command.
func healthcheck(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("healthcheck", stderr)
	path := fs.String("path", "/readyz", "admin path to check (/readyz or /healthz)")
	timeout := fs.Duration("timeout", 3*time.Second, "give up after this long")
	lookup, err := parseWithEnv(fs, args)
	if err != nil {
		return err
	}
	addr, ok := lookup("ADMIN_ADDR")
	if !ok || addr == "" {
		addr = "127.0.0.1:9090"
	}
	if addr == "off" {
		return fmt.Errorf("ADMIN_ADDR is off: nothing to check")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("ADMIN_ADDR %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1" // listening everywhere: ask over loopback
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	url := "http://" + net.JoinHostPort(host, port) + *path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s %s", url, resp.Status, body)
	}
	fmt.Fprintf(stdout, "%s", body)
	return nil
}
