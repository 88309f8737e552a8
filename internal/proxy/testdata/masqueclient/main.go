// Command masqueclient is masque-go's CONNECT-UDP client (RFC 9298) as a
// program, for Pinaka's interoperability test (TestConnectUDPMasqueGo). It
// lives in a module of its own because masque-go v0.4.0 builds only against
// quic-go v0.60.0, and Pinaka uses a later quic-go.
//
// It dials the proxy's template for -target, sends each -send argument as
// one UDP datagram and prints each datagram it gets back as a line "got
// <payload>"; with -dns NAME it sends a DNS query for NAME's A record and
// prints "answer <address>". A refused request prints "status <code>" and
// exits 3.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/quic-go/masque-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/yosida95/uritemplate/v3"
)

func main() {
	proxy := flag.String("proxy", "", "the proxy's UDP address, host:port")
	caFile := flag.String("ca", "", "PEM file of the CA that signed the proxy's certificate")
	token := flag.String("token", "", "bearer token for Proxy-Authorization")
	target := flag.String("target", "", "UDP target, host:port")
	dnsName := flag.String("dns", "", "send a DNS query for this name's A record")
	flag.Parse()
	if err := run(*proxy, *caFile, *token, *target, *dnsName, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "masqueclient:", err)
		var se statusError
		if errors.As(err, &se) {
			fmt.Printf("status %d\n", int(se))
			os.Exit(3)
		}
		os.Exit(1)
	}
}

type statusError int

func (e statusError) Error() string { return fmt.Sprintf("proxy answered %d", int(e)) }

func run(proxy, caFile, token, target, dnsName string, send []string) error {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return errors.New("no certificate in " + caFile)
	}
	host, _, _ := strings.Cut(proxy, ":")
	tmpl, err := uritemplate.New("https://" + proxy + "/.well-known/masque/udp/{target_host}/{target_port}/")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := masque.NewRequest(ctx, tmpl, target)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header().Set("Proxy-Authorization", "Bearer "+token)
	}
	tr := &masque.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: host, NextProtos: []string{http3.NextProtoH3}}}
	conn, rsp, err := tr.Dial(req)
	if err != nil {
		if rsp != nil {
			return statusError(rsp.StatusCode)
		}
		return err
	}
	defer conn.Close()
	buf := make([]byte, 2048)
	read := func() ([]byte, error) {
		if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return nil, err
		}
		n, _, err := conn.ReadFrom(buf)
		return buf[:n], err
	}
	for _, s := range send {
		if _, err := conn.WriteTo([]byte(s), nil); err != nil {
			return err
		}
		b, err := read()
		if err != nil {
			return fmt.Errorf("reading the answer to %q: %w", s, err)
		}
		fmt.Printf("got %s\n", b)
	}
	if dnsName != "" {
		if _, err := conn.WriteTo(dnsQuery(dnsName), nil); err != nil {
			return err
		}
		b, err := read()
		if err != nil {
			return fmt.Errorf("reading the DNS answer: %w", err)
		}
		a, err := firstA(b)
		if err != nil {
			return err
		}
		fmt.Printf("answer %s\n", a)
	}
	return nil
}

// dnsQuery is a DNS query (RFC 1035 §4) for name's A record.
func dnsQuery(name string) []byte {
	b := []byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}
	for _, l := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	return append(b, 0, 0, 1, 0, 1)
}

// firstA reads the first A record of a DNS answer to dnsQuery.
func firstA(b []byte) (netip.Addr, error) {
	if len(b) < 12 || b[0] != 0x12 || b[1] != 0x34 {
		return netip.Addr{}, errors.New("not an answer to our query")
	}
	if binary.BigEndian.Uint16(b[6:8]) == 0 {
		return netip.Addr{}, fmt.Errorf("no answer (rcode %d)", b[3]&0x0f)
	}
	i := 12
	for i < len(b) && b[i] != 0 { // the question's name
		i += int(b[i]) + 1
	}
	i += 1 + 4 // its end, type and class
	for i+12 <= len(b) {
		if b[i]&0xc0 == 0xc0 { // a compressed name
			i += 2
		} else {
			for i < len(b) && b[i] != 0 {
				i += int(b[i]) + 1
			}
			i++
		}
		if i+10 > len(b) {
			break
		}
		typ, rdlen := binary.BigEndian.Uint16(b[i:]), int(binary.BigEndian.Uint16(b[i+8:]))
		i += 10
		if typ == 1 && rdlen == 4 && i+4 <= len(b) {
			return netip.AddrFrom4([4]byte(b[i : i+4])), nil
		}
		i += rdlen
	}
	return netip.Addr{}, errors.New("no A record in the answer")
}
