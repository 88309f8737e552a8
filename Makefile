# Pinaka — make targets. `make test` is what CI runs (.ci/run).
GO      ?= go
# go.mod asks for Go 1.27.3; the go command fetches that toolchain when the
# machine's own Go is older.
export GOTOOLCHAIN ?= go1.27.3
GOBIN   := $(shell $(GO) env GOPATH)/bin
export PATH := $(PATH):$(GOBIN)

.PHONY: all build run test deps lint unit fuzz e2e h2spec bench bench-collector clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o bin/pinaka ./cmd/pinaka
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/pinaka-bench ./cmd/pinaka-bench

run:
	$(GO) run ./cmd/pinaka serve --dev

deps:
	./scripts/deps.sh

# Everything CI checks, in order: formatting and vet, unit and integration
# tests with the race detector, short fuzz runs, h2spec, browser and curl
# end-to-end tests.
test: deps lint unit fuzz h2spec e2e

lint:
	@out=$$(gofmt -l . | grep -v '^cmd/.tmp' || true); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# Each fuzz target runs briefly; the committed seed corpora run in `unit`.
# The budget is a count of executions, not a duration: with a duration, Go's
# fuzz coordinator can report its own deadline as a failure ("context deadline
# exceeded") when the time runs out while a worker is busy minimising a new
# input, which failed CI once with no crasher found.
FUZZTIME ?= 500000x
# FuzzConn drives a live TLS connection per input (~250 execs/s here): its
# own, smaller budget keeps CI within minutes.
FUZZTIME_CONN ?= 10000x
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzParseAuthority$$' -fuzztime=$(FUZZTIME) ./internal/egress
	$(GO) test -run='^$$' -fuzz='^FuzzTokenFromHeader$$' -fuzztime=$(FUZZTIME) ./internal/auth
	$(GO) test -run='^$$' -fuzz='^FuzzRemoveHopByHop$$' -fuzztime=$(FUZZTIME) ./internal/proxy
	$(GO) test -run='^$$' -fuzz='^FuzzH1ConnScan$$' -fuzztime=$(FUZZTIME) ./internal/server
	$(GO) test -run='^$$' -fuzz='^FuzzConn$$' -fuzztime=$(FUZZTIME_CONN) ./internal/h2srv

h2spec:
	./e2e/h2spec.sh

e2e:
	./e2e/run.sh

bench:
	./bench/run.sh

# Collector ingest: records stored per second, 8 senders of 100-record
# batches against a real collector on the local PostgreSQL
# (PINAKA_TEST_DATABASE_URL). docs/PERFORMANCE.md, "Collector ingest".
BENCH_COLLECTOR_BATCHES ?= 5000
bench-collector:
	$(GO) test -run '^$$' -bench '^BenchmarkCollectorIngest$$' -benchtime $(BENCH_COLLECTOR_BATCHES)x -count 3 ./internal/collector/

clean:
	rm -rf bin
