package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// maxRevocationBatch bounds the ids handed to the callback at once.
const maxRevocationBatch = 256

// Revocations fans revoked token ids out to every node through Redis
// pub/sub on the channel REDIS_KEY_PREFIX + "revocations" (by default
// "pinaka:revocations"), one token id per message.
//
// Pub/sub delivers at most once, to the nodes connected at that moment: a
// node that was disconnected misses the message. It is the fast path next
// to the polled revocation list (REVOCATION_URL), which every node reads
// anyway and which catches up whatever was missed. It never sits on the
// request path: messages arrive in their own goroutine.
type Revocations struct {
	client  *redis.Client
	channel string
	log     *slog.Logger
	m       *fleetMetrics
}

// NewRevocations returns the revocation channel of the keys under prefix.
// m may be nil (a publishing command has no metrics).
func NewRevocations(client *redis.Client, prefix string, log *slog.Logger, m *fleetMetrics) *Revocations {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = newMetrics(nil)
	}
	return &Revocations{client: client, channel: prefix + "revocations", log: log, m: m}
}

// Channel is the pub/sub channel's name.
func (r *Revocations) Channel() string { return r.channel }

// Publish announces that tokenID is revoked, and returns how many nodes
// received it.
func (r *Revocations) Publish(ctx context.Context, tokenID string) (int64, error) {
	if tokenID == "" {
		return 0, errors.New("publishing a revocation: empty token id")
	}
	if err := auth.CheckID("token_id", tokenID); err != nil {
		return 0, fmt.Errorf("publishing a revocation: %w", err)
	}
	n, err := r.client.Publish(ctx, r.channel, tokenID).Result()
	if err != nil {
		return 0, fmt.Errorf("publishing a revocation on %s: %w", r.channel, err)
	}
	return n, nil
}

// Run delivers the token ids published on the channel to deliver, in
// batches of what has arrived (at most maxRevocationBatch), until ctx ends.
// deliver runs in this goroutine and should be quick. Messages that are not
// a valid token id are dropped and counted. The client reconnects and
// resubscribes by itself after Redis comes back.
//
// Wiring: the revocation list (REVOCATION_URL, internal/revocation) is
// built separately; at merge, cmd/pinaka passes its "add these ids"
// function as deliver, so a revocation published on one node reaches the
// others' lists within a second.
func (r *Revocations) Run(ctx context.Context, deliver func(tokenIDs []string)) {
	ps := r.client.Subscribe(ctx, r.channel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelSize(1024))
	batch := make([]string, 0, maxRevocationBatch)
	for {
		var msg *redis.Message
		var ok bool
		select {
		case <-ctx.Done():
			return
		case msg, ok = <-ch:
			if !ok {
				return
			}
		}
		batch = r.add(batch[:0], msg)
	drain:
		for len(batch) < maxRevocationBatch {
			select {
			case msg, ok = <-ch:
				if !ok {
					break drain
				}
				batch = r.add(batch, msg)
			default:
				break drain
			}
		}
		if len(batch) > 0 {
			deliver(append([]string(nil), batch...))
		}
	}
}

func (r *Revocations) add(batch []string, msg *redis.Message) []string {
	id := msg.Payload
	if id == "" || auth.CheckID("token_id", id) != nil {
		r.m.revoked.WithLabelValues("invalid").Inc()
		return batch
	}
	r.m.revoked.WithLabelValues("accepted").Inc()
	return append(batch, id)
}
