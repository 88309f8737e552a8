package proxy_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/pinaka-proxy/pinaka/internal/revocation"
	"github.com/pinaka-proxy/pinaka/internal/testutil/testpki"
)

// h3Try opens a QUIC connection with the client certificates given (none:
// nil) and sends CONNECT target with authHeader. It returns the status, or
// the error that refused the connection at or just after the handshake (a
// TLS 1.3 client finishes its handshake before the server has judged its
// certificate, so a refusal can arrive as the connection's close).
func h3Try(t *testing.T, e *env, certs []tls.Certificate, target, authHeader string) (int, *http3.RequestStream, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, e.h3Addr(), &tls.Config{RootCAs: e.roots, ServerName: "127.0.0.1",
		NextProtos: []string{http3.NextProtoH3}, Certificates: certs}, nil)
	if err != nil {
		return 0, nil, err
	}
	t.Cleanup(func() { _ = qc.CloseWithError(0, "") })
	cc := (&http3.Transport{}).NewClientConn(qc)
	str, err := cc.OpenRequestStream(ctx)
	if err != nil {
		return 0, nil, err
	}
	req, _ := http.NewRequest(http.MethodConnect, "https://"+target, nil)
	req.Host, req.URL.Path = target, ""
	if authHeader != "" {
		req.Header.Set("Proxy-Authorization", authHeader)
	}
	if err := str.SendRequestHeader(req); err != nil {
		return 0, nil, err
	}
	res, err := str.ReadResponse()
	if err != nil {
		return 0, nil, err
	}
	return res.StatusCode, str, nil
}

// TestHTTP3ClientCertificates: CLIENT_CERT_MODE applies to QUIC as to TLS
// over TCP. A certificate is the credential (its identity in the record),
// require refuses a client without one at the handshake, optional lets a
// token through, and a certificate the CRL revokes is refused and counted.
func TestHTTP3ClientCertificates(t *testing.T) {
	for _, mode := range []string{"optional", "require"} {
		t.Run(mode, func(t *testing.T) {
			p := newClientPKI(t)
			revoked := p.issue("mallory", "cert-revoked", "us-east")
			testpki.Write(t, p.dir, "client.crl", p.ca.CRLPEM(t, time.Now().Add(time.Hour), revoked.Cert.SerialNumber))
			vars := p.vars(mode)
			vars["HTTP3_ENABLED"] = "true"
			e := startProxy(t, vars)
			echo := newEchoServer(t)

			status, str, err := h3Try(t, e, []tls.Certificate{p.alice.TLS}, echo.addr(), "")
			if err != nil || status != http.StatusOK {
				t.Fatalf("CONNECT with a certificate over HTTP/3: %d %v", status, err)
			}
			h1Echo(t, str, bufio.NewReader(str), "by certificate")
			str.Close()
			rec := e.waitRecordOf("cert-alice")
			if rec.UserID != "alice" || rec.TokenType != "certificate" || rec.Protocol != "HTTP/3" ||
				rec.Method != http.MethodConnect || rec.StatusCode != 200 {
				t.Fatalf("record %+v", rec)
			}
			if got := e.waitCertResult("ok", 1); got != 1 {
				t.Fatalf("ok results = %v, want 1", got)
			}

			status, _, err = h3Try(t, e, []tls.Certificate{revoked.TLS}, echo.addr(), e.bearer())
			if err == nil {
				t.Fatalf("a revoked certificate got through over QUIC: %d", status)
			}
			if got := e.waitCertResult("revoked", 1); got != 1 {
				t.Fatalf("revoked results = %v, want 1 (client saw %v)", got, err)
			}

			status, _, err = h3Try(t, e, nil, echo.addr(), e.bearer())
			switch mode {
			case "optional":
				if err != nil || status != http.StatusOK {
					t.Fatalf("token without a certificate, optional: %d %v", status, err)
				}
			case "require":
				if err == nil {
					t.Fatalf("no certificate got through with require: %d", status)
				}
				if got := e.waitCertResult("no_cert", 1); got != 1 {
					t.Fatalf("no_cert results = %v, want 1 (client saw %v)", got, err)
				}
			}
		})
	}
}

