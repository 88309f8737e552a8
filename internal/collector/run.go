package collector

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Run connects to PostgreSQL, migrates the schema and serves until ctx is
// done, then shuts down gracefully within cfg.ShutdownTimeout.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	if cfg.tls == nil {
		t, err := loadServerTLS(cfg.TLSCertPath, cfg.TLSKeyPath, cfg.ClientCAPath)
		if err != nil {
			return err
		}
		cfg.tls = t
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("listening on COLLECTOR_ADDR %s: %w", cfg.Addr, err)
	}
	return serve(ctx, cfg, log, ln)
}

// serve is Run on a given listener; it closes ln.
func serve(ctx context.Context, cfg Config, log *slog.Logger, ln net.Listener) error {
	defer ln.Close()
	pool, err := pgxpool.New(ctx, cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("connecting to DATABASE_URL: %w", err)
	}
	defer pool.Close()
	if err := Migrate(ctx, pool); err != nil {
		return err
	}
	m := newCollectorMetrics()
	cfg.tls.setMetrics(m)
	parts := newPartitions(pool, cfg.RetentionDays, nil)
	// The writers outlive the HTTP server's graceful shutdown, which waits
	// for the requests they serve.
	wctx, stopWriters := context.WithCancel(context.Background())
	defer stopWriters()
	switch {
	case cfg.APIKey == "" && cfg.tls.requireNode():
		log.Info("accepting batches from node certificates alone (no COLLECTOR_API_KEY)")
	case cfg.APIKey == "":
		log.Warn("COLLECTOR_INSECURE_NO_AUTH: accepting batches without an API key")
	}
	srv := &http.Server{
		Handler:           newHandlerParts(pool, cfg.APIKey, log, cfg.tls, m, parts, startWriters(wctx, parts, cfg.writers(), log)),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       2 * time.Minute,
		WriteTimeout:      2 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          stdlog.New(newErrorLog(log, m), "", 0),
	}
	pctx, stopPruner := context.WithCancel(ctx)
	defer stopPruner()
	go runPruner(pctx, pool, log)
	go runMaintenance(pctx, parts, log, m.maintenanceFailures)
	errc := make(chan error, 1)
	if cfg.tls != nil {
		srv.TLSConfig = cfg.tls.config()
		go func() { errc <- srv.ServeTLS(ln, "", "") }()
	} else {
		go func() { errc <- srv.Serve(ln) }()
	}
	log.Info("collector listening", "addr", ln.Addr().String(), "tls", cfg.tls != nil, "node_certificates", cfg.tls.requireNode())

	for done := false; !done; {
		select {
		case err := <-errc:
			return fmt.Errorf("serving on %s: %w", ln.Addr(), err)
		case <-cfg.Reload:
			// Logged and counted by Reload; a refusal keeps the old files.
			if cfg.tls == nil {
				log.Info("SIGHUP: nothing to reload (no COLLECTOR_TLS_CERT_PATH)")
				continue
			}
			_ = cfg.tls.Reload(log)
		case <-ctx.Done():
			done = true
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	err = srv.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		return fmt.Errorf("serving on %s: %w", ln.Addr(), serr)
	}
	if err != nil {
		srv.Close()
		return fmt.Errorf("shutting down the collector: %w", err)
	}
	log.Info("collector stopped")
	return nil
}
