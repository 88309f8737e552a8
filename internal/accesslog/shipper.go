package accesslog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/pinaka-proxy/pinaka/internal/metrics"
)

// Defaults for zero Options fields.
const (
	DefaultBatchSize      = 100
	DefaultBatchInterval  = 5 * time.Second
	DefaultQueueSize      = 100000
	DefaultSpoolMaxBytes  = 1 << 30
	DefaultMemoryMaxBytes = 64 << 20
	DefaultRetryBase      = 500 * time.Millisecond
	DefaultRetryMax       = 30 * time.Second
	DefaultMaxAttempts    = 3
	DefaultShipTimeout    = 10 * time.Second
)

// Drop reasons, the values of the reason label of
// pinaka_ship_records_dropped_total.
const (
	DropQueueFull      = "queue_full"       // LOG_QUEUE_SIZE reached
	DropSpoolFull      = "spool_full"       // LOG_SPOOL_MAX_BYTES reached
	DropSpoolError     = "spool_error"      // writing the spool failed (disk full, I/O error)
	DropMemoryFull     = "memory_full"      // no spool dir and the in-memory bound reached
	DropShutdown       = "shutdown"         // no spool dir and still undelivered when Close's ctx ended, or recorded after Close
	DropEncode         = "encode_error"     // a record could not be encoded as JSON
	DropDeadLetterFull = "dead_letter_full" // rejected by the backend and the dead-letter file could not take it
)

// Options configure a Shipper. Zero values mean the defaults above.
type Options struct {
	// Log receives one info line with msg "request" per record, and the
	// shipper's own warnings and errors. nil means slog.Default().
	Log *slog.Logger

	BackendURL    string // "" = no shipping: records are only logged
	BackendAPIKey string // sent as Authorization: Bearer when set

	BatchSize     int           // LOG_BATCH_SIZE
	BatchInterval time.Duration // LOG_BATCH_INTERVAL

	SpoolDir       string // LOG_SPOOL_DIR; "" = keep undelivered batches in memory
	SpoolMaxBytes  int64  // LOG_SPOOL_MAX_BYTES, bounds spool files and dead letters together
	MemoryMaxBytes int64  // bound on undelivered batches held in memory without SpoolDir
	QueueSize      int    // LOG_QUEUE_SIZE, records waiting to be batched

	ProbeNode, Region string // batch envelope, and records' defaults when empty

	Metrics *metrics.Metrics // nil = a private metrics.New()
	Client  *http.Client     // nil = redirects not followed
	// Timeout bounds one delivery attempt (LOG_SHIP_TIMEOUT). It is short
	// because a batch waiting on an attempt is only in memory: a backend
	// that accepts connections and never answers must not keep records
	// from the spool for long.
	Timeout time.Duration

	RetryBase, RetryMax time.Duration // backoff between attempts
	// MaxAttempts is how many live attempts a batch gets before it is
	// parked in memory. With a spool directory a batch is spooled after its
	// first failed attempt instead, so a crash cannot take it.
	MaxAttempts int
}

// Shipper writes every record as a JSON log line and, with a backend
// configured, ships records in batches.
//
// Records flow through three goroutines. The batcher takes records from a
// bounded queue and cuts batches by size or age. The deliverer sends each
// batch, retrying a few times; a batch it cannot deliver is parked (disk
// spool or memory), and while the backend is known to be down new batches are
// parked at once instead of each waiting out its own retries. The
// redeliverer sends parked batches oldest first, backing off while the
// backend stays down. A batch keeps its batch_id for life, so the backend can
// store a batch that was sent twice only once.
type Shipper struct {
	opts Options
	log  *slog.Logger
	m    *metrics.Metrics

	// mu orders Record's enqueue against Close: once closed is set no record
	// can slip into the queue after the batcher's final drain.
	mu     sync.RWMutex
	closed bool
	queue  chan Record

	sender *sender
	park   parking
	spool  *spool // same as park with a spool dir, else nil

	handoff   chan *batch   // batcher → deliverer
	parked    chan struct{} // a batch was parked: wake an idle redeliverer
	recovered chan struct{} // a live delivery worked: cut the redeliverer's backoff short
	stop      chan struct{} // Close: the batcher drains the queue and exits
	drain     chan struct{} // Close, after the deliverer exited: the redeliverer finishes
	down      atomic.Bool   // the backend failed and has not answered 2xx since

	runCtx    context.Context // cancelled when Close's ctx ends: stop trying
	cancelRun context.CancelFunc
	workers   sync.WaitGroup // batcher and deliverer
	redeliver chan struct{}  // closed when the redeliverer exited

	dropLog    rate.Sometimes
	queueDrops atomic.Int64 // queue_full drops since the last warning

	mem inMemory // records a crash would take from shipping

	closeOnce sync.Once
	closeErr  error
}

