package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/internal/faults"
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
	if err := w.createVM(ctx, log, vm, p); err != nil {
		return nil, err
	}
	return map[string]any{"vm_id": vm.ID}, nil
}

// createVM claims a stored VM, creates and starts it in the backend (by
// restoring p.FromSnapshot when set) and marks it running. On the last
// failed attempt what the backend made is removed and the VM marked
// failed.
func (w *Worker) createVM(ctx context.Context, log *slog.Logger, vm *types.VM, p queue.VMCreatePayload) error {
	claim := storage.Claim{Owner: w.cfg.ID, Provider: w.cfg.Provider}
	if p.DefaultNetwork {
		claim.Network = w.defaultNetwork
	}
	vm, err := w.store.ClaimVM(ctx, vm.ID, claim)
	if err != nil {
		return err
	}
	if err := w.setState(ctx, vm.ID, types.VMCreating, ""); err != nil {
		return err
	}
	start := time.Now()
	spec := vm.Spec()
	if p.FromSnapshot != "" {
		spec.FromSnapshot, err = w.snapshotDir(ctx, p.FromSnapshot)
	} else {
		spec.Tools, err = w.createTools(ctx, log, vm.ID, p.Tools)
	}
	if err == nil {
		err = w.createAndStart(ctx, spec)
	}
	if err == nil {
		err = faults.Reach(ctx, faults.CreateBooted)
	}
	if err != nil {
		if final(ctx, err) {
			w.discard(context.WithoutCancel(ctx), log, vm.ID, err)
		}
		return err
	}
	if err := w.setState(ctx, vm.ID, types.VMRunning, ""); err != nil {
		return w.raceLost(ctx, log, vm.ID, err)
	}
	w.metrics.vmCreate.WithLabelValues(w.cfg.Provider).Observe(since(vm.CreatedAt))
	w.recordConfinement(ctx, log, vm.ID)
	log.Info("vm running", "took", time.Since(start), "from_snapshot", p.FromSnapshot)
	return nil
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
	w.update(ctx, id, storage.TaskUpdate{State: ptr(types.TaskPending), Queue: &o.Queue})
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
// succeeds whatever its exit code; only an unreachable agent is retried,
// and a retry of a command that started reattaches to it instead of
// running it again (see runCommand).
func (w *Worker) handleVMExecute(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMExecutePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	id, _ := asynq.GetTaskID(ctx)
	var sio vmm.ExecIO
	var out *outputStream
	if p.Stream && w.output != nil {
		if out, err = w.openStream(ctx, id); err != nil {
			return nil, err
		}
		sio.Stdout, sio.Stderr = out.writer(queue.OutputStdout), out.writer(queue.OutputStderr)
	}
	e, err := w.runCommand(ctx, log, p.VMID, id, "", p.Command, sio)
	// The stream ends with the task's outcome: not after an attempt that
	// will be retried, whose retry goes on with the output. A cancelled
	// task ends here too, so that its caller learns it at once.
	cancelled := err != nil && errors.Is(ctx.Err(), context.Canceled) && !interrupted(ctx, err)
	if out != nil && (err == nil || cancelled || final(ctx, err)) {
		exit := &queue.ExitInfo{}
		if cancelled {
			// As the task's row says (service.CancelTask); the command
			// was killed.
			exit.Error = "cancelled"
		} else if err != nil {
			exit.Error = err.Error()
		} else {
			exit.ExitCode, exit.TimedOut = e.ExitCode, e.TimedOut
		}
		out.end(context.WithoutCancel(ctx), log, exit)
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

// runCommand runs cmd in the VM at most once and stores the execution,
// under execID. An execution already stored is returned as it is. A
// command whose start was recorded (an earlier attempt started it, then
// its worker died or storage failed) is not started again: the guest
// agent's journal is asked for it by execID, live or ended, and when the
// agent no longer has it (the guest rebooted, or it was forgotten) the
// attempt fails with types.ErrOutcomeUnknown. The VM's env is left to the
// backend, which lays it beneath cmd.Env (vmm.VMOrchestrator's
// ExecuteCommand, checked by vmmtest) together with what only it knows:
// the image's env, the guest's defaults. cmd is not validated again: the
// service did, and the agent does.
func (w *Worker) runCommand(ctx context.Context, log *slog.Logger, vmID, execID, jobID string, cmd types.Command, sio vmm.ExecIO) (*types.Execution, error) {
	if e, err := w.store.GetExecution(ctx, execID); err == nil {
		return e, nil
	} else if !errors.Is(err, types.ErrNotFound) {
		return nil, err
	}
	vm, err := w.ownedVM(ctx, vmID)
	if err != nil {
		return nil, err
	}
	if vm.State != types.VMRunning {
		return nil, fmt.Errorf("%w: vm %s is %s, not running", types.ErrConflict, vm.ID, vm.State)
	}
	started, err := w.store.GetExecutionStart(ctx, execID)
	switch {
	case err == nil:
		sio.ReattachOnly = true
	case !errors.Is(err, types.ErrNotFound):
		return nil, err
	}
	taskID, _ := asynq.GetTaskID(ctx)
	cmd.MaxOutputBytes = w.outputCap(cmd.MaxOutputBytes)
	sio.ExecutionID = execID
	sio.Started = func(pid int, reattached bool) {
		if started == nil {
			s := &storage.ExecutionStart{ID: execID, VMID: vm.ID, TaskID: taskID, PID: pid}
			if err := w.store.MarkExecutionStarted(context.WithoutCancel(ctx), s); err != nil {
				// The agent's journal still keeps it from running twice
				// while it remembers it.
				log.Warn("cannot record the command's start", "execution_id", execID, "err", err)
			}
		}
		if reattached {
			log.Info("reattached to a command an earlier attempt started", "execution_id", execID, "pid", pid)
		}
		if err := faults.Reach(ctx, faults.ExecStarted); err != nil {
			log.Warn("fault point", "err", err)
		}
	}
	res, err := w.execute(ctx, vm.ID, cmd, sio)
	if errors.Is(err, vmm.ErrUnknownExecution) {
		return nil, fmt.Errorf("%w: the worker stopped while the command ran; its result is unknown (it started at %s in vm %s and was not run again)",
			types.ErrOutcomeUnknown, started.StartedAt.Format(time.RFC3339), vm.ID)
	}
	if err != nil {
		return nil, fmt.Errorf("running %q in vm %s: %w", cmd.Cmd, vm.ID, err)
	}
	if err := faults.Reach(ctx, faults.ExecEnded); err != nil {
		return nil, err
	}
	e := types.NewExecution(execID, vm.ID, cmd, res)
	w.metrics.exec.WithLabelValues(w.cfg.Provider).Observe(e.Duration.Seconds())
	e.JobID = jobID
	e.TaskID = taskID
	if err := w.store.PutExecution(context.WithoutCancel(ctx), e); err != nil {
		// The retry reattaches to the ended command and stores it then.
		return nil, fmt.Errorf("recording execution %s: %w", execID, err)
	}
	log.Debug("command ran", "vm_id", vm.ID, "execution_id", execID, "exit_code", e.ExitCode, "took", e.Duration)
	return e, nil
}

// execute runs the command through the backend, deciding what the end of
// the attempt's context means: a cancelled task or a task timeout kills the
// command, while a worker that stops (Asynq cancels every attempt still
// running when the drain time is over) detaches from it, leaving it to run
// on in its guest for the next attempt to reattach to.
func (w *Worker) execute(ctx context.Context, id string, cmd types.Command, sio vmm.ExecIO) (*types.ExecResult, error) {
	execCtx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancel(nil)
	detach, done, stop := make(chan struct{}), make(chan struct{}), w.detach
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			if stopping(ctx) {
				close(detach)
			} else {
				cancel(context.Cause(ctx))
			}
		case <-stop:
			close(detach)
		case <-done:
		}
	}()
	sio.Detach = detach
	res, err := w.vmm.ExecuteCommand(execCtx, id, cmd, sio)
	if err != nil && execCtx.Err() != nil {
		// Reported as the attempt's own context ended, so that the
		// bookkeeping sees a cancelled or timed-out task as such.
		err = fmt.Errorf("%w (%w)", err, context.Cause(execCtx))
	}
	return res, err
}

// outputStream forwards a command's live output to its task's stream. A
// retried attempt that reattaches to the command gets its output again
// from the start; what the stream already has is skipped, so a reader
// sees every byte once.
type outputStream struct {
	w     *Worker
	id    string
	ended bool
	mu    sync.Mutex
	skip  map[queue.OutputKind]int64
	// broken is set when an append failed: Redis is down, and every later
	// append would wait out its own dial retries, slowing the command's
	// output (and its result) down for nothing. The reader learns the
	// outcome from storage instead.
	broken atomic.Bool
}

// appendTimeout bounds one append to the output stream.
const appendTimeout = 2 * time.Second

// openStream resumes task id's output stream where earlier attempts left
// it.
func (w *Worker) openStream(ctx context.Context, id string) (*outputStream, error) {
	s := &outputStream{w: w, id: id, skip: map[queue.OutputKind]int64{}}
	if retry, _ := asynq.GetRetryCount(ctx); retry == 0 || w.recovery == nil {
		return s, nil
	}
	o, e, ended, err := w.recovery.OutputSent(ctx, id)
	if err != nil {
		// Without Redis there is no stream to resume: the output is
		// stored with the execution all the same.
		w.log.Warn("cannot read what the output stream holds; resending it all", "task_id", id, "err", err)
		return s, nil
	}
	s.skip[queue.OutputStdout], s.skip[queue.OutputStderr], s.ended = o, e, ended
	return s, nil
}

func (s *outputStream) writer(kind queue.OutputKind) io.Writer {
	return writerFunc(func(p []byte) (int, error) {
		n := len(p)
		s.mu.Lock()
		if skip := s.skip[kind]; skip > 0 {
			d := min(skip, int64(len(p)))
			s.skip[kind] -= d
			p = p[d:]
		}
		s.mu.Unlock()
		if len(p) > 0 {
			s.append(queue.OutputChunk{Kind: kind, Data: append([]byte(nil), p...)})
		}
		return n, nil
	})
}

// append adds a chunk. A Redis hiccup must not kill the command: the full
// record is stored anyway.
func (s *outputStream) append(c queue.OutputChunk) {
	if s.broken.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), appendTimeout)
	defer cancel()
	if err := s.w.output.AppendOutput(ctx, s.id, c); err != nil {
		s.broken.Store(true)
		s.w.log.Warn("streaming output failed; the rest of it is only stored", "task_id", s.id, "err", err)
	}
}

