package accesslog

import "net/url"

// TargetURL renders the target of a plain HTTP request for its record. The
// query string is dropped unless includeQuery is set, because queries often
// carry secrets (API keys, session ids) that must not end up in a log store;
// userinfo and the fragment are always dropped for the same reason (and a
// fragment never reaches the origin anyway). A URL with a host but no scheme
// or path (a CONNECT authority) is rendered as host:port.
func TargetURL(u *url.URL, includeQuery bool) string {
	if u == nil {
		return ""
	}
	if u.Scheme == "" && u.Opaque == "" && u.Path == "" && u.RawQuery == "" && u.Host != "" {
		return u.Host
	}
	v := url.URL{
		Scheme:  u.Scheme,
		Opaque:  u.Opaque,
		Host:    u.Host,
		Path:    u.Path,
		RawPath: u.RawPath,
	}
	if includeQuery {
		v.RawQuery = u.RawQuery
		v.ForceQuery = u.ForceQuery
	}
	return v.String()
}