// New validates o, opens the spool (delivering what a previous process left
// there) and starts shipping.
func New(o Options) (*Shipper, error) {
	s, err := newShipper(o)
	if err != nil {
		return nil, err
	}
	s.start()
	return s, nil
}

// newShipper builds a Shipper without starting its goroutines.
func newShipper(o Options) (*Shipper, error) {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Metrics == nil {
		o.Metrics = metrics.New()
	}
	if o.BatchSize <= 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.BatchInterval <= 0 {
		o.BatchInterval = DefaultBatchInterval
	}
	if o.QueueSize <= 0 {
		o.QueueSize = DefaultQueueSize
	}
	if o.SpoolMaxBytes <= 0 {
		o.SpoolMaxBytes = DefaultSpoolMaxBytes
	}
	if o.MemoryMaxBytes <= 0 {
		o.MemoryMaxBytes = DefaultMemoryMaxBytes
	}
	if o.RetryBase <= 0 {
		o.RetryBase = DefaultRetryBase
	}
	if o.RetryMax <= 0 {
		o.RetryMax = DefaultRetryMax
	}
	o.RetryMax = max(o.RetryMax, o.RetryBase)
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultShipTimeout
	}
	if o.Client == nil {
		o.Client = &http.Client{
			// A redirect means BACKEND_URL is wrong; following it would
			// turn the POST into a GET or send the key elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	s := &Shipper{
		opts:      o,
		log:       o.Log,
		m:         o.Metrics,
		parked:    make(chan struct{}, 1),
		recovered: make(chan struct{}, 1),
		stop:      make(chan struct{}),
		drain:     make(chan struct{}),
		redeliver: make(chan struct{}),
		dropLog:   rate.Sometimes{Interval: 10 * time.Second},
		mem:       inMemory{m: o.Metrics, batches: map[*batch]time.Time{}},
	}
	s.runCtx, s.cancelRun = context.WithCancel(context.Background())
	if o.BackendURL == "" {
		return s, nil
	}
	s.queue = make(chan Record, o.QueueSize)
	s.handoff = make(chan *batch, 16)
	s.sender = &sender{client: o.Client, url: strings.TrimRight(o.BackendURL, "/") + BatchPath, apiKey: o.BackendAPIKey, timeout: o.Timeout}
	// The gauge is set under the parking's own lock, so concurrent changes
	// cannot publish their totals out of order.
	publish := func(n int64) { s.m.SpoolBytes.Set(float64(n)) }
	if o.SpoolDir != "" {
		sp, err := openSpool(o.SpoolDir, o.SpoolMaxBytes, o.RetryMax, s.m, publish, func(msg string, args ...any) { s.log.Error(msg, args...) })
		if err != nil {
			return nil, err
		}
		s.spool, s.park = sp, sp
		if n := sp.len(); n > 0 {
			s.log.Info("undelivered record batches found in spool; delivering them", "dir", o.SpoolDir, "batches", n)
		}
	} else {
		s.park = &memPark{max: o.MemoryMaxBytes, publish: publish}
	}
	return s, nil
}

func (s *Shipper) start() {
	if s.queue == nil {
		close(s.redeliver)
		return
	}
	s.workers.Add(2)
	go s.batchLoop()
	go s.deliverLoop()
	go s.redeliverLoop()
}

