package main

import (
	"fmt"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/config"
)

// clientCertRows adds the client certificate settings to check-config's
// table: the mode, the CAs and the CRLs with their next update (a stale
// CRL is still enforced, so it is worth seeing before a deploy).
func clientCertRows(cfg *config.Config, row func(string, any)) {
	row("CLIENT_CERT_MODE", cfg.ClientCertMode)
	t := cfg.ClientTrust
	if t == nil {
		row("CLIENT_CA_PATH", orNone(cfg.ClientCAPath))
		row("CLIENT_CRL_PATH", orNone(cfg.ClientCRLPath))
		return
	}
	row("CLIENT_CA_PATH", fmt.Sprintf("%s (%d CAs)", cfg.ClientCAPath, t.CAs()))
	if cfg.ClientCRLPath == "" {
		row("CLIENT_CRL_PATH", orNone(""))
		return
	}
	lists, entries := t.CRLs()
	next := "no nextUpdate"
	if nu := t.NextUpdate(); !nu.IsZero() {
		next = "next update " + nu.UTC().Format(time.RFC3339)
		if time.Now().After(nu) {
			next += " (PASSED: publish a fresh CRL; it is still enforced)"
		}
	}
	row("CLIENT_CRL_PATH", fmt.Sprintf("%s (%d CRLs, %d revoked serials, %s)", cfg.ClientCRLPath, lists, entries, next))
}
