package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/pinaka-proxy/pinaka/internal/auth"
)

// maxRevocationBatch bounds the ids handed to the callback at once.
const maxRevocationBatch = 256

// maxRevocationMessage bounds one message: a JSON object with a 50-byte
// id (at most 300 bytes escaped) and a time fits many times over.
const maxRevocationMessage = 1024

// RevocationMessage is one message on the channel: a token id revoked
// (until Until, when set), or a revocation withdrawn (Remove).
//
// On the wire it is a JSON object, {"token_id":"T"} with "until" (RFC
// 3339) or "remove":true when they apply; what Publish sends. A message
// that does not start with "{" is a bare token id revoked with no end, so
// that `redis-cli PUBLISH pinaka:revocations T` works by hand.
type RevocationMessage struct {
	TokenID string    `json:"token_id"`
	Until   time.Time `json:"until,omitzero"`
	Remove  bool      `json:"remove,omitempty"`
}

// parseRevocation reads one message; an error means it is dropped.
func parseRevocation(payload string) (RevocationMessage, error) {
	if len(payload) > maxRevocationMessage {
		return RevocationMessage{}, fmt.Errorf("message of %d bytes", len(payload))
	}
	var m RevocationMessage
	if strings.HasPrefix(payload, "{") {
		if err := json.Unmarshal([]byte(payload), &m); err != nil {
			return RevocationMessage{}, err
		}
		if m.Remove && !m.Until.IsZero() {
			return RevocationMessage{}, errors.New("remove with until")
		}
	} else {
		m.TokenID = payload
	}
	if m.TokenID == "" {
		return RevocationMessage{}, errors.New("empty token id")
	}
	if err := auth.CheckID("token_id", m.TokenID); err != nil {
		return RevocationMessage{}, err
	}
	return m, nil
}

// Revocations fans revocations out to every node through Redis pub/sub on
// the channel REDIS_KEY_PREFIX + "revocations" (by default
// "pinaka:revocations"), one RevocationMessage per message.
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

// Publish announces a revocation (or its withdrawal), and returns how
// many nodes received it.
func (r *Revocations) Publish(ctx context.Context, m RevocationMessage) (int64, error) {
	if m.TokenID == "" {
		return 0, errors.New("publishing a revocation: empty token id")
	}
	if err := auth.CheckID("token_id", m.TokenID); err != nil {
		return 0, fmt.Errorf("publishing a revocation: %w", err)
	}
	if m.Remove && !m.Until.IsZero() {
		return 0, errors.New("publishing a revocation: a removal has no until")
	}
	b, err := json.Marshal(m)
	if err != nil {
		return 0, fmt.Errorf("publishing a revocation: %w", err)
	}
	n, err := r.client.Publish(ctx, r.channel, b).Result()
	if err != nil {
		return 0, fmt.Errorf("publishing a revocation on %s: %w", r.channel, err)
	}
	return n, nil
}

// Run delivers the messages published on the channel to deliver, in
// order, in batches of what has arrived (at most maxRevocationBatch),
// until ctx ends. deliver runs in this goroutine and should be quick
// (internal/server hands them to revocation.List.Push). Messages that do
// not parse or do not carry a valid token id are dropped and counted. The
// client reconnects and resubscribes by itself after Redis comes back.
func (r *Revocations) Run(ctx context.Context, deliver func(msgs []RevocationMessage)) {
	ps := r.client.Subscribe(ctx, r.channel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelSize(1024))
	batch := make([]RevocationMessage, 0, maxRevocationBatch)
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
			deliver(append([]RevocationMessage(nil), batch...))
		}
	}
}

func (r *Revocations) add(batch []RevocationMessage, msg *redis.Message) []RevocationMessage {
	m, err := parseRevocation(msg.Payload)
	if err != nil {
		r.m.revoked.WithLabelValues("invalid").Inc()
		return batch
	}
	r.m.revoked.WithLabelValues("accepted").Inc()
	return append(batch, m)
}
