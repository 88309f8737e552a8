package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/backendtls"
	"github.com/pinaka-proxy/pinaka/internal/pgtest"
	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// Mutual TLS with both binaries: `pinaka serve` ships to `pinaka collector`
// over TLS with a node certificate, and SIGHUP — to the collector for its
// client CA bundle, to the proxy for its client certificate — changes who
// is trusted without a restart, nothing lost on the way.
func TestMutualTLSWithTheBinaries(t *testing.T) {
	pool, dsn := pgtest.NewDB(t)
	dir := t.TempDir()
	serverCA := testutil.NewTestCA(t, "collector CA")
	nodeCA1, nodeCA2, nodeCA3 := testutil.NewTestCA(t, "node CA 1"), testutil.NewTestCA(t, "node CA 2"), testutil.NewTestCA(t, "node CA 3")
	collCert, collKey := serverCA.IssueFiles(t, dir, "collector", testutil.Leaf{IPs: []string{"127.0.0.1"}})
	clientCAs := filepath.Join(dir, "node-cas.pem")
	testutil.WriteFile(t, clientCAs, nodeCA1.CertPEM)
	backendCA := filepath.Join(dir, "backend-ca.pem")
	testutil.WriteFile(t, backendCA, serverCA.CertPEM)
	node := testutil.Leaf{CommonName: "node-a", URIs: []string{backendtls.NodeURIPrefix + "node-a"}, Client: true}
	nodeCert, nodeKey := nodeCA2.IssueFiles(t, dir, "node", node) // not trusted yet

	collAddr := "127.0.0.1:" + testutil.FreePort(t)
	coll := exec.Command(testutil.BuildPinaka(t), "collector")
	coll.Dir = t.TempDir()
	coll.Env = []string{"PATH=" + os.Getenv("PATH"), "COLLECTOR_ADDR=" + collAddr, "DATABASE_URL=" + dsn,
		"COLLECTOR_TLS_CERT_PATH=" + collCert, "COLLECTOR_TLS_KEY_PATH=" + collKey, "COLLECTOR_CLIENT_CA_PATH=" + clientCAs}
	collOut := &testutil.SyncBuffer{}
	coll.Stderr = collOut
	if err := coll.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		coll.Process.Signal(syscall.SIGTERM)
		coll.Wait()
		if t.Failed() {
			t.Logf("collector stderr:\n%s", collOut.String())
		}
	})
	waitFor(t, "collector up", func() bool { return strings.Contains(collOut.String(), "collector listening") })

	certPath, keyPath, _ := writeCert(t, dir)
	p := startBinary(t, certPath, keyPath, "BACKEND_URL=https://"+collAddr, "BACKEND_CA_PATH="+backendCA,
		"BACKEND_CLIENT_CERT_PATH="+nodeCert, "BACKEND_CLIENT_KEY_PATH="+nodeKey, "LOG_SPOOL_DIR="+t.TempDir(),
		"LOG_BATCH_SIZE=100", "LOG_BATCH_INTERVAL=100ms", "PROBE_NODE_NAME=node-a")
	rows := func() int {
		var n int
		pool.QueryRow(context.Background(), `SELECT count(*) FROM forward_proxy_request_logs WHERE probe_node = 'node-a'`).Scan(&n)
		return n
	}
	o := origin(t)
	tok := "Bearer " + testToken(t)
	forward(t, p.Addr, o+"/one", tok)
	waitFor(t, "the collector to refuse node CA 2", func() bool {
		return strings.Contains(collOut.String(), "collector TLS handshake refused")
	})
	if n := rows(); n != 0 {
		t.Fatalf("%d rows stored from an untrusted node certificate", n)
	}

	// Collector SIGHUP: node CA 2 joins the bundle; the spooled batch
	// goes through.
	testutil.WriteFile(t, clientCAs, append(append([]byte{}, nodeCA1.CertPEM...), nodeCA2.CertPEM...))
	coll.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the record after the collector's reload", func() bool { return rows() == 1 })
	if !strings.Contains(collOut.String(), `"client_cas":2`) {
		t.Error("the collector did not log its reload with 2 client CAs")
	}

	// Proxy SIGHUP: a certificate from node CA 3, which the collector does
	// not trust, is picked up — the next record is refused ...
	refusedBefore := strings.Count(p.Log.String(), "record batch not delivered")
	nodeCA3.IssueFiles(t, dir, "node", node)
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, "backend TLS reloaded")
	forward(t, p.Addr, o+"/two", tok)
	waitFor(t, "the proxy's new certificate to be refused", func() bool {
		return strings.Count(p.Log.String(), "record batch not delivered")+strings.Count(p.Log.String(), "redelivering parked record batch failed") > refusedBefore
	})
	if n := rows(); n != 1 {
		t.Fatalf("%d rows after the untrusted certificate's batch, want 1", n)
	}
	// ... and one from node CA 1 delivers it, no restart.
	nodeCA1.IssueFiles(t, dir, "node", node)
	p.Signal(syscall.SIGHUP)
	waitFor(t, "the record after the proxy's reload", func() bool { return rows() == 2 })

	// A bad file on SIGHUP is refused, and shipping goes on.
	testutil.WriteFile(t, nodeCert, []byte("garbage"))
	p.Signal(syscall.SIGHUP)
	waitLog(t, p, "backend TLS reload refused")
	forward(t, p.Addr, o+"/three", tok)
	waitFor(t, "the record after a refused reload", func() bool { return rows() == 3 })
	p.Signal(syscall.SIGTERM)
	if code, _ := p.Wait(t, 20*time.Second); code != 0 {
		t.Fatalf("proxy exit %d", code)
	}
}
