package proxy_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// origin records the last request it saw and answers by path.
type origin struct {
	*httptest.Server
	mu    sync.Mutex
	last  *http.Request
	conns int
}

func newOrigin(t *testing.T) *origin {
	t.Helper()
	o := &origin{}
	o.Server = httptest.NewUnstartedServer(http.HandlerFunc(o.serve))
	o.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			o.mu.Lock()
			o.conns++
			o.mu.Unlock()
		}
	}
	o.Start()
	t.Cleanup(o.Close)
	return o
}

func (o *origin) lastRequest() *http.Request {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.last
}

func (o *origin) connCount() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.conns
}

func (o *origin) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	o.last = r.Clone(r.Context())
	o.mu.Unlock()
	switch r.URL.Path {
	case "/redirect":
		http.Redirect(w, r, "/elsewhere", http.StatusFound)
	case "/upload":
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	case "/download":
		w.Header().Set("Content-Type", "application/octet-stream")
		// No Content-Length: the body is streamed chunked.
		seed := bytes.Repeat([]byte("0123456789abcdef"), 4096)
		for i := 0; i < 400; i++ { // 400 × 64 KiB = 25 MiB
			if _, err := w.Write(seed); err != nil {
				return
			}
		}
	case "/trailers":
		w.Header().Set("Trailer", "X-Checksum")
		io.WriteString(w, "body")
		w.Header().Set("X-Checksum", "abc123")
	case "/echo-trailers":
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "trailer=%s", r.Trailer.Get("X-Req-Trailer"))
	default:
		fmt.Fprintf(w, "%s %s", r.Method, r.URL.RequestURI())
	}
}

func TestForwardHTTP1AllMethodsAndHeaders(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	c := e.h1Client(e.bearer())
	for _, m := range []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} {
		var body io.Reader
		if m == "POST" || m == "PUT" || m == "PATCH" {
			body = strings.NewReader("payload")
		}
		req, _ := http.NewRequest(m, o.URL+"/path?q=1", body)
		req.Header.Set("User-Agent", "pinaka-test/1")
		req.Header.Set("Accept", "text/plain")
		req.Header.Set("Cookie", "a=b")
		req.Header.Set("X-Custom", "kept")
		req.Header.Set("Connection", "X-Hop")
		req.Header.Set("X-Hop", "must-go")
		req.Header.Set("Keep-Alive", "timeout=5")
		req.Header.Set("Proxy-Connection", "keep-alive")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("%s: status %d", m, resp.StatusCode)
		}
		if m != "HEAD" && string(got) != m+" /path?q=1" {
			t.Errorf("%s: body %q", m, got)
		}
		if v := resp.Header.Get("Via"); !strings.Contains(v, "pinaka") {
			t.Errorf("%s: response Via %q", m, v)
		}
		in := o.lastRequest()
		for _, h := range []string{"Proxy-Authorization", "X-Hop", "Keep-Alive", "Proxy-Connection", "X-Forwarded-For", "Forwarded"} {
			if v := in.Header.Get(h); v != "" {
				t.Errorf("%s: origin received %s: %q", m, h, v)
			}
		}
		for h, want := range map[string]string{"User-Agent": "pinaka-test/1", "Accept": "text/plain", "Cookie": "a=b", "X-Custom": "kept"} {
			if v := in.Header.Get(h); v != want {
				t.Errorf("%s: origin got %s=%q, want %q", m, h, v, want)
			}
		}
		if v := in.Header.Get("Via"); v != "1.1 pinaka" {
			t.Errorf("%s: origin Via %q", m, v)
		}
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "DELETE" })
	if r.TargetURL != o.URL+"/path" || r.StatusCode != 200 || !r.Success || r.TokenID != "tok-1" ||
		r.UserID != "user-1" || r.Protocol != "HTTP/1.1" || r.Region != "us-east" || r.ProbeNode != "test-node" || r.ClientIP != "127.0.0.1" {
		t.Errorf("record = %+v", r)
	}
}

