package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// ownedVM loads a VM that this worker must own.
func (w *Worker) ownedVM(ctx context.Context, id string) (*types.VM, error) {
	vm, err := w.store.GetVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if vm.Owner != "" && vm.Owner != w.cfg.ID {
		return nil, fmt.Errorf("%w: vm %s belongs to worker %s, not %s", types.ErrConflict, id, vm.Owner, w.cfg.ID)
	}
	return vm, nil
}

// recordConfinement stores how the backend confines a running VM's VMM
// (uid, gid, cgroup) on its row, for `vm get`. It only informs, so a
// failure is logged, not returned: the VM runs either way.
func (w *Worker) recordConfinement(ctx context.Context, log *slog.Logger, id string) {
	st, err := w.vmm.GetVMStatus(ctx, id)
	if err != nil || st.Jail == nil {
		return
	}
	if err := w.store.SetVMConfinement(ctx, id, st.Jail); err != nil {
		log.Warn("cannot record the vm's confinement", "err", err)
	}
}

func (w *Worker) setState(ctx context.Context, id string, to types.VMState, msg string) error {
	_, err := w.store.UpdateVMState(ctx, id, to, msg)
	if err != nil {
		return fmt.Errorf("marking vm %s %s: %w", id, to, err)
	}
	return nil
}

// handleVMCreate creates and boots a VM and returns once its agent answers.
// A retry resumes: the backend's CreateVM and StartVM are idempotent. On the
// last failed attempt everything made is removed and the VM is marked failed.
func (w *Worker) handleVMCreate(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMCreatePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	vm, err := w.store.GetVM(ctx, p.VMID)
	if err != nil {
		return nil, err
	}
	if vm.Owner != "" && vm.Owner != w.cfg.ID {
		// A retry of a create another worker claimed came through the
		// shared queue: it belongs to the owner, which holds whatever the
		// first attempts made.
		if vm.State == types.VMPending || vm.State == types.VMCreating {
			return nil, w.handOn(ctx, t, vm.Owner)
		}
		return nil, fmt.Errorf("%w: vm %s belongs to worker %s, not %s", types.ErrConflict, vm.ID, vm.Owner, w.cfg.ID)
	}
	log = log.With("vm_id", vm.ID)
	switch vm.State {
	case types.VMDeleting, types.VMDeleted:
		return nil, fmt.Errorf("%w: vm %s was deleted before it could be created", types.ErrConflict, vm.ID)
	case types.VMRunning:
		if st, err := w.vmm.GetVMStatus(ctx, vm.ID); err == nil && st.State == types.VMRunning {
			return map[string]any{"vm_id": vm.ID}, nil
		}
	}
	claim := storage.Claim{Owner: w.cfg.ID, Provider: w.cfg.Provider}
	if p.DefaultNetwork {
		claim.Network = w.defaultNetwork
	}
	if vm, err = w.store.ClaimVM(ctx, vm.ID, claim); err != nil {
		return nil, err
	}
	if err := w.setState(ctx, vm.ID, types.VMCreating, ""); err != nil {
		return nil, err
	}
	start := time.Now()
	spec := vm.Spec()
	if spec.Tools, err = w.createTools(ctx, log, vm.ID, p.Tools); err == nil {
		err = w.createAndStart(ctx, spec)
	}
	if err != nil {
		if final(ctx, err) {
			w.discard(context.WithoutCancel(ctx), log, vm.ID, err)
		}
		return nil, err
	}
	if err := w.setState(ctx, vm.ID, types.VMRunning, ""); err != nil {
		return nil, w.raceLost(ctx, log, vm.ID, err)
	}
	w.metrics.vmCreate.WithLabelValues(w.cfg.Provider).Observe(since(vm.CreatedAt))
	w.recordConfinement(ctx, log, vm.ID)
	log.Info("vm running", "took", time.Since(start))
	return map[string]any{"vm_id": vm.ID}, nil
}

// handedOn is the outcome of an attempt that passed its task on to another
// worker's queue: the task is neither done nor failed (handOn recorded it
// pending again), and this copy of it ends.
type handedOn struct{ owner, queue string }

