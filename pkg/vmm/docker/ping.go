package docker

import (
	"context"
	"fmt"
	"time"

	"github.com/docker/docker/client"

	"github.com/aetherium/aetherium-core/pkg/types"
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