func TestForwardHTTP2(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	cc := e.h2Conn()
	u, _ := url.Parse(o.URL + "/h2path?x=y")
	req, _ := http.NewRequest("POST", u.String(), strings.NewReader("hello"))
	req.Header.Set("Proxy-Authorization", e.bearer())
	req.Header.Set("X-Custom", "kept")
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "POST /h2path?x=y" {
		t.Fatalf("status %d body %q", resp.StatusCode, body)
	}
	in := o.lastRequest()
	if in.Header.Get("Proxy-Authorization") != "" || in.Header.Get("X-Custom") != "kept" || in.Header.Get("Via") != "2 pinaka" {
		t.Errorf("origin headers: %v", in.Header)
	}
	if in.Host != u.Host {
		t.Errorf("origin Host %q, want %q", in.Host, u.Host)
	}
	r := e.waitRecord(func(r recordT) bool { return r.Method == "POST" })
	if r.Protocol != "HTTP/2" || r.RequestSize != 5 || r.ResponseSize != int64(len(body)) || r.TargetURL != o.URL+"/h2path" {
		t.Errorf("record = %+v", r)
	}
}

func TestForwardQueryKeptWhenConfigured(t *testing.T) {
	e := startProxy(t, map[string]string{"LOG_INCLUDE_QUERY": "true"})
	o := newOrigin(t)
	resp, err := e.h1Client(e.bearer()).Get(o.URL + "/q?secret=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	r := e.waitRecord(func(r recordT) bool { return r.Method == "GET" })
	if r.TargetURL != o.URL+"/q?secret=1" {
		t.Errorf("target_url = %q", r.TargetURL)
	}
}

func TestForwardLargeBodiesBothWays(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	payload := make([]byte, 21<<20)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	want := fmt.Sprintf("%d %x", len(payload), sum)

	check := func(name string, rt func(*http.Request) (*http.Response, error), req *http.Request) {
		resp, err := rt(req)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if req.URL.Path == "/upload" && string(got) != want {
			t.Errorf("%s: origin saw %q, want %q", name, got, want)
		}
		if req.URL.Path == "/download" && len(got) != 400*64<<10 {
			t.Errorf("%s: downloaded %d bytes", name, len(got))
		}
	}
	h1 := e.h1Client(e.bearer())
	// Chunked upload: no Content-Length, a reader of unknown size.
	up, _ := http.NewRequest("PUT", o.URL+"/upload", io.MultiReader(bytes.NewReader(payload)))
	check("h1 upload", h1.Do, up)
	down, _ := http.NewRequest("GET", o.URL+"/download", nil)
	check("h1 download", h1.Do, down)

	cc := e.h2Conn()
	up2, _ := http.NewRequest("PUT", o.URL+"/upload", io.MultiReader(bytes.NewReader(payload)))
	up2.Header.Set("Proxy-Authorization", e.bearer())
	check("h2 upload", cc.RoundTrip, up2)
	down2, _ := http.NewRequest("GET", o.URL+"/download", nil)
	down2.Header.Set("Proxy-Authorization", e.bearer())
	check("h2 download", cc.RoundTrip, down2)

	r := e.waitRecord(func(r recordT) bool { return r.Method == "PUT" && r.Protocol == "HTTP/1.1" })
	if r.RequestSize != int64(len(payload)) {
		t.Errorf("h1 upload record request_size = %d, want %d", r.RequestSize, len(payload))
	}
}

func TestForwardTrailersBothWays(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	resp, err := e.h1Client(e.bearer()).Get(o.URL + "/trailers")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "body" || resp.Trailer.Get("X-Checksum") != "abc123" {
		t.Errorf("body %q trailer %v", body, resp.Trailer)
	}
	req, _ := http.NewRequest("POST", o.URL+"/echo-trailers", io.MultiReader(strings.NewReader("data")))
	req.Trailer = http.Header{"X-Req-Trailer": {"t-value"}}
	resp, err = e.h1Client(e.bearer()).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "trailer=t-value" {
		t.Errorf("request trailer: origin said %q", body)
	}
}

func TestForwardRedirectPassedThrough(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	resp, err := e.h1Client(e.bearer()).Get(o.URL + "/redirect")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/elsewhere" {
		t.Errorf("status %d Location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if o.lastRequest().URL.Path != "/redirect" {
		t.Errorf("proxy followed the redirect to %s", o.lastRequest().URL.Path)
	}
}

func TestForwardKeepsUpstreamConnectionsAlive(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	c := e.h1Client(e.bearer())
	for i := 0; i < 20; i++ {
		resp, err := c.Get(o.URL + "/x")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if n := o.connCount(); n != 1 {
		t.Errorf("20 sequential requests used %d upstream connections, want 1 (pooled)", n)
	}
}

func TestForwardDisabledKeepsConnect(t *testing.T) {
	e := startProxy(t, map[string]string{"HTTP_PROXY_ENABLED": "false"})
	o := newOrigin(t)
	resp, err := e.h1Client(e.bearer()).Get(o.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("plain HTTP with forwarding disabled: %d, want 403", resp.StatusCode)
	}
	echo := newEchoServer(t)
	conn, _, status := e.h1Connect(echo.addr(), e.bearer(), nil)
	if status != 200 {
		t.Fatalf("CONNECT with forwarding disabled: %d", status)
	}
	conn.Close()
}

func TestRequestsForTheProxyItself(t *testing.T) {
	e := startProxy(t, nil)
	// HTTP/1.1 origin-form.
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: e.tlsConfig()}}
	resp, err := c.Get("https://" + e.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "forward proxy") {
		t.Errorf("origin-form: %d %q", resp.StatusCode, body)
	}
	// HTTP/2 with :scheme https and the proxy as :authority.
	cc := e.h2Conn()
	req, _ := http.NewRequest("GET", "https://"+e.addr+"/", nil)
	req.Header.Set("Proxy-Authorization", e.bearer())
	resp, err = cc.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("h2 :scheme https: %d, want 400", resp.StatusCode)
	}
	// And a forwarded request aimed at the proxy's own address is refused
	// by the egress policy, even though loopback is allowed here.
	resp, err = e.h1Client(e.bearer()).Get("http://" + e.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("forward to self: %d, want 403", resp.StatusCode)
	}
}

