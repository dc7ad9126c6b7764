# Aetherium Core. Every target is a thin wrapper over scripts/ so that the
# README's commands work even before `make` is installed.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: build test test-coverage bench migrate-up migrate-down run-worker \
        setup services-up services-down up down run proto vet fmt clean

build:            ## build bin/worker, bin/fc-agent (static), bin/aether-cli, bin/migrate
	./scripts/build.sh

test:             ## run the whole test suite (starts its own services)
	./scripts/test.sh

test-coverage:    ## run the tests with coverage into coverage.out
	./scripts/test.sh -coverprofile=coverage.out -coverpkg=./pkg/...,./internal/...
	go tool cover -func=coverage.out | tail -1

bench:            ## run the benchmarks quoted in docs/benchmarks.md
	./scripts/bench.sh

migrate-up: build ## apply the schema to the configured database
	./bin/migrate up

migrate-down: build ## revert the whole schema
	./bin/migrate down

run-worker: build ## run a worker in the foreground with the current config
	./bin/worker

.PHONY: guest-image
guest-image: build ## build the guest image (kernel, initramfs, rootfs) into the image cache; a no-op when up to date
	./bin/aether-cli image build

setup:            ## install system packages (idempotent)
	./scripts/setup.sh

services-up:      ## start private PostgreSQL and Redis under .aetherium/
	./scripts/services.sh up

services-down:    ## stop them
	./scripts/services.sh down

up:               ## start services, schema, dockerd if needed and the worker in the background
	./scripts/up.sh

down:             ## stop everything `make up` started
	./scripts/down.sh

run:              ## like up, in the foreground; Ctrl-C stops it all
	./scripts/up.sh --foreground

proto:            ## regenerate the agent's gRPC code (needs protoc, protoc-gen-go, protoc-gen-go-grpc)
	cd pkg/agent/agentpb && go generate ./...

vet:
	go vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin coverage.out
