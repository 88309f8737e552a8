// Package atomicfile writes files that a crash leaves either whole or
// absent: what a node keeps across restarts (the spool, the saved key set,
// the saved revocation list) must never be read back half-written.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// ErrDirSync marks a Write whose file is in place but whose directory
// entry was not fsynced: the data is readable now and may not survive a
// power loss.
var ErrDirSync = errors.New("syncing the directory")

// Write writes data to dir/name through a temporary file in dir, fsynced
// and renamed over it, then fsyncs dir so the rename is durable.
func Write(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".*.tmp")
	if err != nil {
		return fmt.Errorf("creating a temporary file for %s: %w", name, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if err := SyncDir(dir); err != nil {
		return fmt.Errorf("%w %s: %w", ErrDirSync, dir, err)
	}
	return nil
}

// SyncDir makes the renames and creations in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