func (h *handedOn) Error() string {
	return fmt.Sprintf("handed on to worker %s (queue %s)", h.owner, h.queue)
}

// handOn enqueues the task t under its own id on owner's queue, with the
// retries and time it has left, so that the worker holding the VM runs it.
// Without an enqueuer it fails as before hand-on existed, with
// types.ErrConflict naming the owner. A failed enqueue is returned as it
// is, for asynq to retry.
func (w *Worker) handOn(ctx context.Context, t *asynq.Task, owner string) error {
	vmErr := fmt.Errorf("%w: the vm belongs to worker %s, not %s", types.ErrConflict, owner, w.cfg.ID)
	if w.enqueuer == nil {
		return vmErr
	}
	// A worker that stopped reporting reads no queue: handing the task to
	// it would leave the VM creating with nobody to finish it. Fail as
	// before, saying why, until dead owners are handled (issue 13, item 4).
	if wk, err := w.store.GetWorker(ctx, owner); err != nil || time.Since(wk.LastSeen) > ownerSilentAfter(w.cfg.HeartbeatInterval) {
		since := "never"
		if err == nil {
			since = wk.LastSeen.UTC().Format(time.RFC3339)
		}
		return fmt.Errorf("%w; owner worker %s has not reported since %s, so the task is not handed on to it", vmErr, owner, since)
	}
	id, _ := asynq.GetTaskID(ctx)
	retry, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)
	o := queue.EnqueueOptions{Queue: queue.WorkerQueue(owner), MaxRetry: max(maxRetry-retry, 0)}
	if d, ok := ctx.Deadline(); ok {
		o.Timeout = time.Until(d)
	}
	// The row goes back to pending before the owner can see the task, so
	// that this does not overwrite what the owner records.
	w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskPending)})
	task := &types.Task{ID: id, Type: types.TaskType(t.Type()), Payload: t.Payload()}
	if err := w.enqueuer.Enqueue(ctx, task, o); err != nil {
		return fmt.Errorf("handing task %s on to worker %s: %w", id, owner, err)
	}
	return &handedOn{owner: owner, queue: o.Queue}
}

// raceLost handles a VM that could not be marked running: when a delete
// won the race (the service retires a VM it saw unclaimed while this
// worker claimed it), what the backend made is removed, or it would leak
// until the next Reconcile. Other errors are returned as they are.
func (w *Worker) raceLost(ctx context.Context, log *slog.Logger, id string, err error) error {
	bg := context.WithoutCancel(ctx)
	cur, gerr := w.store.GetVM(bg, id)
	if gerr != nil || (cur.State != types.VMDeleting && cur.State != types.VMDeleted) {
		return err
	}
	log.Info("vm deleted while it was being created; removing it")
	if derr := w.vmm.DeleteVM(bg, id); derr != nil {
		log.Error("removing vm deleted during its creation", "err", derr)
	}
	return fmt.Errorf("%w: vm %s was deleted while it was being created", types.ErrConflict, id)
}

