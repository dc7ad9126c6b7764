// Package worker is the daemon that does Aetherium Core's work: an Asynq
// server whose handlers create, run commands in and delete VMs through a
// vmm.VMOrchestrator, recording every task and VM transition in storage.
// It depends on the vmm, storage and queue interfaces, never on a backend.
package worker

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/aetherium/aetherium-core/pkg/queue"
	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/tools"
	"github.com/aetherium/aetherium-core/pkg/types"
	"github.com/aetherium/aetherium-core/pkg/vmm"
)

// Config configures a Worker. Zero values take the defaults.
type Config struct {
	// ID names this worker and its queue. Required.
	ID string
	// Provider names the worker's backend (e.g. "docker"). It is recorded
	// with the heartbeat and on every VM the worker claims. Empty: the
	// orchestrator's Capabilities().Provider, which it must equal if set.
	Provider string
	// NetworkByDefault gives VMs created without a network mode NAT
	// networking when the backend can network VMs
	// (Capabilities().Networking); otherwise they get none. The worker
	// decides this, not the service, because it depends on the backend.
	NetworkByDefault bool
	// Redis is where the task queue lives.
	Redis queue.RedisConfig
	// Concurrency is how many tasks run at once. Default 10.
	Concurrency int
	// TaskCheckInterval is how often an idle worker polls for tasks.
	// Default 5ms (Asynq's own default of 1s would add up to a second to
	// every command; see docs/architecture.md).
	TaskCheckInterval time.Duration
	// ShutdownTimeout is how long Stop waits for tasks in flight before
	// Asynq requeues them. Default 30s.
	ShutdownTimeout time.Duration
	// HeartbeatInterval is how often the worker records itself and checks
	// that the VMs it owns still run (a VM whose VMM crashed or was killed
	// is recorded as failed). Default 5s.
	HeartbeatInterval time.Duration
	// SnapshotDir is where the worker keeps the files of the snapshots and
	// templates it takes, a directory per snapshot. Empty: snapshots and
	// templates fail with types.ErrNotSupported saying to set it.
	SnapshotDir string
	// DeadAfter is how long a worker may go without a heartbeat before the
	// VMs it owns are marked types.VMLost and its queued tasks failed (by
	// whichever live worker holds the sweeper lock). Default 60s.
	DeadAfter time.Duration
	// SweepInterval is how often the sweeper (one worker at a time) marks
	// dead owners' VMs lost and enqueues again the tasks Asynq lost.
	// Default: HeartbeatInterval.
	SweepInterval time.Duration
	// MaxOutputBytes caps each stream of a command: commands asking for
	// less get what they ask, those asking for more get this (the task's
	// result says which as max_output_bytes). Default 1 MiB.
	MaxOutputBytes int
	// DataListen is the host:port of the worker's data plane, which streams
	// files to and from its VMs for the API (port 0: a free port). "" or
	// "off": no data plane. It is served only with a ClusterToken.
	DataListen string
	// DataAdvertise is the host:port the API reaches the data plane at,
	// recorded with every heartbeat. Default: the bound address.
	DataAdvertise string
	// ClusterToken is the secret the API presents to the data plane. Empty:
	// the data plane is not served.
	ClusterToken string
	// MetricsListen is the host:port serving Prometheus metrics on /metrics
	// (port 0: a free port). "" or "off": not served; MetricsHandler still
	// works.
	MetricsListen string
	// ExpiryInterval is how often the worker deletes the VMs it owns whose
	// TTL ran out. Default 1s.
	ExpiryInterval time.Duration
	// Tools installs the tools VMs ask for into this host's cache (see
	// pkg/tools). nil: creating a VM with tools, or installing tools, fails
	// with types.ErrNotSupported saying how to enable them.
	Tools tools.Installer
	// ToolDefaults are tool specs every VM this worker creates gets, after
	// its own. They need Tools.
	ToolDefaults []string
	// Logger receives the worker's logs. Default: discard.
	Logger *slog.Logger
}

