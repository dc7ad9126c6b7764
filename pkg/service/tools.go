package service

import (
	"context"
	"fmt"

	"github.com/google/uuid"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// toolsInstallTimeout bounds a tools:install task: mise may download and
// build large tools.
const toolsInstallTimeout = createTimeout

// checkToolSpecs validates the specs a user gave, once, at the edge.
func checkToolSpecs(specs []string) error {
	if _, err := tools.ParseSpecs(specs); err != nil {
		return err
	}
	// Every tool is one volume, and mise itself takes one more.
	if max := types.MaxToolVolumes - 1; len(specs) > max {
		return fmt.Errorf("%w: %d tool specs given; a vm takes at most %d", types.ErrInvalid, len(specs), max)
	}
	return nil
}

func (s *Service) InstallToolsTask(ctx context.Context, vmID string, specs []string) (uuid.UUID, error) {
	if len(specs) == 0 {
		return uuid.Nil, fmt.Errorf("%w: no tool spec given; name at least one, e.g. node@22", types.ErrInvalid)
	}
	if err := checkToolSpecs(specs); err != nil {
		return uuid.Nil, err
	}
	vm, err := s.runningVM(ctx, vmID, "install tools into")
	if err != nil {
		return uuid.Nil, err
	}
	id := uuid.New()
	t, err := queue.NewToolsInstallTask(id.String(), queue.ToolsInstallPayload{VMID: vm.ID, Specs: specs})
	if err != nil {
		return uuid.Nil, err
	}
	return id, s.submit(ctx, t, queue.EnqueueOptions{Queue: queue.WorkerQueue(vm.Owner), MaxRetry: createMaxRetry, Timeout: toolsInstallTimeout})
}

func (s *Service) ListVMTools(ctx context.Context, vmID uuid.UUID) ([]types.VMTool, error) {
	if _, err := s.GetVM(ctx, vmID); err != nil {
		return nil, err
	}
	return s.store.ListVMTools(ctx, vmID.String())
}