func (w *Worker) createAndStart(ctx context.Context, spec types.VMSpec) error {
	if _, err := w.vmm.CreateVM(ctx, spec); err != nil {
		return fmt.Errorf("creating vm %s: %w", spec.ID, err)
	}
	if err := w.vmm.StartVM(ctx, spec.ID); err != nil {
		return fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	return nil
}

// discard removes whatever the backend made for a VM that will not come up
// and records why it failed.
func (w *Worker) discard(ctx context.Context, log *slog.Logger, id string, cause error) {
	if err := w.vmm.DeleteVM(ctx, id); err != nil {
		log.Error("cleaning up failed vm", "err", err)
	}
	if err := w.setState(ctx, id, types.VMFailed, cause.Error()); err != nil {
		log.Error("recording failed vm", "err", err)
	}
}

// handleVMExecute runs one command through the VM's agent and records the
// execution (its id is the task id). When the command ran, the task
// succeeds whatever its exit code; only an unreachable agent is retried.
func (w *Worker) handleVMExecute(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMExecutePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	id, _ := asynq.GetTaskID(ctx)
	var sio vmm.ExecIO
	var exit *queue.ExitInfo
	if p.Stream && w.output != nil {
		sio = vmm.ExecIO{Stdout: &chunkWriter{w, id, queue.OutputStdout}, Stderr: &chunkWriter{w, id, queue.OutputStderr}}
		exit = &queue.ExitInfo{}
		defer func() {
			if err := w.output.AppendOutput(context.WithoutCancel(ctx), id, queue.OutputChunk{Kind: queue.OutputExit, Exit: exit}); err != nil {
				log.Warn("ending output stream", "err", err)
			}
		}()
	}
	e, err := w.runCommand(ctx, log, p.VMID, id, "", p.Command, sio)
	if exit != nil {
		if err != nil {
			exit.Error = err.Error()
		} else {
			exit.ExitCode, exit.TimedOut = e.ExitCode, e.TimedOut
		}
	}
	if err != nil {
		return nil, err
	}
	return map[string]any{"execution_id": e.ID, "exit_code": e.ExitCode, "timed_out": e.TimedOut,
		"max_output_bytes": w.outputCap(p.Command.MaxOutputBytes)}, nil
}

// outputCap is the per-stream output cap a command asking for requested
// bytes gets: the worker's MaxOutputBytes when it asks for none or for more.
// The operator's cap is a ceiling, not a default: what is kept is held in
// this process's memory (and stored in PostgreSQL), so a caller must not be
// able to raise it.
func (w *Worker) outputCap(requested int) int {
	if requested <= 0 || requested > w.cfg.MaxOutputBytes {
		return w.cfg.MaxOutputBytes
	}
	return requested
}

// runCommand runs cmd in the VM and stores the execution. The VM's env is
// left to the backend, which lays it beneath cmd.Env (vmm.VMOrchestrator's
// ExecuteCommand, checked by vmmtest) together with what only it knows:
// the image's env, the guest's defaults. cmd is not validated again: the
// service did, and the agent does.
func (w *Worker) runCommand(ctx context.Context, log *slog.Logger, vmID, execID, jobID string, cmd types.Command, sio vmm.ExecIO) (*types.Execution, error) {
	vm, err := w.ownedVM(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if vm.State != types.VMRunning {
		return nil, fmt.Errorf("%w: vm %s is %s, not running", types.ErrConflict, vm.ID, vm.State)
	}
	cmd.MaxOutputBytes = w.outputCap(cmd.MaxOutputBytes)
	res, err := w.vmm.ExecuteCommand(ctx, vm.ID, cmd, sio)
	if err != nil {
		return nil, fmt.Errorf("running %q in vm %s: %w", cmd.Cmd, vm.ID, err)
	}
	e := types.NewExecution(execID, vm.ID, cmd, res)
	w.metrics.exec.WithLabelValues(w.cfg.Provider).Observe(e.Duration.Seconds())
	e.JobID = jobID
	e.TaskID, _ = asynq.GetTaskID(ctx)
	if err := w.store.PutExecution(context.WithoutCancel(ctx), e); err != nil {
		return nil, fmt.Errorf("recording execution %s: %w", execID, err)
	}
	log.Debug("command ran", "vm_id", vm.ID, "execution_id", execID, "exit_code", e.ExitCode, "took", e.Duration)
	return e, nil
}

// chunkWriter forwards live output to the task's output stream. A Redis
// hiccup must not kill the command: the full record is stored anyway.
type chunkWriter struct {
	w    *Worker
	id   string
	kind queue.OutputKind
}

func (c *chunkWriter) Write(p []byte) (int, error) {
	data := append([]byte(nil), p...)
	if err := c.w.output.AppendOutput(context.Background(), c.id, queue.OutputChunk{Kind: c.kind, Data: data}); err != nil {
		c.w.log.Warn("streaming output", "task_id", c.id, "err", err)
	}
	return len(p), nil
}

// handleVMDelete stops a VM and removes all its resources. Deleting a
// deleted VM succeeds.
func (w *Worker) handleVMDelete(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMDeletePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	return w.moveVM(ctx, log, p.VMID, types.VMDeleting, types.VMDeleted, "deleting", w.vmm.DeleteVM)
}

// handleVMStop stops a running VM.
func (w *Worker) handleVMStop(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMStopPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	return w.moveVM(ctx, log, p.VMID, types.VMStopping, types.VMStopped, "stopping",
		func(ctx context.Context, id string) error { return w.vmm.StopVM(ctx, id, p.Force) })
}

// moveVM takes an owned VM through state `via` to `to` while op runs. A VM
// already in `to` is left alone; if op fails on the last attempt the VM is
// marked failed so that only delete is left to do.
func (w *Worker) moveVM(ctx context.Context, log *slog.Logger, id string, via, to types.VMState, what string, op func(context.Context, string) error) (map[string]any, error) {
	vm, err := w.ownedVM(ctx, id)
	if err != nil {
		return nil, err
	}
	res := map[string]any{"vm_id": vm.ID}
	if vm.State == to {
		return res, nil
	}
	if err := w.setState(ctx, vm.ID, via, ""); err != nil {
		return nil, err
	}
	if err := op(ctx, vm.ID); err != nil {
		err = fmt.Errorf("%s vm %s: %w", what, vm.ID, err)
		if final(ctx, err) {
			_ = w.setState(context.WithoutCancel(ctx), vm.ID, types.VMFailed, err.Error())
		}
		return nil, err
	}
	if err := w.setState(ctx, vm.ID, to, ""); err != nil {
		return nil, err
	}
	log.Info("vm "+string(to), "vm_id", vm.ID)
	return res, nil
}

// handleVMStart boots a stopped VM again.
func (w *Worker) handleVMStart(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMStartPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	vm, err := w.ownedVM(ctx, p.VMID)
	if err != nil {
		return nil, err
	}
	if vm.State != types.VMRunning {
		if err := types.CheckTransition(vm.State, types.VMRunning); err != nil {
			return nil, err
		}
		if err := w.vmm.StartVM(ctx, vm.ID); err != nil {
			return nil, fmt.Errorf("starting vm %s: %w", vm.ID, err)
		}
	}
	if err := w.setState(ctx, vm.ID, types.VMRunning, ""); err != nil {
		return nil, err
	}
	w.recordConfinement(ctx, log, vm.ID)
	return map[string]any{"vm_id": vm.ID}, nil
}

// handleJobRun runs a job's commands in order. A retry resumes after the
// commands already recorded (their execution ids are derived from the job).
func (w *Worker) handleJobRun(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.JobRunPayload](t.Payload())
	if err != nil {
		return nil, err
	}
	job, err := w.store.GetJob(ctx, p.JobID)
	if err != nil {
		return nil, err
	}
	jobUUID, err := uuid.Parse(job.ID)
	if err != nil {
		return nil, fmt.Errorf("%w: job id %q is not a UUID", types.ErrInvalid, job.ID)
	}
	if err := w.store.UpdateJobState(ctx, job.ID, types.JobRunning, ""); err != nil {
		return nil, err
	}
	state, failedAt := types.JobSucceeded, 0
	for i, cmd := range job.Commands {
		execID := uuid.NewSHA1(jobUUID, []byte(strconv.Itoa(i))).String()
		e, err := w.store.GetExecution(ctx, execID)
		if errors.Is(err, types.ErrNotFound) {
			e, err = w.runCommand(ctx, log, job.VMID, execID, job.ID, cmd, vmm.ExecIO{})
		}
		if err != nil {
			if final(ctx, err) {
				_ = w.store.UpdateJobState(context.WithoutCancel(ctx), job.ID, types.JobFailed, err.Error())
			}
			return nil, err
		}
		if e.ExitCode != 0 || e.TimedOut {
			if state == types.JobSucceeded {
				failedAt = i + 1
			}
			state = types.JobFailed
			if job.StopOnFailure {
				break
			}
		}
	}
	msg := ""
	if state == types.JobFailed {
		msg = fmt.Sprintf("command %d failed", failedAt)
	}
	if err := w.store.UpdateJobState(ctx, job.ID, state, msg); err != nil {
		return nil, err
	}
	return map[string]any{"job_id": job.ID, "state": state}, nil
}

// ownerSilentAfter is how long a worker may go without a heartbeat before
// tasks are no longer handed on to it: a few missed beats.
func ownerSilentAfter(beat time.Duration) time.Duration { return max(6*beat, 30*time.Second) }