// Worker processes tasks. Start and Stop may each be called more than once.
type Worker struct {
	cfg      Config
	store    storage.Store
	vmm      vmm.VMOrchestrator
	notifier queue.Notifier
	output   queue.OutputStream
	// enqueuer hands create tasks on to the queue of their VM's owner (nil:
	// they fail with types.ErrConflict instead), and enqueues again the
	// tasks Asynq lost.
	enqueuer queue.Queue
	// recovery reaches into Asynq's state for recovery (nil: none).
	recovery queueRecovery
	log      *slog.Logger

	metrics *metrics
	// defaultNetwork is the network mode of VMs whose creator left it to
	// the worker (Config.NetworkByDefault and the backend's capabilities).
	defaultNetwork string

	mu        sync.Mutex
	srv       *asynq.Server
	stopHB    context.CancelFunc
	hbDone    chan struct{}
	data      *listener // nil: no data plane
	dataAddr  string    // advertised in heartbeats
	metricsLn *listener
	// stopExpiry ends the expiry loop, which closes expiryDone once the
	// deletions it started are over.
	stopExpiry context.CancelFunc
	expiryDone chan struct{}
	started    bool
	// stopSweep ends the sweeper loop, which closes sweepDone.
	stopSweep context.CancelFunc
	sweepDone chan struct{}
	// base is the context of every task attempt; cancelBase ends the
	// attempts still running when the drain time is over.
	base       context.Context
	cancelBase context.CancelFunc
	// detach is closed when the drain time is over: commands still running
	// are left going in their guests (ExecIO.Detach), for the next run to
	// reattach to.
	detach chan struct{}
	// attempts counts the task attempts in flight (see track), which Stop
	// waits for so that each records its outcome while storage is open.
	attempts sync.WaitGroup
	// stopping is set when Stop begins: an attempt whose context ends
	// from then on was interrupted by the stop, not cancelled.
	stopping atomic.Bool

	// inflight holds the expired VMs being deleted (zero time), so that a
	// slow deletion is not started again by the next round, and those
	// whose deletion failed (when to try again).
	inflightMu sync.Mutex
	inflight   map[string]time.Time
	expiring   sync.WaitGroup
	// unknown holds the backend VMs without a row already reported by
	// Reconcile (under inflightMu).
	unknown map[string]struct{}
}

// Defaults of Config.
const (
	ExpiryIntervalDefault = time.Second
	DeadAfterDefault      = 60 * time.Second
)

// New returns a worker. notifier and output may be nil (no wake-ups, no
// streaming). When notifier also implements queue.Queue (the Redis queue
// does), a create task that reaches this worker for a VM another worker
// claimed (a retry through the shared queue) is handed on to the owner's
// queue instead of failing.
func New(cfg Config, store storage.Store, orch vmm.VMOrchestrator, notifier queue.Notifier, output queue.OutputStream) (*Worker, error) {
	if cfg.ID == "" {
		return nil, fmt.Errorf("%w: worker id is empty", types.ErrInvalid)
	}
	cfg.Concurrency = cmp.Or(cfg.Concurrency, 10)
	cfg.TaskCheckInterval = cmp.Or(cfg.TaskCheckInterval, 5*time.Millisecond)
	cfg.ShutdownTimeout = cmp.Or(cfg.ShutdownTimeout, 30*time.Second)
	cfg.HeartbeatInterval = cmp.Or(cfg.HeartbeatInterval, 5*time.Second)
	cfg.MaxOutputBytes = cmp.Or(cfg.MaxOutputBytes, types.DefaultMaxOutputBytes)
	cfg.ExpiryInterval = cmp.Or(cfg.ExpiryInterval, ExpiryIntervalDefault)
	cfg.DeadAfter = cmp.Or(cfg.DeadAfter, DeadAfterDefault)
	cfg.SweepInterval = cmp.Or(cfg.SweepInterval, cfg.HeartbeatInterval)
	caps := orch.Capabilities()
	if cfg.Provider != "" && cfg.Provider != caps.Provider {
		return nil, fmt.Errorf("%w: worker provider %q differs from its backend's %q; set vmm.provider to the backend the worker runs", types.ErrInvalid, cfg.Provider, caps.Provider)
	}
	cfg.Provider = caps.Provider
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if _, err := tools.ParseSpecs(cfg.ToolDefaults); err != nil {
		return nil, fmt.Errorf("tools.defaults: %w", err)
	}
	if len(cfg.ToolDefaults) > 0 && cfg.Tools == nil {
		return nil, fmt.Errorf("%w: tools.defaults are set but the worker has no tool installer; install mise with `sudo scripts/setup.sh` or set tools.mise_binary", types.ErrUnavailable)
	}
	m := newMetrics()
	m.watchUsage(orch)
	defaultNetwork := types.NetworkNone
	if cfg.NetworkByDefault && caps.Networking {
		defaultNetwork = types.NetworkNAT
	}
	enqueuer, _ := notifier.(queue.Queue)
	recovery, _ := notifier.(queueRecovery)
	return &Worker{cfg: cfg, defaultNetwork: defaultNetwork, enqueuer: enqueuer, recovery: recovery, store: store, vmm: orch, notifier: notifier, output: output,
		log: cfg.Logger.With("worker_id", cfg.ID), metrics: m, inflight: map[string]time.Time{}, unknown: map[string]struct{}{}}, nil
}

