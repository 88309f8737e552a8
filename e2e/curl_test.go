package e2e

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/accesslog"
)

// curlOrigins starts a plain and a TLS origin (the TLS one with the e2e
// certificate, so curl verifies it with --cacert).
func curlOrigins(t *testing.T) (plain, secure *httptest.Server) {
	t.Helper()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "origin: %s %s body=%q proxy-auth=%q ua=%q", r.Method, r.URL.Path, body,
			r.Header.Get("Proxy-Authorization"), r.Header.Get("User-Agent"))
	})
	plain = httptest.NewServer(h)
	t.Cleanup(plain.Close)
	secure = httptest.NewUnstartedServer(h)
	secure.TLS = &tls.Config{Certificates: []tls.Certificate{fixture.cert}}
	secure.StartTLS()
	t.Cleanup(secure.Close)
	return plain, secure
}

type curlResult struct {
	out, errOut string
	code        int
}

// curl runs curl against the proxy p, ignoring any curlrc and proxy
// environment variables, trusting the e2e certificate for the proxy and
// the origins. The output ends with "\n<status> <connect status>".
func curl(t *testing.T, p *proc, args ...string) curlResult {
	t.Helper()
	bin := requireTool(t, "curl")
	full := append([]string{"-q", "-sS", "--max-time", "20",
		"--proxy", "https://" + p.Addr, "--proxy-cacert", fixture.certFile, "--cacert", fixture.certFile,
		"-w", "\n%{http_code} %{http_connect}"}, args...)
	cmd := exec.Command(bin, full...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + fixture.dir}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return curlResult{out.String(), errOut.String(), code}
}

func (r curlResult) status() string {
	lines := strings.Split(r.out, "\n")
	return lines[len(lines)-1]
}

func (r curlResult) body() string {
	if i := strings.LastIndex(r.out, "\n"); i >= 0 {
		return r.out[:i]
	}
	return ""
}

// TestCurlForward: plain HTTP forwarded over an HTTP/1.1 TLS connection to
// the proxy, the token as the Basic password (what curl --proxy-user and
// browsers send).
func TestCurlForward(t *testing.T) {
	p := startPinaka(t)
	plain, _ := curlOrigins(t)
	tok := mint(t, "curl-fwd", "us-east")

	r := curl(t, p, "--proxy-user", "pinaka:"+tok, plain.URL+"/hello")
	if r.code != 0 || r.status() != "200 000" {
		t.Fatalf("curl exit %d, status %q, stderr %s", r.code, r.status(), r.errOut)
	}
	if !strings.HasPrefix(r.body(), `origin: GET /hello body="" proxy-auth="" ua="curl/`) {
		t.Errorf("origin saw %q (Proxy-Authorization must not reach it; User-Agent must)", r.body())
	}
	r = curl(t, p, "--proxy-user", "pinaka:"+tok, "--data-binary", "payload", plain.URL+"/post")
	if r.code != 0 || !strings.Contains(r.body(), `origin: POST /post body="payload"`) {
		t.Errorf("POST: exit %d, %q, %s", r.code, r.out, r.errOut)
	}
	rec := p.waitRecord(t, "the forwarded GET", func(r accesslog.Record) bool {
		return r.TargetURL == plain.URL+"/hello"
	})
	if rec.Protocol != "HTTP/1.1" || rec.Method != "GET" || rec.StatusCode != 200 || rec.TokenID != "curl-fwd" || !rec.Success {
		t.Errorf("record = %+v", rec)
	}
}

// TestCurlTunnel: curl -p tunnels through the proxy with CONNECT, to a TLS
// origin (verified end to end) and a plain one, with a Bearer token.
func TestCurlTunnel(t *testing.T) {
	p := startPinaka(t)
	plain, secure := curlOrigins(t)
	tok := mint(t, "curl-tunnel", "us-east")
	for _, u := range []string{secure.URL + "/secret", plain.URL + "/plain"} {
		r := curl(t, p, "-p", "--proxy-header", "Proxy-Authorization: Bearer "+tok, u)
		if r.code != 0 || r.status() != "200 200" {
			t.Fatalf("%s: curl exit %d, status %q, stderr %s", u, r.code, r.status(), r.errOut)
		}
		if !strings.Contains(r.body(), "origin: GET /") || !strings.Contains(r.body(), `proxy-auth=""`) {
			t.Errorf("%s: origin saw %q", u, r.body())
		}
		host := strings.TrimPrefix(strings.TrimPrefix(u, "https://"), "http://")
		host = host[:strings.Index(host, "/")]
		rec := p.waitRecord(t, "CONNECT "+host, func(r accesslog.Record) bool { return r.TargetURL == host })
		if rec.Protocol != "HTTP/1.1" || rec.Method != "CONNECT" || rec.StatusCode != 200 ||
			rec.TokenID != "curl-tunnel" || rec.RequestSize == 0 || rec.ResponseSize == 0 {
			t.Errorf("record = %+v", rec)
		}
	}
}

// TestCurlRefusals: no token is a 407 with both challenges; a token for
// another region is a 403; both for forwarding and for tunnels.
func TestCurlRefusals(t *testing.T) {
	p := startPinaka(t)
	plain, secure := curlOrigins(t)
	euTok := mint(t, "curl-eu", "eu-west")

	r := curl(t, p, "-D", "-", plain.URL+"/x")
	if r.status() != "407 000" {
		t.Errorf("forward without token: status %q", r.status())
	}
	for _, c := range []string{`Proxy-Authenticate: Bearer realm="pinaka"`, `Proxy-Authenticate: Basic realm="pinaka"`} {
		if !strings.Contains(strings.ReplaceAll(r.out, "proxy-authenticate", "Proxy-Authenticate"), c) {
			t.Errorf("407 lacks %s:\n%s", c, r.out)
		}
	}
	if r = curl(t, p, "-p", secure.URL+"/x"); r.status() != "000 407" || r.code == 0 {
		t.Errorf("tunnel without token: exit %d, status %q", r.code, r.status())
	}
	if r = curl(t, p, "--proxy-user", "pinaka:"+euTok, plain.URL+"/x"); r.status() != "403 000" {
		t.Errorf("forward, wrong region: status %q", r.status())
	}
	if r = curl(t, p, "-p", "--proxy-user", "pinaka:"+euTok, secure.URL+"/x"); r.status() != "000 403" || r.code == 0 {
		t.Errorf("tunnel, wrong region: exit %d, status %q", r.code, r.status())
	}
	rec := p.waitRecord(t, "the wrong-region refusal", func(r accesslog.Record) bool { return r.TokenID == "curl-eu" })
	if rec.StatusCode != 403 || rec.Success {
		t.Errorf("record = %+v", rec)
	}
}
