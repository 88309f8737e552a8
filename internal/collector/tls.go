package collector

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/tlsfiles"
)

// serverTLS is the collector's TLS: its certificate
// (COLLECTOR_TLS_CERT_PATH/COLLECTOR_TLS_KEY_PATH) and, with
// COLLECTOR_CLIENT_CA_PATH, the CAs whose node certificates it requires.
// Reload (SIGHUP) re-reads each file on its own; a bad one is refused, logged
// and counted, and the one in use kept. Open connections are untouched.
type serverTLS struct {
	cert *tlsfiles.KeyPair
	cas  *tlsfiles.CAs // nil: no client certificates asked for
	cfg  atomic.Pointer[tls.Config]
	m    *collectorMetrics
}

// loadServerTLS reads the files; errors name the variable. With no
// certificate configured it returns nil: the collector speaks plain HTTP.
func loadServerTLS(certPath, keyPath, caPath string) (*serverTLS, error) {
	var errs []error
	if (certPath == "") != (keyPath == "") {
		set, unset := "COLLECTOR_TLS_CERT_PATH", "COLLECTOR_TLS_KEY_PATH"
		if certPath == "" {
			set, unset = unset, set
		}
		errs = append(errs, fmt.Errorf("%s is set but %s is not: TLS needs both", set, unset))
	}
	if caPath != "" && (certPath == "" || keyPath == "") {
		errs = append(errs, errors.New("COLLECTOR_CLIENT_CA_PATH needs COLLECTOR_TLS_CERT_PATH and COLLECTOR_TLS_KEY_PATH: node certificates are only asked for over TLS"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if certPath == "" {
		return nil, nil
	}
	t := &serverTLS{}
	kp, err := tlsfiles.NewKeyPair(certPath, keyPath, nil)
	if err != nil {
		errs = append(errs, fmt.Errorf("COLLECTOR_TLS_CERT_PATH/COLLECTOR_TLS_KEY_PATH: %w", err))
	}
	t.cert = kp
	if caPath != "" {
		cas, err := tlsfiles.NewCAs(caPath)
		if err != nil {
			errs = append(errs, fmt.Errorf("COLLECTOR_CLIENT_CA_PATH: %w", err))
		}
		t.cas = cas
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	t.build()
	return t, nil
}

// requireNode reports whether every connection carries a verified node
// certificate.
func (t *serverTLS) requireNode() bool { return t != nil && t.cas != nil }

// build makes the configuration handshakes get from now on.
func (t *serverTLS) build() {
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: t.cert.GetCertificate,
		NextProtos:     []string{"h2", "http/1.1"},
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
	}
	if t.cas != nil {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = t.cas.Pool()
		// The chain is verified by crypto/tls first (the CA, validity,
		// clientAuth usage); a verified certificate that names no node
		// is refused here, at the handshake, so that its holder retries
		// (and spools) instead of having batches refused one by one.
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.VerifiedChains) == 0 {
				return errors.New("no verified node certificate")
			}
			if _, err := backendtls.NodeIdentity(cs.VerifiedChains[0][0]); err != nil {
				return fmt.Errorf("node certificate refused: %w", err)
			}
			return nil
		}
	}
	t.cfg.Store(cfg)
}

// config is the http.Server's TLS configuration: every handshake gets the
// one build made last, so a reloaded CA bundle applies to new connections.
func (t *serverTLS) config() *tls.Config {
	return &tls.Config{
		NextProtos: []string{"h2", "http/1.1"},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return t.cfg.Load(), nil
		},
	}
}

// Reload re-reads the certificate and the client CA bundle, each on its own.
func (t *serverTLS) Reload(log *slog.Logger) error {
	if t == nil {
		return nil
	}
	var errs []error
	if err := t.cert.Reload(); err != nil {
		errs = append(errs, fmt.Errorf("COLLECTOR_TLS_CERT_PATH/COLLECTOR_TLS_KEY_PATH: %w", err))
	}
	if t.cas != nil {
		if err := t.cas.Reload(); err != nil {
			errs = append(errs, fmt.Errorf("COLLECTOR_CLIENT_CA_PATH: %w", err))
		}
	}
	t.build()
	attrs := []any{"certificate_expires", t.cert.Leaf().NotAfter.Format(time.RFC3339)}
	if t.cas != nil {
		attrs = append(attrs, "client_cas", t.cas.Len())
	}
	if err := errors.Join(errs...); err != nil {
		if t.m != nil {
			t.m.tlsReloadFailures.Inc()
		}
		log.Error("collector TLS reload refused in part; keeping what was in use for it", append(attrs, "err", err)...)
		return err
	}
	log.Info("collector TLS reloaded", attrs...)
	return nil
}