// TestHTTP3RevocationClosesTunnel: revoking a token closes its open
// HTTP/3 tunnel (close_reason token_revoked); another token's tunnel on
// the same QUIC connection carries on.
func TestHTTP3RevocationClosesTunnel(t *testing.T) {
	ls := newListServer(t)
	e := startProxy(t, map[string]string{
		"HTTP3_ENABLED":  "true",
		"REVOCATION_URL": ls.URL + revocation.Path, "REVOCATION_INTERVAL": "1s", "BACKEND_API_KEY": "node-key",
	})
	echo := newEchoServer(t)
	cc, _ := h3Conn(t, e.h3Addr(), e.roots)
	str1, res := h3Connect(t, cc, echo.addr(), e.bearer())
	if res.StatusCode != 200 {
		t.Fatalf("CONNECT tok-1: %s", res.Status)
	}
	br1 := bufio.NewReader(str1)
	h1Echo(t, str1, br1, "tok-1 before")
	other := "Bearer " + e.mint("user-2", "tok-2", []string{"us-east"}, time.Hour)
	str2, res := h3Connect(t, cc, echo.addr(), other)
	if res.StatusCode != 200 {
		t.Fatalf("CONNECT tok-2: %s", res.Status)
	}
	br2 := bufio.NewReader(str2)
	h1Echo(t, str2, br2, "tok-2 before")

	closed := readUntilClosed(br1)
	ls.set("tok-1")
	waitClosed(t, "HTTP/3 tunnel", closed)
	r := e.waitRecord(func(r recordT) bool { return r.TokenID == "tok-1" && r.Method == http.MethodConnect })
	if r.Protocol != "HTTP/3" || r.Error != "token_revoked" || r.CloseReason != "token_revoked" || r.Success {
		t.Fatalf("record of the revoked tunnel: %+v", r)
	}
	h1Echo(t, str2, br2, "tok-2 after")
	_, res = h3Connect(t, cc, echo.addr(), e.bearer())
	if res.StatusCode != http.StatusProxyAuthRequired {
		t.Fatalf("CONNECT with the revoked token over HTTP/3: %s", res.Status)
	}
	if got := e.metric("pinaka_revocation_closed_total", "kind", "tunnel"); got != 1 {
		t.Fatalf("pinaka_revocation_closed_total{kind=tunnel} = %v", got)
	}
}

// TestHTTP3PerAddressCaps: MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP and
// MAX_CONNECTIONS_PER_IP count QUIC connections with TCP ones from the
// same address; an authenticated request frees the unauthenticated place.
func TestHTTP3PerAddressCaps(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP3_ENABLED": "true",
		"MAX_CONNECTIONS_PER_IP": "3", "MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP": "2"})
	echo := newEchoServer(t)
	dial := func() (*quic.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := quic.DialAddr(ctx, e.h3Addr(),
			&tls.Config{RootCAs: e.roots, ServerName: "127.0.0.1", NextProtos: []string{http3.NextProtoH3}}, nil)
		if err == nil {
			t.Cleanup(func() { _ = c.CloseWithError(0, "") })
		}
		return c, err
	}
	// refused: the dial fails, or the connection is closed right after
	// its handshake (refused when the handshake validated the address).
	refused := func() error {
		c, err := dial()
		if err != nil {
			return err
		}
		select {
		case <-c.Context().Done():
			return context.Cause(c.Context())
		case <-time.After(2 * time.Second):
			return nil
		}
	}
	a, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dial(); err != nil {
		t.Fatal(err)
	}
	// Two unauthenticated connections from 127.0.0.1: a third is refused,
	// over QUIC and over TCP alike.
	if err := refused(); err == nil {
		t.Fatal("a third unauthenticated QUIC connection was accepted")
	}
	if c, err := tls.Dial("tcp", e.addr, e.tlsConfig("h2")); err == nil {
		if err := c.Handshake(); err == nil {
			_, err = c.Read(make([]byte, 1))
		}
		c.Close()
		if err == nil {
			t.Fatal("a TCP connection was accepted beyond the unauthenticated cap held by QUIC connections")
		}
	}
	// An authenticated request on a: a third connection fits, a fourth is
	// beyond MAX_CONNECTIONS_PER_IP.
	cc := (&http3.Transport{}).NewClientConn(a)
	_, res := h3Connect(t, cc, echo.addr(), e.bearer())
	if res.StatusCode != 200 {
		t.Fatal(res.Status)
	}
	waitFor := func(what string, f func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !f() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("a third connection after authentication", func() bool { _, err := dial(); return err == nil })
	if err := refused(); err == nil {
		t.Fatal("a fourth QUIC connection was accepted with MAX_CONNECTIONS_PER_IP=3")
	}
	if got := e.metric("pinaka_connections_refused_total", "reason", "per_ip_unauthenticated"); got < 1 {
		t.Fatalf("per_ip_unauthenticated refusals = %v", got)
	}
	if got := e.metric("pinaka_connections_refused_total", "reason", "per_ip"); got < 1 {
		t.Fatalf("per_ip refusals = %v", got)
	}
	var appErr *quic.ApplicationError
	var trErr *quic.TransportError
	if err := refused(); !errors.As(err, &appErr) && !errors.As(err, &trErr) {
		t.Fatalf("refusal seen as %v, want a QUIC close", err)
	}
}
