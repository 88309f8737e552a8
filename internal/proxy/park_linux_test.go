package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/pinaka-proxy/pinaka/internal/testutil"
)

// The parker wakes a parked direction for bytes on its socket, and once a
// tunnel is released it hands back what is parked and refuses new parks,
// so no direction is left registered on a socket its tunnel closes.
func TestParkerWakesAndReleases(t *testing.T) {
	pk := newParker(slog.New(slog.DiscardHandler))
	defer pk.close()
	client, clientPeer := testutil.TCPPair(t)
	upstream, upstreamPeer := testutil.TCPPair(t)
	tn := newTunnel(pk, connEndpoint(client), connEndpoint(upstream), 0, nopOwner{})

	// Parked, the upload wakes for the client's bytes and relays them.
	if err := pk.park(&tn.up); err != nil {
		t.Fatal(err)
	}
	if n := pk.len(); n != 1 {
		t.Fatalf("%d parked, want 1", n)
	}
	if _, err := clientPeer.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	upstreamPeer.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 1)
	if _, err := io.ReadFull(upstreamPeer, got); err != nil || string(got) != "x" {
		t.Fatalf("relayed after the wake: %q %v", got, err)
	}
	if n := pk.len(); n != 0 {
		t.Fatalf("%d parked after the wake, want 0", n)
	}

	// Release takes back the parked download and refuses the upload.
	if err := pk.park(&tn.down); err != nil {
		t.Fatal(err)
	}
	up, down := pk.release(tn)
	if up || !down {
		t.Fatalf("release took up=%v down=%v, want only down", up, down)
	}
	if err := pk.park(&tn.down); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("park after release: %v, want net.ErrClosed", err)
	}
	if n := pk.len(); n != 0 {
		t.Fatalf("%d parked after release, want 0", n)
	}
}

// nopOwner owns a tunnel whose bytes and end nobody records.
type nopOwner struct{}

func (nopOwner) tunnelBytes(int, int)    {}
func (nopOwner) tunnelEnded(relayResult) {}
