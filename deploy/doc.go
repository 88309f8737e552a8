// Package deploy holds Pinaka's deployment files (Dockerfile, systemd units,
// the example environment file). It has no Go code of its own: its tests
// check those files against the code they deploy.
package deploy
