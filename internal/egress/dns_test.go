package egress

import (
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/dns"
)

// testDNS is a real DNS server on a loopback UDP port, serving a small zone
// and counting the queries it receives.
type testDNS struct {
	addr string

	mu      sync.Mutex
	zone    map[string][]dns.RR // owner name (lower-case FQDN) → records
	rcode   int                 // when non-zero, every answer has this rcode
	queries map[string]int      // "name TYPE" → count
}

// startDNS serves records given in zone-file syntax, e.g.
// "private.test. 60 IN A 10.0.0.1". Names not in the zone are NXDOMAIN.
func startDNS(t *testing.T, records ...string) *testDNS {
	t.Helper()
	s := &testDNS{zone: map[string][]dns.RR{}, queries: map[string]int{}}
	for _, r := range records {
		rr, err := dns.NewRR(r)
		if err != nil {
			t.Fatalf("bad test record %q: %v", r, err)
		}
		name := strings.ToLower(rr.Header().Name)
		s.zone[name] = append(s.zone[name], rr)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = pc.LocalAddr().String()
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: s, NotifyStartedFunc: func() { close(started) }}
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return s
}

func (s *testDNS) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		_ = w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)

	s.mu.Lock()
	s.queries[name+" "+dns.TypeToString[q.Qtype]]++
	rcode := s.rcode
	rrs, exists := s.zone[name]
	// Follow CNAMEs within the zone, as a recursive resolver would.
	var answer []dns.RR
	for hops := 0; exists && hops < 8; hops++ {
		var next string
		for _, rr := range rrs {
			switch v := rr.(type) {
			case *dns.CNAME:
				answer = append(answer, rr)
				next = strings.ToLower(v.Target)
			default:
				if rr.Header().Rrtype == q.Qtype {
					answer = append(answer, rr)
				}
			}
		}
		if next == "" {
			break
		}
		rrs = s.zone[next]
	}
	s.mu.Unlock()

	switch {
	case rcode != 0:
		m.Rcode = rcode
	case !exists:
		m.Rcode = dns.RcodeNameError
	default:
		m.Answer = answer
	}
	_ = w.WriteMsg(m)
}

// count returns how many queries of type qtype ("A", "AAAA") for name were
// received.
func (s *testDNS) count(name, qtype string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[dns.Fqdn(name)+" "+qtype]
}

func (s *testDNS) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.queries {
		n += c
	}
	return n
}

// blackholeDNS returns a loopback UDP address that reads queries and never
// answers.
func blackholeDNS(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().String()
}

func (s *testDNS) setRcode(rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcode = rcode
}

func (s *testDNS) addRR(owner string, rr dns.RR) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.zone[owner] = append(s.zone[owner], rr)
}