// ID returns the worker's id.
func (w *Worker) ID() string { return w.cfg.ID }

// Queue returns the worker's own queue.
func (w *Worker) Queue() string { return queue.WorkerQueue(w.cfg.ID) }

// Mux returns the handler mux, for tests and embedding. The bookkeeping
// middleware records every task, so the handlers only do the work.
func (w *Worker) Mux() *asynq.ServeMux {
	mux := asynq.NewServeMux()
	mux.Use(w.bookkeeping)
	mux.Handle(string(types.TaskVMCreate), taskHandler(w.handleVMCreate))
	mux.Handle(string(types.TaskVMExecute), taskHandler(w.handleVMExecute))
	mux.Handle(string(types.TaskVMDelete), taskHandler(w.handleVMDelete))
	mux.Handle(string(types.TaskVMStop), taskHandler(w.handleVMStop))
	mux.Handle(string(types.TaskVMStart), taskHandler(w.handleVMStart))
	mux.Handle(string(types.TaskJobRun), taskHandler(w.handleJobRun))
	mux.Handle(string(types.TaskToolsInstall), taskHandler(w.handleToolsInstall))
	for _, op := range []types.TaskType{types.TaskVMPause, types.TaskVMResume, types.TaskVMSuspend} {
		mux.Handle(string(op), taskHandler(w.handleVMOp))
	}
	mux.Handle(string(types.TaskVMSnapshot), taskHandler(w.handleVMSnapshot))
	mux.Handle(string(types.TaskSnapshotDelete), taskHandler(w.handleSnapshotDelete))
	mux.Handle(string(types.TaskTemplateBuild), taskHandler(w.handleTemplateBuild))
	return mux
}

// Start reconciles the backend with storage, then starts taking tasks from
// the worker's own queue (first) and the shared queue, the data plane and
// metrics listeners, and the deletion of expired VMs (a first round at
// once). It returns once the worker serves. Calling Start on a started
// worker does nothing.
func (w *Worker) Start(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.started {
		return nil
	}
	if err := w.vmm.Health(ctx); err != nil {
		return fmt.Errorf("vm backend %s is not usable: %w", w.cfg.Provider, err)
	}
	if err := w.Reconcile(ctx); err != nil {
		return fmt.Errorf("reconciling: %w", err)
	}
	if err := w.reconcileSnapshots(ctx); err != nil {
		return fmt.Errorf("reconciling snapshots: %w", err)
	}
	// Before the task server starts: its recoverer, which runs at once,
	// then retries what the previous run of this worker was running.
	if err := w.reclaim(ctx); err != nil {
		w.log.Warn("cannot take back the previous run's tasks; Asynq will retry them once their leases lapse", "err", err)
	}
	base, cancelBase := context.WithCancelCause(context.WithoutCancel(ctx))
	w.base, w.cancelBase = base, func() { cancelBase(errShutdown) }
	w.detach = make(chan struct{})
	w.stopping.Store(false)
	srv := asynq.NewServer(w.cfg.Redis.ConnOpt(), asynq.Config{
		BaseContext:              func() context.Context { return w.base },
		RetryDelayFunc:           retryDelay,
		DelayedTaskCheckInterval: time.Second,
		Concurrency:              w.cfg.Concurrency,
		// The worker's own queue goes first: its tasks concern VMs that only
		// this worker can reach.
		Queues:            map[string]int{w.Queue(): 2, queue.SharedQueue: 1},
		StrictPriority:    true,
		TaskCheckInterval: w.cfg.TaskCheckInterval,
		ShutdownTimeout:   w.cfg.ShutdownTimeout,
		Logger:            asynqLogger{w.log},
		LogLevel:          asynq.WarnLevel,
		// Invalid input is the caller's fault, not the worker's: it must not
		// count against Asynq's failure metrics.
		IsFailure: func(err error) bool { return !errors.Is(err, types.ErrInvalid) },
	})
	if err := w.startListeners(); err != nil {
		return err
	}
	if err := srv.Start(w.Mux()); err != nil {
		w.stopListeners()
		return fmt.Errorf("starting task server on Redis %s: %w", w.cfg.Redis.Addr, err)
	}
	w.srv = srv
	hbCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	// The first heartbeat is recorded before Start returns, so a started
	// worker is always visible (aether-cli workers, doctor).
	w.beat(hbCtx)
	w.stopHB, w.hbDone = stop, make(chan struct{})
	go w.heartbeat(hbCtx)
	expCtx, stopExp := context.WithCancel(context.WithoutCancel(ctx))
	w.stopExpiry, w.expiryDone = stopExp, make(chan struct{})
	go w.expiryLoop(expCtx)
	sweepCtx, stopSweep := context.WithCancel(context.WithoutCancel(ctx))
	w.stopSweep, w.sweepDone = stopSweep, make(chan struct{})
	go w.sweepLoop(sweepCtx, w.sweepDone)
	w.started = true
	w.log.Info("worker started", "queues", []string{w.Queue(), queue.SharedQueue}, "provider", w.cfg.Provider)
	return nil
}

