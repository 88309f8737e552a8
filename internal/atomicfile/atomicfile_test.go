package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

// Write replaces a file whole and leaves no temporary file behind; a
// missing directory is an error that names the file.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	for _, data := range []string{"first", "second, longer"} {
		if err := Write(dir, "state.json", []byte(data)); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(dir, "state.json"))
		if err != nil || string(got) != data {
			t.Fatalf("read back %q, %v; want %q", got, err, data)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("%d entries in the directory, want only the file", len(entries))
	}
	err := Write(filepath.Join(dir, "missing"), "x", []byte("x"))
	if err == nil {
		t.Fatal("Write into a missing directory succeeded")
	}
}
