package h2srv

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/pinaka-proxy/pinaka/internal/httpx"
)

// headerBlock is a header block being decoded: HEADERS and its
// CONTINUATIONs. Fields are checked as the decoder emits them (RFC 9113
// §8.2, §8.3), so a block is never held whole, encoded or decoded.
type headerBlock struct {
	stream    uint32
	kind      blockKind
	endStream bool
	encoded   int // bytes of fragments so far
	frames    int
	size      int // RFC 7541 §4.1 size of the fields decoded so far
	tooLarge  bool
	malformed string // why the request is malformed, if it is

	method, scheme, authority, path, protocol string
	sawRegular                                bool
	header                                    http.Header
	cookies                                   []string
}

type blockKind uint8

const (
	blockRequest  blockKind = iota // opens a stream
	blockTrailers                  // ends an open stream
	blockClosed                    // for a stream already closed: connection error once decoded
	blockIgnored                   // decoded for the HPACK state only (above the GOAWAY id, refused)
)

// maxHeaderFrames bounds HEADERS + CONTINUATION frames per block.
const maxHeaderFrames = 16

// oversizedBlockCost is the flood credit a header block over
// MaxHeaderBytes costs: decoding one takes up to ~300 µs.
const oversizedBlockCost = 10

// maxEncodedBlock bounds a header block's encoded bytes.
func (c *conn) maxEncodedBlock() int { return 2*c.cfg.MaxHeaderBytes + defaultMaxFrame }

func (c *conn) processHeaders(f *http2.HeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return connErr(http2.ErrCodeProtocol, "even stream id from a client")
	}
	hb := &headerBlock{stream: id, endStream: f.StreamEnded()}
	s := c.streams[id]
	switch {
	case s != nil:
		hb.kind = blockTrailers
	case id <= c.maxID:
		hb.kind = blockClosed
	default:
		c.maxID = id
		if c.draining && id > c.lastID || c.goneAway {
			hb.kind = blockIgnored
		}
	}
	if f.HasPriority() && f.Priority.StreamDep == id {
		hb.malformed = "depends on itself"
	}
	if len(f.HeaderBlockFragment()) == 0 && !f.HeadersEnded() {
		if err := c.charge("headers"); err != nil {
			return err
		}
	}
	c.hb = hb
	if !f.HeadersEnded() {
		// The rest of the block must come within the header timeout; no
		// other frame can come in between (§6.10).
		c.src.setDeadline(time.Now().Add(c.cfg.HeaderReadTimeout))
	}
	return c.continueHeaderBlock(f.HeaderBlockFragment(), f.HeadersEnded())
}

func (c *conn) continueHeaderBlock(frag []byte, end bool) error {
	hb := c.hb
	hb.frames++
	hb.encoded += len(frag)
	if hb.frames > maxHeaderFrames || hb.encoded > c.maxEncodedBlock() {
		return connErr(http2.ErrCodeEnhanceYourCalm, "header block too large")
	}
	if _, err := c.hdec.Write(frag); err != nil {
		return connErr(http2.ErrCodeCompression, "HPACK: "+err.Error())
	}
	if !end {
		return nil
	}
	c.src.setDeadline(time.Time{})
	c.hb = nil
	c.hdec.SetEmitEnabled(true)
	if err := c.hdec.Close(); err != nil {
		return connErr(http2.ErrCodeCompression, "HPACK: "+err.Error())
	}
	return c.endHeaderBlock(hb)
}