// stopGrace bounds how long Stop waits, after the drain time, for the
// attempts it interrupted to record their outcome.
const stopGrace = 10 * time.Second

// Stop stops taking tasks, waits up to ShutdownTimeout for the tasks and
// file transfers in flight and lets Asynq requeue the rest; deletions of
// expired VMs under way are finished. The attempts still running then are
// interrupted and Stop waits (up to stopGrace) until each has recorded its
// outcome, so that the caller may close storage and Redis after it
// returns. Commands still running in guests are left running, to be
// reattached to by the next run (nothing runs twice). VMs keep running.
// Safe to call twice.
func (w *Worker) Stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.started {
		return
	}
	w.stopping.Store(true)
	w.stopExpiry()
	w.stopSweep()
	w.srv.Shutdown()
	close(w.detach)
	w.cancelBase()
	if !waitGroup(&w.attempts, stopGrace) {
		w.log.Error("task attempts did not record their outcome in time; their rows say running until the next run takes them back")
	}
	<-w.sweepDone
	w.stopHB()
	<-w.hbDone
	<-w.expiryDone
	w.stopListeners()
	w.started = false
	w.log.Info("worker stopped")
}

// beat records the worker and its backend's health.
func (w *Worker) beat(ctx context.Context) {
	host, _ := os.Hostname()
	hctx, cancel := context.WithTimeout(ctx, w.cfg.HeartbeatInterval)
	defer cancel()
	rec := &types.Worker{ID: w.cfg.ID, Hostname: host, Provider: w.cfg.Provider, Healthy: true, LastSeen: time.Now().UTC(),
		DataAddr: w.dataAddr}
	if err := w.vmm.Health(hctx); err != nil {
		rec.Healthy, rec.Detail = false, err.Error()
	}
	if err := w.store.UpsertWorker(hctx, rec); err != nil && ctx.Err() == nil {
		w.log.Warn("recording heartbeat", "err", err)
	}
}

func (w *Worker) heartbeat(ctx context.Context) {
	defer close(w.hbDone)
	beat := func() { w.beat(ctx) }
	check := func() {
		cctx, cancel := context.WithTimeout(ctx, w.cfg.HeartbeatInterval)
		defer cancel()
		if err := w.checkRunning(cctx, nil); err != nil && ctx.Err() == nil {
			w.log.Warn("checking running vms", "err", err)
		}
	}
	t := time.NewTicker(w.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			beat()
			check()
		}
	}
}

