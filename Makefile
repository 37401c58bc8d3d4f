# fireactions — build, test, demo.
#   make demo   installs what it needs, then runs the main job on embedded defaults
#   make test   installs what it needs, then runs every test
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

GO        ?= go
BIN       := $(CURDIR)/bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/fireactions/fireactions/internal/cli.Version=$(VERSION) -X github.com/fireactions/fireactions/internal/nomad.Version=$(VERSION)
export FIREACTIONS_CACHE ?= $(HOME)/.cache/fireactions
STATICCHECK_VERSION := v0.7.0
# make test runs each fuzz target for a fixed number of inputs: a time
# budget can end while a worker is mid-input, which go test reports as
# "context deadline exceeded" without any failing input. make fuzz runs longer.
FUZZTIME  ?= 20000x
TEST_TIMEOUT ?= 40m

# Host binaries; the guest init is built separately, static.
HOST_CMDS := $(filter-out ./cmd/fireactions-init,$(addprefix ./,$(wildcard cmd/*)))

.PHONY: all build deps kernel cni nomad-agent e2e-nomad test test-go fuzz lint bench demo clean

all: build

deps:
	@scripts/deps.sh

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ $(HOST_CMDS)
	$(if $(wildcard cmd/fireactions-init),CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/fireactions-init ./cmd/fireactions-init)

# The test kernel (Debian's cloud kernel cut down to a PVH vmlinux plus its
# modules), cached in $(FIREACTIONS_CACHE)/kernel.
kernel: deps
	@scripts/test-kernel.sh | tail -n 2 > $(BIN)/kernel.env.tmp && mv $(BIN)/kernel.env.tmp $(BIN)/kernel.env

# tc-redirect-tap, built from its pinned module version into
# $(FIREACTIONS_CACHE)/cni/bin (Debian's containernetworking-plugins has the rest).
cni:
	@scripts/build-cni.sh >/dev/null

# A Nomad v1.10.5 agent for the driver's end-to-end tests, built once from
# the module proxy (about 8 minutes cold) and cached in $(FIREACTIONS_CACHE)/nomad.
# If it cannot be built, those two tests skip and say so; nothing else depends on it.
nomad-agent:
	@scripts/nomad-agent.sh >/dev/null || echo "WARNING: the Nomad agent could not be built; the Nomad end-to-end tests will skip" >&2

e2e-nomad: deps build kernel cni nomad-agent
	@set -a; [ -f $(BIN)/kernel.env ] && . $(BIN)/kernel.env; set +a; \
	  export FIREACTIONS_TEST_KERNEL="$${KERNEL:-}" FIREACTIONS_TEST_MODULES="$${MODULES:-}" FIREACTIONS_INIT=$(BIN)/fireactions-init; \
	  $(GO) test -count=1 -timeout 20m -run 'TestNomadAgentEndToEnd|TestExampleJobs' -v ./internal/nomad/

test: deps build kernel cni nomad-agent test-go
	@FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

test-go:
	@set -a; [ -f $(BIN)/kernel.env ] && . $(BIN)/kernel.env; set +a; \
	  export FIREACTIONS_TEST_KERNEL="$${KERNEL:-}" FIREACTIONS_TEST_MODULES="$${MODULES:-}" FIREACTIONS_INIT=$(BIN)/fireactions-init; \
	  $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

fuzz:
	@FUZZTIME=$${FUZZTIME:-2m} scripts/fuzz.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@if [ ! -x $(FIREACTIONS_CACHE)/tools/staticcheck-$(STATICCHECK_VERSION) ]; then \
	  mkdir -p $(FIREACTIONS_CACHE)/tools && \
	  GOBIN=$(FIREACTIONS_CACHE)/tools/sc.tmp $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) && \
	  mv $(FIREACTIONS_CACHE)/tools/sc.tmp/staticcheck $(FIREACTIONS_CACHE)/tools/staticcheck-$(STATICCHECK_VERSION) || \
	  echo "staticcheck $(STATICCHECK_VERSION) could not be installed; skipped"; fi
	@if [ -x $(FIREACTIONS_CACHE)/tools/staticcheck-$(STATICCHECK_VERSION) ]; then $(FIREACTIONS_CACHE)/tools/staticcheck-$(STATICCHECK_VERSION) ./...; fi

bench: deps build kernel cni
	$(GO) test -run='^$$' -bench=. -benchtime=5x ./...
	@if [ -x bench/image/run.sh ]; then bench/image/run.sh; fi

demo: deps build kernel
	@scripts/demo.sh

clean:
	rm -rf $(BIN)