// emitField checks one decoded field and adds it to the block.
func (c *conn) emitField(f hpack.HeaderField) {
	hb := c.hb
	hb.size += int(f.Size())
	if hb.size > c.cfg.MaxHeaderBytes {
		// Decode the rest for the HPACK state, without keeping it.
		hb.tooLarge = true
		c.hdec.SetEmitEnabled(false)
		return
	}
	if hb.malformed != "" {
		return
	}
	if strings.HasPrefix(f.Name, ":") {
		hb.pseudo(f)
		return
	}
	hb.sawRegular = true
	if !validFieldName(f.Name) {
		hb.malformed = "invalid field name"
		return
	}
	if !httpguts.ValidHeaderFieldValue(f.Value) {
		hb.malformed = "invalid field value"
		return
	}
	switch f.Name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
		hb.malformed = "connection-specific field " + f.Name // §8.2.2
		return
	case "te":
		if f.Value != "trailers" {
			hb.malformed = "te other than trailers"
			return
		}
	case "cookie":
		// §8.2.3: cookie crumbs are joined for HTTP/1.1 semantics.
		hb.cookies = append(hb.cookies, f.Value)
		return
	}
	if hb.header == nil {
		hb.header = make(http.Header)
	}
	k := http.CanonicalHeaderKey(f.Name)
	hb.header[k] = append(hb.header[k], f.Value)
}

func (hb *headerBlock) pseudo(f hpack.HeaderField) {
	if hb.sawRegular || hb.kind == blockTrailers {
		hb.malformed = "pseudo-header after regular fields or in trailers"
		return
	}
	var p *string
	switch f.Name {
	case ":method":
		p = &hb.method
	case ":scheme":
		p = &hb.scheme
	case ":authority":
		p = &hb.authority
	case ":path":
		p = &hb.path
	case ":protocol":
		p = &hb.protocol
	default:
		hb.malformed = "unknown pseudo-header " + f.Name
		return
	}
	if *p != "" || f.Value == "" && f.Name != ":authority" {
		hb.malformed = "duplicate or empty " + f.Name
		return
	}
	*p = f.Value
}

// validFieldName: a token, lowercase (§8.2.1).
func validFieldName(s string) bool {
	if !httpguts.ValidHeaderFieldName(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return false
		}
	}
	return true
}

// endHeaderBlock acts on a complete header block.
func (c *conn) endHeaderBlock(hb *headerBlock) error {
	switch hb.kind {
	case blockIgnored:
		return nil
	case blockClosed:
		return connErr(http2.ErrCodeStreamClosed, "HEADERS on a closed stream")
	case blockTrailers:
		return c.endTrailers(hb)
	}
	if hb.malformed == "" && !hb.tooLarge {
		hb.malformed = hb.checkRequest()
	}
	if hb.malformed != "" {
		c.streamErrorLocked(hb.stream, http2.ErrCodeProtocol, "malformed")
		return c.charge("malformed")
	}
	if len(c.streams) >= int(c.cfg.MaxConcurrentStreams) {
		// Streams count until their handler returns, not until the client
		// resets them: rapid reset gains nothing (CVE-2023-44487).
		c.streamErrorLocked(hb.stream, http2.ErrCodeRefusedStream, "refused")
		return c.charge("refused")
	}
	s := c.newStreamLocked(hb.stream)
	if hb.endStream {
		s.remoteClosed = true
	}
	if hb.tooLarge {
		// §10.5.1: answer 431 without a handler; the connection goes on.
		// Decoding the block cost real work (an HPACK bomb references a
		// large table entry thousands of times), so it is charged as
		// several frames that do no work, and its answer earns nothing.
		s.discard = true
		s.noCredit = true
		s.respondLocked(http.StatusRequestHeaderFieldsTooLarge)
		return c.chargeN("headers_too_large", oversizedBlockCost)
	}
	req, err := c.newRequest(s, hb)
	if err != nil {
		// There will be no handler: the stream leaves once its reset is out.
		c.streamErrorLocked(hb.stream, http2.ErrCodeProtocol, "malformed")
		s.handlerDoneLocked()
		return nil
	}
	s.req = req
	c.srv.workers.run(func() { s.runHandler(req) })
	return nil
}

