package fleet

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// maxQueued bounds the calls waiting for the next pipeline. More waiting
// than this means Redis answers slower than requests arrive: the extra
// calls are refused (errQueueFull) and decide on local state.
const maxQueued = 512

var (
	errQueueFull = errors.New("more than 512 Redis calls waiting")
	errLocal     = errors.New("deciding locally: Redis failed during the wait")
	errPanic     = errors.New("the Redis client panicked")
	errReply     = errors.New("unexpected reply from a Redis script")
)

// batcher sends the Redis calls of concurrent requests as one pipeline: the
// calls that arrive while a round trip is in flight leave together in one
// write and come back in one read, so the system calls on both sides (and
// redis-server's per-command socket work) are shared by the calls of a
// batch. Each call is still its own command: a pipeline of N EVALSHA is N
// atomic script executions, N decisions.
//
// There is no goroutine of its own and none per call. The first caller
// finding nothing in flight sends its call at once, alone (no added
// latency at low concurrency); callers arriving meanwhile queue. When a
// round trip ends, its sender hands the queue to the first queued caller,
// which sends it as the next pipeline, and wakes the callers it served.
//
// Deadlines: a batch's context ends REDIS_TIMEOUT after its oldest call
// began, so no call waits past its own deadline for the batch it is in; a
// queued call waits at most for the batch in flight, which is bounded the
// same way. One context per round trip, not per call.
type batcher struct {
	client  *redis.Client
	timeout time.Duration
	down    func() bool // the node decides locally: queued calls are not sent

	mu    sync.Mutex
	busy  bool    // a round trip is in flight
	queue []*call // calls for the next one, at most maxQueued

	calls sync.Pool // *call
}

// call is one Redis command and its caller's wake-up. It is reused
// (batcher.get/put) once its caller has read the result.
type call struct {
	cmd   *redis.Cmd
	sc    *script // set for an EVALSHA of sc
	start time.Time
	// done receives nil when cmd has its result, or the batch this call
	// now sends (its first element is this call).
	done chan []*call
	one  [1]*call // the batch of a call sent alone
}

func newBatcher(client *redis.Client, timeout time.Duration, down func() bool) *batcher {
	b := &batcher{client: client, timeout: timeout, down: down}
	b.calls.New = func() any { return &call{done: make(chan []*call, 1)} }
	return b
}

// script is a Lua script known by its SHA1 (EVALSHA).
type script struct {
	src string
	sha any // boxed once: it goes into every call's args
}

func newScript(src string) *script { return &script{src: src, sha: redis.NewScript(src).Hash()} }

// script returns a call of s. args is the whole command with its first
// two elements left for the command name and the script: nil, nil,
// numkeys, keys..., arguments... (one allocation for the caller, none
// here). It is sent as EVALSHA, and again as EVAL when Redis does not know
// the script (after a restart or SCRIPT FLUSH).
func (b *batcher) script(s *script, args []any) *call {
	c := b.calls.Get().(*call)
	args[0], args[1] = "evalsha", s.sha
	c.cmd = redis.NewCmd(context.Background(), args...)
	c.sc = s
	return c
}

// eval runs script s with args (as for script) in the next pipeline,
// observing the wait and round trip in took, and returns the command with
// its reply (read it with Int64Slice or Slice) or its error.
func (b *batcher) eval(s *script, args []any, took prometheus.Observer) *redis.Cmd {
	c := b.script(s, args)
	b.do(c)
	cmd := c.cmd
	took.Observe(time.Since(c.start).Seconds())
	b.put(c)
	return cmd
}

// command returns a call of a plain command.
func (b *batcher) command(args ...any) *call {
	c := b.calls.Get().(*call)
	c.cmd = redis.NewCmd(context.Background(), args...)
	c.sc = nil
	return c
}

// put recycles c once its result has been read.
func (b *batcher) put(c *call) {
	c.cmd, c.sc = nil, nil
	b.calls.Put(c)
}

// do sends c, alone or in the next pipeline, and returns when c.cmd has its
// result (or its error: a timeout, a failure, errQueueFull, errLocal).
func (b *batcher) do(c *call) {
	c.start = time.Now()
	b.mu.Lock()
	if !b.busy {
		b.busy = true
		b.mu.Unlock()
		c.one[0] = c
		b.send(c.one[:])
		c.one[0] = nil
		return
	}
	if len(b.queue) >= maxQueued {
		b.mu.Unlock()
		c.cmd.SetErr(errQueueFull)
		return
	}
	if b.queue == nil {
		b.queue = make([]*call, 0, 16)
	}
	b.queue = append(b.queue, c)
	b.mu.Unlock()
	if batch := <-c.done; batch != nil {
		b.send(batch)
	}
}

// send runs batch (batch[0] is the caller's own call), then passes the
// calls queued meanwhile to the first of them and wakes the others. It
// does so even if the client panics (net/http recovers a handler's panic
// and serves on): a batcher left busy would queue every later call.
func (b *batcher) send(batch []*call) {
	done := false
	defer func() {
		if !done {
			for _, c := range batch {
				c.cmd.SetErr(errPanic)
			}
		}
		b.handoff(batch)
	}()
	b.exec(batch)
	done = true
}

func (b *batcher) handoff(batch []*call) {
	b.mu.Lock()
	next := b.queue
	b.queue = nil
	b.busy = len(next) > 0
	b.mu.Unlock()
	if len(next) > 0 {
		next[0].done <- next
	}
	for _, c := range batch[1:] {
		c.done <- nil
	}
}

// exec sends the batch's commands in one round trip (one command alone
// without pipeline framing), then resends as EVAL those whose script Redis
// did not have.
func (b *batcher) exec(batch []*call) {
	oldest := batch[0].start
	for _, c := range batch[1:] {
		if c.start.Before(oldest) {
			oldest = c.start
		}
	}
	deadline := oldest.Add(b.timeout)
	if b.down() {
		// An earlier round trip failed while these waited: the node
		// decides locally now, and a dead Redis must not cost each batch
		// another timeout.
		for _, c := range batch {
			c.cmd.SetErr(errLocal)
		}
		return
	}
	if !time.Now().Before(deadline) {
		for _, c := range batch {
			c.cmd.SetErr(context.DeadlineExceeded)
		}
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	b.run(ctx, batch, false)
	b.run(ctx, batch, true)
}

// run sends the commands of batch in one round trip (a lone command
// without pipeline framing). With noscript, it sends only those that failed
// because Redis lacked their script, as EVAL: the same arguments with the
// script's source for its hash (which also caches it for the next EVALSHA).
func (b *batcher) run(ctx context.Context, batch []*call, noscript bool) {
	var p redis.Pipeliner
	var last *redis.Cmd
	n := 0
	for _, c := range batch {
		if noscript {
			if c.sc == nil || !redis.HasErrorPrefix(c.cmd.Err(), "NOSCRIPT") {
				continue
			}
			a := c.cmd.Args()
			a[0], a[1] = "eval", c.sc.src
			c.cmd = redis.NewCmd(context.Background(), a...)
		}
		if n == 1 {
			p = b.client.Pipeline()
			_ = p.Process(ctx, last)
		}
		if n >= 1 {
			_ = p.Process(ctx, c.cmd)
		}
		last = c.cmd
		n++
	}
	switch {
	case n == 1:
		_ = b.client.Process(ctx, last)
	case n > 1:
		_, _ = p.Exec(ctx)
	}
}