// checkRunning records as failed every VM this worker owns that storage
// says is running or paused but the backend has lost (its VMM died), with
// the backend's reason; a VM the backend has running, paused or suspended
// is recorded so. seen is the backend's list when the caller has it (nil:
// ask per VM).
func (w *Worker) checkRunning(ctx context.Context, seen map[string]vmm.VMStatus) error {
	mine, err := w.store.ListVMs(ctx, storage.VMFilter{Owner: w.cfg.ID, States: []types.VMState{types.VMRunning, types.VMPaused}})
	if err != nil {
		return err
	}
	for _, vm := range mine {
		var st *vmm.VMStatus
		if seen != nil {
			if s, ok := seen[vm.ID]; ok {
				st = &s
			}
		} else {
			s, err := w.vmm.GetVMStatus(ctx, vm.ID)
			switch {
			case err == nil:
				st = s
			case !errors.Is(err, types.ErrNotFound):
				return fmt.Errorf("vm %s: %w", vm.ID, err)
			}
		}
		if st != nil && st.State == vm.State {
			continue
		}
		if st != nil && (st.State == types.VMRunning || st.State == types.VMPaused || st.State == types.VMSuspended) {
			// A pause, resume or suspend went through but its worker died
			// before recording it (or a paused VM's second save ran it and
			// could not stop it again): the backend is right.
			if _, err := w.store.UpdateOwnedVMState(ctx, vm.ID, w.cfg.ID, vm.State, st.State, ""); err != nil {
				w.log.Warn("recording a vm's state as the backend has it", "vm_id", vm.ID, "state", st.State, "err", err)
			}
			continue
		}
		detail := "the backend no longer has the vm; delete it"
		if st != nil {
			detail = fmt.Sprintf("the vm is %s in the backend", st.State)
			if st.Detail != "" {
				detail += ": " + st.Detail
			}
			detail += "; delete it"
		}
		// Only a row still running and still this worker's is changed, in
		// one conditional update: a stop or delete that began since the list
		// was read moved it on, and wins.
		moved, err := w.store.UpdateOwnedVMState(ctx, vm.ID, w.cfg.ID, vm.State, types.VMFailed, detail)
		if err != nil {
			// One VM's failed write must not keep the others unchecked.
			w.log.Warn("cannot mark a lost vm failed; the next check retries", "vm_id", vm.ID, "err", err)
			continue
		}
		if moved {
			w.log.Warn(string(vm.State)+" vm lost by the backend", "vm_id", vm.ID, "detail", detail)
		}
	}
	return nil
}

// Reconcile makes the backend and storage agree after a crash or restart:
// VMs marked lost while this worker was away are taken back (running) if
// the backend still runs them and failed otherwise; backend VMs whose rows
// say deleted or failed are removed, and rows of running VMs that the
// backend lost are marked failed. A backend VM without a row is left alone
// and reported once (a worker pointed at the wrong or a fresh database
// must not wipe the VMs it runs): the operator deletes it with the
// backend's own tools if it is indeed a leak. A VM whose create never
// finished is left to its create task, which resumes it when retried, and
// one in deleting to its delete task (queued for this worker, also when it
// was deleted while lost). It is idempotent.
func (w *Worker) Reconcile(ctx context.Context) error {
	have, err := w.vmm.ListVMs(ctx)
	if err != nil {
		return fmt.Errorf("listing backend vms: %w", err)
	}
	seen := map[string]vmm.VMStatus{}
	for _, st := range have {
		seen[st.ID] = st
	}
	// First, so that a lost VM found gone in the backend is failed, and its
	// leftovers removed below.
	if err := w.adoptLost(ctx, seen); err != nil {
		return err
	}
	for _, st := range have {
		vm, err := w.store.GetVM(ctx, st.ID)
		switch {
		case errors.Is(err, types.ErrNotFound):
			w.reportUnknown(st.ID)
			continue
		case err != nil:
			return err
		case vm.State != types.VMDeleted && vm.State != types.VMFailed:
			continue
		}
		w.log.Info("removing leaked vm", "vm_id", st.ID, "state", vm.State)
		if err := w.vmm.DeleteVM(ctx, st.ID); err != nil {
			return fmt.Errorf("removing leaked vm %s: %w", st.ID, err)
		}
	}
	return w.checkRunning(ctx, seen)
}

// reportUnknown logs, once per worker process, a backend VM that storage
// has no row for.
func (w *Worker) reportUnknown(id string) {
	w.inflightMu.Lock()
	defer w.inflightMu.Unlock()
	if _, done := w.unknown[id]; done {
		return
	}
	w.unknown[id] = struct{}{}
	w.log.Warn("the backend runs a vm that storage does not know; leaving it alone. Is the worker pointed at the right database? If it is a leak, remove it with the backend's tools",
		"vm_id", id, "provider", w.cfg.Provider)
}

// asynqLogger adapts slog to Asynq's logger.
type asynqLogger struct{ l *slog.Logger }

func (a asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a asynqLogger) Warn(args ...any)  { a.l.Warn(fmt.Sprint(args...)) }
func (a asynqLogger) Error(args ...any) { a.l.Error(fmt.Sprint(args...)) }
func (a asynqLogger) Fatal(args ...any) { a.l.Error(fmt.Sprint(args...)) }

// result encodes a task result.
func result(v any) json.RawMessage {
	b, _ := json.Marshal(v)
	return b
}

// waitGroup waits for wg up to d and reports whether it finished.
func waitGroup(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}