// checkRequest applies RFC 9113 §8.3.1 and §8.5, and RFC 8441 §4.
func (hb *headerBlock) checkRequest() string {
	switch {
	case hb.method == "":
		return "no :method"
	case hb.method == "CONNECT" && hb.protocol == "":
		if hb.scheme != "" || hb.path != "" || hb.authority == "" {
			return "CONNECT with :scheme or :path, or without :authority"
		}
	case hb.protocol != "" && hb.method != "CONNECT":
		return ":protocol without CONNECT"
	case hb.scheme == "" || hb.path == "":
		return "no :scheme or :path"
	case hb.protocol != "" && hb.authority == "":
		return "extended CONNECT without :authority"
	}
	return ""
}

func (c *conn) endTrailers(hb *headerBlock) error {
	s := c.streams[hb.stream]
	if s == nil || s.remoteClosed {
		c.streamErrorLocked(hb.stream, http2.ErrCodeStreamClosed, "stream_closed")
		return nil
	}
	if !hb.endStream || hb.malformed != "" || hb.tooLarge {
		// §8.1: trailers end the stream and carry no pseudo-headers.
		c.streamErrorLocked(hb.stream, http2.ErrCodeProtocol, "malformed")
		return nil
	}
	for k := range hb.header {
		if !httpguts.ValidTrailerHeader(k) {
			c.streamErrorLocked(hb.stream, http2.ErrCodeProtocol, "malformed")
			return nil
		}
	}
	// They reach r.Trailer when the handler's Read returns io.EOF, on its
	// goroutine: the handler may be reading r.Trailer now (Request.Clone).
	s.trailer = hb.header
	c.endRemoteLocked(s)
	return nil
}

// newRequest builds the *http.Request a handler sees.
func (c *conn) newRequest(s *stream, hb *headerBlock) (*http.Request, error) {
	header := hb.header
	if header == nil {
		header = make(http.Header)
	}
	if len(hb.cookies) > 0 {
		header.Set("Cookie", strings.Join(hb.cookies, "; "))
	}
	host := hb.authority
	if host == "" {
		host = header.Get("Host")
	}
	var (
		u          *url.URL
		requestURI string
		err        error
	)
	if hb.method == "CONNECT" && hb.protocol == "" {
		u = &url.URL{Host: hb.authority}
		requestURI = hb.authority
	} else {
		u, err = url.ParseRequestURI(hb.path)
		if err != nil {
			return nil, err
		}
		requestURI = hb.path
	}
	contentLength := int64(-1)
	if hb.endStream {
		contentLength = 0
	} else if v := header.Get("Content-Length"); v != "" {
		n, err := strconv.ParseUint(v, 10, 63)
		if err != nil || len(header["Content-Length"]) > 1 {
			return nil, strconv.ErrSyntax
		}
		contentLength = int64(n)
		s.declaredLen = contentLength
	}
	var trailer http.Header
	trailerNames(header["Trailer"], func(k string) {
		if trailer == nil {
			trailer = make(http.Header)
		}
		trailer[k] = nil
	})
	if strings.EqualFold(header.Get("Expect"), "100-continue") && !hb.endStream {
		s.expectContinue = true
	}
	ctx := httpx.WithInfo(c.baseCtx, &httpx.Info{Scheme: hb.scheme, Protocol: hb.protocol})
	ctx, s.cancel = context.WithCancelCause(ctx)
	r := &http.Request{
		Method:        hb.method,
		URL:           u,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
		Header:        header,
		ContentLength: contentLength,
		Host:          host,
		RemoteAddr:    c.remote,
		RequestURI:    requestURI,
		TLS:           c.tlsState,
		Trailer:       trailer,
	}
	if hb.endStream {
		r.Body = http.NoBody
	} else {
		r.Body = &requestBody{s: s}
	}
	return r.WithContext(ctx), nil
}

// trailerNames calls f with each field name a "Trailer" header lists that
// may be a trailer (RFC 9110 §6.5.1), in canonical form.
func trailerNames(vv []string, f func(k string)) {
	for _, v := range vv {
		for _, k := range strings.Split(v, ",") {
			if k = http.CanonicalHeaderKey(strings.TrimSpace(k)); k != "" && httpguts.ValidTrailerHeader(k) {
				f(k)
			}
		}
	}
}
