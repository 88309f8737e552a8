package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pinaka-proxy/pinaka/internal/collector"
	"github.com/pinaka-proxy/pinaka/internal/config"
	"github.com/pinaka-proxy/pinaka/internal/fleet"
)

// revokeTimeout bounds the whole command: connect, migrate, one change.
const revokeTimeout = 30 * time.Second

// revoke adds, lists or removes revoked token ids in the collector's
// database (DATABASE_URL, as `pinaka collector` reads it). It writes the
// database rather than calling the collector: the collector then needs no
// write endpoint, so a node's API key, which every proxy holds, cannot
// revoke or un-revoke anything, and revoking works while the collector
// is down. The proxies see the change at their next poll; with REDIS_URL
// it is also published on the fleet's channel after the commit, and the
// nodes connected to Redis apply it at once.
func revoke(args []string, stdout, stderr io.Writer) error {
	fs := flagSet("revoke", stderr)
	tokenID := fs.String("token-id", "", "revoke this token_id")
	until := fs.String("until", "", "with --token-id: the revocation ends then (RFC 3339 time, or a duration from now such as 720h); default: until removed. Set it to the token's exp at the latest.")
	reason := fs.String("reason", "", "with --token-id: why (kept in the database)")
	list := fs.Bool("list", false, "list the revoked token ids")
	remove := fs.String("remove", "", "remove this token_id from the revoked ids")
	lookup, err := parseWithEnv(fs, args)
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	modes := 0
	for _, set := range []bool{*tokenID != "", *list, *remove != ""} {
		if set {
			modes++
		}
	}
	if modes != 1 {
		return errors.New("give exactly one of --token-id T, --list, --remove T")
	}
	if (*until != "" || *reason != "") && *tokenID == "" {
		return errors.New("--until and --reason go with --token-id")
	}
	now := time.Now()
	var end *time.Time
	if *until != "" {
		t, err := parseUntil(*until, now)
		if err != nil {
			return err
		}
		end = &t
	}
	dsn, err := collector.DatabaseURL(lookup)
	if err != nil {
		return err
	}
	// Checked before the database is touched: a typo must not leave a
	// revocation that was never published.
	redisURL, redisPrefix, err := config.Redis(lookup)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), revokeTimeout)
	defer cancel()
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return fmt.Errorf("connecting to DATABASE_URL: %w", err)
	}
	defer pool.Close()
	// The table may not exist yet (no collector has started on this
	// database); Migrate is idempotent.
	if err := collector.Migrate(ctx, pool); err != nil {
		return err
	}
	switch {
	case *list:
		rs, err := collector.ListRevocations(ctx, pool)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TOKEN_ID\tREVOKED_AT\tUNTIL\tSTATE\tREASON")
		for _, r := range rs {
			u, state := "-", "active"
			if r.Until != nil {
				u = r.Until.UTC().Format(time.RFC3339)
			}
			if r.Expired(now) {
				state = "expired"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.TokenID, r.RevokedAt.UTC().Format(time.RFC3339), u, state, r.Reason)
		}
		return tw.Flush()
	case *remove != "":
		found, err := collector.Unrevoke(ctx, pool, *remove)
		if err != nil {
			return fmt.Errorf("--remove: %w", err)
		}
		if !found {
			return fmt.Errorf("--remove: token_id %q is not revoked", *remove)
		}
		fmt.Fprintf(stdout, "token_id %q is no longer revoked (proxies allow it again after their next poll)\n", *remove)
		publishRevocation(redisURL, redisPrefix, fleet.RevocationMessage{TokenID: *remove, Remove: true}, stdout, stderr)
		return nil
	}
	if end != nil && !end.After(now) {
		return fmt.Errorf("--until %s is in the past", *until)
	}
	if err := collector.Revoke(ctx, pool, *tokenID, end, *reason); err != nil {
		return fmt.Errorf("--token-id: %w", err)
	}
	msg := fmt.Sprintf("token_id %q revoked", *tokenID)
	if end != nil {
		msg += " until " + end.UTC().Format(time.RFC3339)
	}
	fmt.Fprintln(stdout, msg+" (proxies refuse it and close its tunnels within one REVOCATION_INTERVAL)")
	m := fleet.RevocationMessage{TokenID: *tokenID}
	if end != nil {
		m.Until = *end
	}
	publishRevocation(redisURL, redisPrefix, m, stdout, stderr)
	return nil
}

// publishTimeout bounds publishing on Redis, connection included.
const publishTimeout = 5 * time.Second

// publishRevocation announces a change already committed to the database
// on the fleet's Redis channel (REDIS_URL), so that the nodes connected to
// it apply it at once. It is the fast path only: a failure is a warning,
// not a failed command, since every node still gets the change at its next
// poll of REVOCATION_URL.
func publishRevocation(redisURL, prefix string, m fleet.RevocationMessage, stdout, stderr io.Writer) {
	if redisURL == "" {
		return
	}
	client, err := fleet.NewClient(redisURL)
	if err == nil {
		defer client.Close()
		ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
		defer cancel()
		var n int64
		n, err = fleet.NewRevocations(client, prefix, nil, nil).Publish(ctx, m)
		if err == nil {
			fmt.Fprintf(stdout, "published on Redis to %d node(s): they apply it at once\n", n)
			return
		}
	}
	fmt.Fprintf(stderr, "warning: publishing on REDIS_URL failed (%v); the change is stored, and proxies apply it at their next poll of REVOCATION_URL\n", err)
}

// parseUntil reads --until: an RFC 3339 time or a duration from now.
func parseUntil(v string, now time.Time) (time.Time, error) {
	v = strings.TrimSpace(v)
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return now.Add(d), nil
	}
	return time.Time{}, fmt.Errorf("--until must be an RFC 3339 time (2030-01-02T15:04:05Z) or a positive duration (720h), got %q", v)
}