// Record logs r and queues it for shipping. It never blocks: when the queue
// is full the record is dropped from shipping (it is still in the log line),
// counted and reported in a rate-limited warning.
func (s *Shipper) Record(r Record) {
	r.Timestamp = r.Timestamp.UTC()
	if r.ProbeNode == "" {
		r.ProbeNode = s.opts.ProbeNode
	}
	if r.Region == "" {
		r.Region = s.opts.Region
	}
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "request", recordAttrs(&r)...)
	if s.queue == nil {
		return
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		s.m.RecordsDropped.WithLabelValues(DropShutdown).Inc()
		s.log.Warn("record after shutdown not shipped (it is in the log)", "token_id", r.TokenID, "target_url", r.TargetURL)
		return
	}
	s.m.ShipQueueDepth.Inc()
	select {
	case s.queue <- r:
	default:
		s.m.ShipQueueDepth.Dec()
		s.m.RecordsDropped.WithLabelValues(DropQueueFull).Inc()
		s.queueDrops.Add(1)
		s.dropLog.Do(func() {
			s.log.Warn("record queue full; records dropped from shipping (they are in the log)",
				"dropped", s.queueDrops.Swap(0), "queue_size", s.opts.QueueSize)
		})
	}
}

// recordAttrs are the record's fields under their wire names.
func recordAttrs(r *Record) []slog.Attr {
	attrs := []slog.Attr{
		slog.Time("timestamp", r.Timestamp),
		slog.String("token_id", r.TokenID),
		slog.String("user_id", r.UserID),
		slog.String("token_type", r.TokenType),
		slog.String("region", r.Region),
		slog.String("probe_node", r.ProbeNode),
		slog.String("client_ip", r.ClientIP),
		slog.String("protocol", r.Protocol),
		slog.String("method", r.Method),
		slog.String("target_url", r.TargetURL),
		slog.Int("status_code", r.StatusCode),
		slog.Int64("request_size", r.RequestSize),
		slog.Int64("response_size", r.ResponseSize),
		slog.Int64("duration_ms", r.DurationMS),
		slog.Bool("success", r.Success),
		slog.Bool("rate_limited", r.RateLimited),
		slog.String("error", r.Error),
	}
	// Like the wire format (omitempty): only a record standing for
	// suppressed refusals carries it, and the log must keep that count.
	if r.Suppressed != 0 {
		attrs = append(attrs, slog.Int64("suppressed", r.Suppressed))
	}
	return appendTimingAttrs(attrs, r)
}

// Close stops accepting records and flushes: queued records are batched and
// sent, undelivered batches are spooled. It tries the backend until ctx is
// done and returns once every record is delivered or on disk. Without a
// spool directory, what is still undelivered when ctx ends is logged with
// its records, counted as dropped and reported in the error.
func (s *Shipper) Close(ctx context.Context) error {
	s.closeOnce.Do(func() { s.closeErr = s.close(ctx) })
	return s.closeErr
}

func (s *Shipper) close(ctx context.Context) error {
	defer s.cancelRun()
	if s.queue == nil {
		return nil
	}
	stopAfter := context.AfterFunc(ctx, s.cancelRun)
	defer stopAfter()

	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	close(s.stop)
	s.workers.Wait()
	close(s.drain)
	<-s.redeliver

	mp, ok := s.park.(*memPark)
	if !ok {
		return nil
	}
	left := mp.takeAll()
	records := 0
	for _, b := range left {
		records += b.records
		s.dropBatch(b, DropShutdown, ctx.Err())
	}
	if records > 0 {
		return fmt.Errorf("shutting down record shipping: %d records in %d batches undelivered (no LOG_SPOOL_DIR): %w", records, len(left), ctx.Err())
	}
	return nil
}

// batchLoop cuts batches of at most BatchSize records, and sends a partial
// batch once its first record is BatchInterval old.
func (s *Shipper) batchLoop() {
	defer s.workers.Done()
	defer close(s.handoff)
	var buf []Record
	timer := time.NewTimer(s.opts.BatchInterval)
	timer.Stop()
	defer timer.Stop()

	flush := func(final bool) {
		if len(buf) == 0 {
			return
		}
		timer.Stop()
		batches, err := newBatches(s.opts.ProbeNode, s.opts.Region, buf, MaxBatchBytes)
		n := len(buf)
		buf = make([]Record, 0, s.opts.BatchSize)
		s.mem.cut(batches)
		if err != nil {
			s.m.RecordsDropped.WithLabelValues(DropEncode).Add(float64(n))
			s.log.Error("record batch not shipped (records are in the log)", "reason", DropEncode, "records", n, "error", err)
			return
		}
		for _, b := range batches {
			if final {
				s.handoff <- b
				continue
			}
			select {
			case s.handoff <- b:
			default:
				// The deliverer is busy retrying: park rather than let the
				// queue back up into the request path.
				s.parkBatch(b)
			}
		}
	}
	add := func(r Record, final bool) {
		s.m.ShipQueueDepth.Dec()
		buf = append(buf, r)
		if len(buf) == 1 {
			timer.Reset(s.opts.BatchInterval)
			s.mem.building(time.Now())
		}
		if len(buf) >= s.opts.BatchSize {
			flush(final)
		}
	}
	for {
		select {
		case r := <-s.queue:
			add(r, false)
		case <-timer.C:
			flush(false)
		case <-s.stop:
			for {
				select {
				case r := <-s.queue:
					add(r, true)
				default:
					flush(true)
					return
				}
			}
		}
	}
}