func TestTraceRefused(t *testing.T) {
	e := startProxy(t, nil)
	o := newOrigin(t)
	req, _ := http.NewRequest("TRACE", o.URL+"/", nil)
	resp, err := e.h1Client(e.bearer()).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("TRACE: %d", resp.StatusCode)
	}
	if o.lastRequest() != nil {
		t.Error("TRACE reached the origin")
	}
}

func TestOversizedHeadersRefused(t *testing.T) {
	e := startProxy(t, map[string]string{"MAX_HEADER_BYTES": "4096"})
	o := newOrigin(t)
	req, _ := http.NewRequest("GET", o.URL+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 64<<10))
	resp, err := e.h1Client(e.bearer()).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB header: %d, want 431", resp.StatusCode)
	}
	// The proxy is still healthy.
	resp, err = e.h1Client(e.bearer()).Get(o.URL + "/ok")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("after oversized header: %v %v", err, resp)
	}
	resp.Body.Close()
}

// The core classifies an HTTP/2 request by what its engine says (httpx.Info),
// not by r.TLS, which the engine sets on every request.
func TestClassifyFollowsEngineInfo(t *testing.T) {
	e := startProxy(t, nil)
	for _, c := range []struct {
		name   string
		info   *httpx.Info
		method string
		want   int
		target string
	}{
		{"engine says :scheme http: forwarding (needs credentials)", &httpx.Info{Scheme: "http"}, "GET", http.StatusProxyAuthRequired, "http://example.test/p"},
		{"engine says :scheme https: the proxy itself", &httpx.Info{Scheme: "https"}, "GET", http.StatusBadRequest, ""},
		{"engine says :protocol websocket: extended CONNECT", &httpx.Info{Scheme: "https", Protocol: "websocket"}, "CONNECT", http.StatusProxyAuthRequired, "wss://example.test/p"},
		{"no Info (no :scheme known): the proxy itself", nil, "GET", http.StatusBadRequest, ""},
	} {
		r := httptest.NewRequest(c.method, "/p", nil)
		r.ProtoMajor, r.ProtoMinor, r.Proto = 2, 0, "HTTP/2.0"
		r.Host = "example.test"
		r.TLS = &tls.ConnectionState{}
		if c.info != nil {
			r = r.WithContext(httpx.WithInfo(r.Context(), c.info))
		}
		w := httptest.NewRecorder()
		e.app.Proxy.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("%s: status %d, want %d", c.name, w.Code, c.want)
		}
		if c.target != "" {
			rec := e.waitRecord(func(r recordT) bool { return r.TargetURL == c.target })
			if rec.StatusCode != c.want {
				t.Errorf("%s: record %+v", c.name, rec)
			}
		}
	}
}