// end closes the stream with the task's outcome, once.
func (s *outputStream) end(ctx context.Context, log *slog.Logger, exit *queue.ExitInfo) {
	if s.ended {
		return
	}
	// Tried even when the stream broke: Redis may be back, and a reader
	// that still follows the stream ends at once.
	ctx, cancel := context.WithTimeout(ctx, appendTimeout)
	defer cancel()
	if err := s.w.output.AppendOutput(ctx, s.id, queue.OutputChunk{Kind: queue.OutputExit, Exit: exit}); err != nil {
		log.Warn("ending output stream", "err", err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// handleVMDelete stops a VM and removes all its resources. Deleting a
// deleted VM succeeds.
func (w *Worker) handleVMDelete(ctx context.Context, t *asynq.Task, log *slog.Logger) (map[string]any, error) {
	p, err := queue.Decode[queue.VMDeletePayload](t.Payload())
	if err != nil {
		return nil, err
	}
	res, err := w.moveVM(ctx, log, p.VMID, types.VMDeleting, types.VMDeleted, "deleting", w.vmm.DeleteVM)
	if err == nil {
		w.closeTasks(context.WithoutCancel(ctx), log, p.VMID)
	}
	return res, err
}

// closeTasks ends the open tasks of a deleted VM (but the deleting task's
// own): they can never run, and their callers must learn it.
func (w *Worker) closeTasks(ctx context.Context, log *slog.Logger, vmID string) {
	self, _ := asynq.GetTaskID(ctx)
	ended, err := w.store.FailOpenTasks(ctx, vmID, self, fmt.Sprintf("vm %s was deleted before the task could finish", vmID))
	if err != nil {
		log.Warn("cannot close the deleted vm's open tasks", "err", err)
		return
	}
	for _, t := range ended {
		if w.enqueuer != nil && t.Queue != "" {
			if err := w.enqueuer.Cancel(ctx, t.ID, t.Queue); err != nil {
				log.Warn("removing a deleted vm's task from its queue", "task_id", t.ID, "err", err)
			}
		}
		if w.notifier != nil {
			_ = w.notifier.NotifyTask(ctx, t.ID)
		}
		log.Info("closed a task of the deleted vm", "task_id", t.ID, "type", t.Type)
	}
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
		e, err := w.runCommand(ctx, log, job.VMID, execID, job.ID, cmd, vmm.ExecIO{})
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