// deliverLoop sends fresh batches.
func (s *Shipper) deliverLoop() {
	defer s.workers.Done()
	for b := range s.handoff {
		s.deliver(b)
	}
}

// deliver tries b, then parks it: with a spool directory after the first
// failed attempt (a batch retrying in memory is a batch a crash loses), else
// after MaxAttempts. While the backend is known to be down, b is parked at
// once: the redeliverer is already probing the backend, and b would only
// wait out the same failures.
func (s *Shipper) deliver(b *batch) {
	if s.down.Load() {
		s.parkBatch(b)
		return
	}
	bo := backoff{base: s.opts.RetryBase, max: s.opts.RetryMax}
	for attempt := 1; ; attempt++ {
		err := s.attempt(b)
		switch {
		case err == nil:
			s.delivered(b)
			return
		case s.runCtx.Err() != nil:
			s.parkBatch(b)
			return
		case permanent(err):
			s.deadLetter(b, err)
			return
		}
		s.m.BatchesRetried.Inc()
		if attempt >= s.opts.MaxAttempts || s.park.durable() {
			s.down.Store(true)
			s.log.Warn("record batch not delivered; parked for redelivery", "batch_id", b.id, "records", b.records, "attempts", attempt, "error", err)
			s.parkBatch(b)
			return
		}
		s.log.Debug("record batch delivery failed; retrying", "batch_id", b.id, "attempt", attempt, "error", err)
		if !sleep(s.runCtx, bo.next(err)) {
			s.parkBatch(b)
			return
		}
	}
}

// redeliverLoop sends parked batches, oldest first, one at a time, backing
// off while the backend keeps failing. At shutdown a disk spool is left for
// the next start; in-memory batches are tried until Close's ctx ends.
func (s *Shipper) redeliverLoop() {
	defer close(s.redeliver)
	bo := backoff{base: s.opts.RetryBase, max: s.opts.RetryMax}
	draining := false
	// drain is closed at shutdown; once seen it is set to nil, or a closed
	// channel would win every select below and turn the backoff into a
	// busy loop against a failing backend.
	drain := s.drain
	for {
		if draining && s.park.durable() {
			return
		}
		b, err := s.park.oldest()
		if err != nil && !errors.Is(err, errStuck) { // stuck files were logged as they failed
			s.log.Error("reading record spool", "error", err)
		}
		if b == nil {
			if draining && err == nil {
				return
			}
			if err == nil {
				select {
				case <-s.parked:
				case <-drain:
					draining, drain = true, nil
				}
				continue
			}
		} else {
			err = s.attempt(b)
			switch {
			case err == nil:
				s.unpark(b)
				s.delivered(b)
				bo.reset()
				continue
			case s.runCtx.Err() != nil:
				return
			case permanent(err):
				s.unpark(b)
				s.deadLetter(b, err)
				continue
			}
			s.down.Store(true)
			s.m.BatchesRetried.Inc()
			s.log.Warn("redelivering parked record batch failed; backing off", "batch_id", b.id, "error", err)
		}
		select {
		case <-time.After(bo.next(err)):
		case <-s.recovered:
		case <-drain:
			draining, drain = true, nil
		case <-s.runCtx.Done():
			return
		}
	}
}

// attempt sends b once, counting an attempt that got no answer in time.
func (s *Shipper) attempt(b *batch) error {
	err := s.sender.send(s.runCtx, b)
	if err != nil && s.runCtx.Err() == nil && timedOut(err) {
		s.m.ShipAttemptsTimedOut.Inc()
	}
	return err
}

