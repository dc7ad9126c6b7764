package docker

import (
	"context"
	"fmt"
	"time"

	"github.com/docker/docker/client"

	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Ping checks that the Docker engine at host ("" = DOCKER_HOST or the
// default socket) answers, without building or creating anything. It is
// what `aether-cli doctor` runs on the local host.
func Ping(ctx context.Context, host string) error {
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if host != "" {
		opts = append(opts, client.WithHost(host))
	}
	api, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return fmt.Errorf("%w: docker host %q: %v", types.ErrInvalid, host, err)
	}
	defer api.Close()
	o := &Orchestrator{api: api}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return o.ping(ctx)
}

// Diagnose checks this host for the docker backend without creating
// anything: the engine at cfg.Host answers. It is the same shape as the
// other backends' Diagnose.
func Diagnose(ctx context.Context, cfg Config) []vmm.Check {
	if err := Ping(ctx, cfg.Host); err != nil {
		return []vmm.Check{{Name: "docker engine", Detail: err.Error(), Fix: "start it with `make up` (which starts a private dockerd) or set vmm.docker.host"}}
	}
	return []vmm.Check{{Name: "docker engine", OK: true, Detail: "answers"}}
}

// Diagnose checks this host for the backend as configured (see Diagnose).
func (o *Orchestrator) Diagnose(ctx context.Context) []vmm.Check { return Diagnose(ctx, o.cfg) }