// nodeOf is the node a request's connection proved to be, "" when the
// collector does not ask for node certificates.
func (t *serverTLS) nodeOf(r *http.Request) string {
	if !t.requireNode() || r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return ""
	}
	name, _ := backendtls.NodeIdentity(r.TLS.VerifiedChains[0][0])
	return name
}

// errorLog is the http.Server's error log. TLS handshake failures — a node
// without a certificate, one from another CA, or anyone on the internet —
// are counted, and logged at most once per handshakeLogEvery with how many
// were not, so a flood of bad handshakes cannot flood the log.
type errorLog struct {
	log        *slog.Logger
	m          *collectorMetrics
	sometimes  rate.Sometimes
	suppressed atomic.Int64
}

const handshakeLogEvery = 10 * time.Second

func newErrorLog(log *slog.Logger, m *collectorMetrics) *errorLog {
	return &errorLog{log: log, m: m, sometimes: rate.Sometimes{Interval: handshakeLogEvery}}
}

func (e *errorLog) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	if !strings.Contains(msg, "TLS handshake error") {
		e.log.Warn(msg)
		return len(p), nil
	}
	e.m.handshakeFailures.Inc()
	logged := false
	e.sometimes.Do(func() {
		logged = true
		e.log.Warn("collector TLS handshake refused", "detail", msg, "not_logged_since_last", e.suppressed.Swap(0))
	})
	if !logged {
		e.suppressed.Add(1)
	}
	return len(p), nil
}

// sameNode refuses (403) a batch whose envelope or any record claims
// another probe_node than the node certificate of its connection: a node
// may only write its own records. Nothing of a refused batch is stored; the
// shipper keeps a 403 in its dead-letter file. A record that is not a JSON
// object is left to the record rules (kept aside under the envelope's
// probe_node, which has been checked).
func (h *handler) sameNode(w http.ResponseWriter, r *http.Request, b *batch) bool {
	node := h.tls.nodeOf(r)
	claim, where := "", ""
	switch {
	case node == "":
		where = "connection" // cannot happen: the handshake requires a node certificate
	case b.probeNode != node:
		claim, where = b.probeNode, "batch"
	default:
		for i, raw := range b.logs {
			var rec struct {
				ProbeNode string `json:"probe_node"`
			}
			if json.Unmarshal(raw, &rec) != nil {
				continue
			}
			if rec.ProbeNode != node {
				claim, where = rec.ProbeNode, fmt.Sprintf("record %d", i)
				break
			}
		}
		if where == "" {
			return true
		}
	}
	h.m.batchesRefused.WithLabelValues(refusedNodeMismatch).Inc()
	// The claim is client text: quoted and cut short in the answer and
	// the log, which get one line per refused batch of a verified node.
	reason := fmt.Sprintf("%s claims probe_node %s but the node certificate says %q", where, quoteShort(claim), node)
	h.log.Warn("batch refused: probe_node does not match the node certificate", "batch_id", b.id,
		"certificate_node", node, "where", where, "claimed", cutShort(claim), "remote", r.RemoteAddr)
	reply(w, http.StatusForbidden, answer{Status: "forbidden", Reason: reason, BatchID: b.id.String()})
	return false
}

// quoteShort quotes s, cut to 64 bytes.
func quoteShort(s string) string {
	if len(s) > 64 {
		return strconv.Quote(s[:64]) + "…"
	}
	return strconv.Quote(s)
}

// cutShort is s cut to 64 bytes, for a log attribute (which is escaped).
func cutShort(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

func (t *serverTLS) setMetrics(m *collectorMetrics) {
	if t != nil {
		t.m = m
	}
}