func (s *Shipper) delivered(b *batch) {
	s.mem.release(b)
	s.m.BatchesSent.Inc()
	if s.down.Swap(false) {
		s.log.Info("record backend reachable again", "batch_id", b.id)
	}
	select {
	case s.recovered <- struct{}{}:
	default:
	}
}

// parkBatch hands b to the spool (or memory). When that fails the batch is
// dropped — counted and logged with its records, never silently.
func (s *Shipper) parkBatch(b *batch) {
	err := s.park.put(b)
	if err != nil {
		reason := DropSpoolError
		switch {
		case errors.Is(err, errFull) && s.park.durable():
			reason = DropSpoolFull
		case errors.Is(err, errFull):
			reason = DropMemoryFull
		}
		s.dropBatch(b, reason, err)
		return
	}
	if s.park.durable() {
		s.mem.release(b)
		s.m.BatchesSpooled.Inc()
	}
	select {
	case s.parked <- struct{}{}:
	default:
	}
}

func (s *Shipper) unpark(b *batch) {
	if err := s.park.remove(b); err != nil {
		// The file stays; the batch will be sent again and the backend
		// dedupes it by batch_id.
		s.log.Error("removing delivered batch from spool", "batch_id", b.id, "error", err)
	}
}

// deadLetter keeps a batch the backend rejected as invalid: in the
// dead-letter file, or without a spool directory in the error log.
func (s *Shipper) deadLetter(b *batch, cause error) {
	s.mem.release(b)
	s.m.BatchesDeadLetter.Inc()
	if s.spool == nil {
		s.log.Error("backend rejected record batch; no LOG_SPOOL_DIR for a dead-letter file, batch logged here",
			"batch_id", b.id, "records", b.records, "error", cause, "batch", json.RawMessage(b.body))
		return
	}
	err := s.spool.putDeadLetter(b, cause)
	if err != nil {
		s.dropBatch(b, DropDeadLetterFull, fmt.Errorf("backend rejected the batch (%v) and keeping it failed: %w", cause, err))
		return
	}
	s.log.Error("backend rejected record batch; kept in dead-letter file",
		"batch_id", b.id, "records", b.records, "file", s.opts.SpoolDir+"/"+DeadLetterFile, "error", cause)
}

// dropBatch gives up on b: the drop is counted by reason and the whole batch
// is written to the error log, the last place it can be recovered from.
func (s *Shipper) dropBatch(b *batch, reason string, cause error) {
	s.mem.release(b)
	s.m.RecordsDropped.WithLabelValues(reason).Add(float64(b.records))
	s.log.Error("record batch dropped", "reason", reason, "batch_id", b.id, "records", b.records,
		"error", cause, "batch", json.RawMessage(b.body))
}

// inMemory tracks the records held only in process memory — the batch being
// built and batches cut but neither delivered nor written to the spool —
// and publishes when the oldest of them arrived: those are what a crash
// takes from shipping, so their age is the exposure.
type inMemory struct {
	m *metrics.Metrics

	mu      sync.Mutex
	first   time.Time // first record of the batch being built; zero if none
	batches map[*batch]time.Time
}

// building notes the first record of a new batch.
func (w *inMemory) building(t time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.first = t
	w.publish()
}

// cut moves the batch being built into batches (none if it could not be
// encoded, in which case it was dropped).
func (w *inMemory) cut(batches []*batch) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, b := range batches {
		w.batches[b] = w.first
	}
	w.first = time.Time{}
	w.publish()
}

// release forgets b: delivered, on disk, or dropped (and logged). Batches
// read back from the spool were never tracked; releasing them is a no-op.
func (w *inMemory) release(b *batch) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.batches[b]; !ok {
		return
	}
	delete(w.batches, b)
	w.publish()
}

// publish runs under w.mu. The map holds at most the handoff backlog and,
// without a spool directory, the batches parked in memory.
func (w *inMemory) publish() {
	oldest := w.first
	for _, t := range w.batches {
		if oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
	}
	var ns int64
	if !oldest.IsZero() {
		ns = oldest.UnixNano()
	}
	w.m.ShipMemoryOldest.Store(ns)
}
