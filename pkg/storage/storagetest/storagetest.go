// Package storagetest is the conformance suite of storage.Store: every
// implementation runs it from its own tests, and a new store is done when it
// passes. It also pins down what the interface comments leave open:
//
//   - Stores fill in zero CreatedAt, UpdatedAt and LastSeen, and an empty
//     task or job state means pending.
//   - Times read back equal to the microsecond.
//   - Nil maps and slices read back nil; empty ones read back empty.
//   - Rows referring to a VM or job that does not exist (a job, an
//     execution) are refused with types.ErrNotFound, and values the schema
//     forbids (an unknown state, zero vcpus) with types.ErrInvalid.
package storagetest

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/aetherium/aetherium-core/pkg/storage"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// Run runs the suite. newStore returns an empty store for one test and
// arranges for it to be closed when the test ends; it is called from
// parallel subtests.
func Run(t *testing.T, newStore func(t *testing.T) storage.Store) {
	tests := []struct {
		name string
		run  func(t *testing.T, s storage.Store)
	}{
		{"VMRoundTrip", testVMRoundTrip},
		{"VMEveryState", testVMEveryState},
		{"VMInvalid", testVMInvalid},
		{"VMNotFound", testVMNotFound},
		{"VMConflict", testVMConflict},
		{"VMNameReuseAfterDelete", testVMNameReuseAfterDelete},
		{"ListVMs", testListVMs},
		{"UpdateVMStateTransitions", testUpdateVMStateTransitions},
		{"UpdateVMStateSameState", testUpdateVMStateSameState},
		{"UpdateVMStateConcurrent", testUpdateVMStateConcurrent},
		{"ClaimVM", testClaimVM},
		{"ClaimVMConcurrent", testClaimVMConcurrent},
		{"UpdateOwnedVMState", testUpdateOwnedVMState},
		{"UpdateOwnedVMStateRace", testUpdateOwnedVMStateRace},
		{"TaskRoundTrip", testTaskRoundTrip},
		{"TaskErrors", testTaskErrors},
		{"UpdateTask", testUpdateTask},
		{"ListTasks", testListTasks},
		{"ExecutionRoundTrip", testExecutionRoundTrip},
		{"PutExecutionIdempotent", testPutExecutionIdempotent},
		{"ExecutionErrors", testExecutionErrors},
		{"ListExecutions", testListExecutions},
		{"Job", testJob},
		{"JobErrors", testJobErrors},
		{"JobExecutions", testJobExecutions},
		{"Workers", testWorkers},
		{"PingAndSchema", testPingAndSchema},
		{"Tenants", testTenants},
		{"CountVMs", testCountVMs},
		{"CreateVMWithin", testCreateVMWithin},
		{"CreateVMWithinConcurrent", testCreateVMWithinConcurrent},
		{"VMExpiry", testVMExpiry},
		{"VMConfinement", testVMConfinement},
		{"ListVMsFilters", testListVMsFilters},
		{"APIKeys", testAPIKeys},
		{"WorkerDataAddr", testWorkerDataAddr},
		{"Sandboxes", testSandboxes},
		{"Templates", testTemplates},
		{"VMTools", testVMTools},
		{"OpenTasks", testOpenTasks},
		{"ExecutionStarts", testExecutionStarts},
		{"MarkOwnerVMsLost", testMarkOwnerVMsLost},
		{"RunExclusive", testRunExclusive},
		{"Snapshots", testSnapshots},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, newStore(t))
		})
	}
}

var idSeq atomic.Int64

// newID returns an id unique within the test binary.
func newID(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, time.Now().UnixNano(), idSeq.Add(1))
}

// base is a fixed instant, so the suite can compare times exactly; rows
// get base plus an offset to order them.
var base = time.Date(2026, 11, 27, 12, 0, 0, 123456000, time.UTC)

func at(offset time.Duration) time.Time { return base.Add(offset) }

// newVM returns a VM ready for CreateVM.
func newVM(name string, state types.VMState) *types.VM {
	return &types.VM{
		ID:        newID("vm"),
		Name:      name,
		VCPUs:     1,
		MemoryMB:  128,
		State:     state,
		Provider:  "docker",
		CreatedAt: at(0),
		UpdatedAt: at(0),
	}
}

// createVM stores a new VM in state and returns it.
func createVM(t *testing.T, s storage.Store, name string, state types.VMState) *types.VM {
	t.Helper()
	vm := newVM(name, state)
	require.NoError(t, s.CreateVM(t.Context(), vm))
	return vm
}

// micro normalizes a time the way stores keep it.
func micro(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

func normVM(v *types.VM) *types.VM {
	c := *v
	c.CreatedAt, c.UpdatedAt = micro(c.CreatedAt), micro(c.UpdatedAt)
	if c.Network == "" {
		c.Network = types.NetworkNone // stores keep "" as none
	}
	return &c
}

func normTask(v *types.Task) *types.Task {
	c := *v
	c.CreatedAt, c.UpdatedAt = micro(c.CreatedAt), micro(c.UpdatedAt)
	if c.FinishedAt != nil {
		f := micro(*c.FinishedAt)
		c.FinishedAt = &f
	}
	return &c
}

func normExecution(v *types.Execution) *types.Execution {
	c := *v
	c.StartedAt, c.FinishedAt = micro(c.StartedAt), micro(c.FinishedAt)
	return &c
}

func normJob(v *types.Job) *types.Job {
	c := *v
	c.CreatedAt, c.UpdatedAt = micro(c.CreatedAt), micro(c.UpdatedAt)
	c.Executions = nil
	for _, e := range v.Executions {
		c.Executions = append(c.Executions, normExecution(e))
	}
	return &c
}

func normWorker(v *types.Worker) *types.Worker {
	c := *v
	c.LastSeen = micro(c.LastSeen)
	return &c
}

func ids[T any](items []T, id func(T) string) []string {
	out := []string{}
	for _, it := range items {
		out = append(out, id(it))
	}
	return out
}

func vmID(v *types.VM) string               { return v.ID }
func taskID(v *types.Task) string           { return v.ID }
func executionID(v *types.Execution) string { return v.ID }

// errorCase is a call that must fail with an error of the given kind.
type errorCase struct {
	name string
	call func() error
	kind error
}

func requireErrors(t *testing.T, cases []errorCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.call(), tc.kind)
		})
	}
}

func testVMRoundTrip(t *testing.T, s storage.Store) {
	ctx := t.Context()
	for _, tc := range []struct {
		name string
		vm   *types.VM
	}{
		{"full", &types.VM{
			ID: newID("vm"), Name: "full", VCPUs: 2, MemoryMB: 512, State: types.VMRunning,
			Provider: "qemu", Owner: "worker-1",
			Labels:    map[string]string{"team": "core", "app.kubernetes.io/name": "x"},
			Env:       map[string]string{"GREETING": "héllo wörld", "EMPTY": ""},
			Error:     "an old error",
			Network:   types.NetworkNAT,
			OnExpiry:  types.ExpiryPause,
			CreatedAt: at(0), UpdatedAt: at(time.Second),
		}},
		{"nil maps", newVM("nil-maps", types.VMPending)},
		{"empty maps", func() *types.VM {
			vm := newVM("empty-maps", types.VMPending)
			vm.Labels, vm.Env = map[string]string{}, map[string]string{}
			return vm
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := *tc.vm
			want.OnExpiry = cmp.Or(want.OnExpiry, types.ExpiryDelete) // CreateVM's default
			require.NoError(t, s.CreateVM(ctx, tc.vm))
			got, err := s.GetVM(ctx, tc.vm.ID)
			require.NoError(t, err)
			require.Equal(t, normVM(&want), normVM(got))
		})
	}

	t.Run("zero timestamps are filled in", func(t *testing.T) {
		vm := newVM("stamped", types.VMPending)
		vm.CreatedAt, vm.UpdatedAt = time.Time{}, time.Time{}
		before := time.Now().Add(-time.Second)
		require.NoError(t, s.CreateVM(ctx, vm))
		require.False(t, vm.CreatedAt.IsZero(), "CreateVM left CreatedAt zero")
		require.WithinRange(t, vm.CreatedAt, before, time.Now().Add(time.Second))
		require.Equal(t, micro(vm.CreatedAt), micro(vm.UpdatedAt))
		got, err := s.GetVM(ctx, vm.ID)
		require.NoError(t, err)
		require.Equal(t, normVM(vm), normVM(got))
	})
}

// testVMEveryState checks that the store accepts every state of the state
// machine (a schema whose CHECK forgets one fails here).
func testVMEveryState(t *testing.T, s storage.Store) {
	for _, st := range types.AllVMStates {
		vm := createVM(t, s, "state-"+string(st), st)
		got, err := s.GetVM(t.Context(), vm.ID)
		require.NoError(t, err)
		require.Equal(t, st, got.State)
	}
}

func testVMInvalid(t *testing.T, s storage.Store) {
	for _, tc := range []struct {
		name   string
		change func(*types.VM)
	}{
		{"no id", func(v *types.VM) { v.ID = "" }},
		{"unknown state", func(v *types.VM) { v.State = "sleeping" }},
		{"empty state", func(v *types.VM) { v.State = "" }},
		{"zero vcpus", func(v *types.VM) { v.VCPUs = 0 }},
		{"too little memory", func(v *types.VM) { v.MemoryMB = types.MinMemoryMB - 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := newVM("invalid", types.VMPending)
			tc.change(vm)
			err := s.CreateVM(t.Context(), vm)
			require.ErrorIs(t, err, types.ErrInvalid)
		})
	}
}

func testVMNotFound(t *testing.T, s storage.Store) {
	ctx := t.Context()
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"GetVM", func() error { _, err := s.GetVM(ctx, "vm-missing"); return err }},
		{"UpdateVMState", func() error {
			_, err := s.UpdateVMState(ctx, "vm-missing", types.VMCreating, "")
			return err
		}},
		{"ClaimVM", func() error {
			_, err := s.ClaimVM(ctx, "vm-missing", storage.Claim{Owner: "worker-1", Provider: "docker"})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			require.ErrorIs(t, err, types.ErrNotFound)
			require.Contains(t, err.Error(), "vm-missing", "the message should name the missing vm")
		})
	}
}

func testVMConflict(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "taken", types.VMRunning)

	t.Run("same id", func(t *testing.T) {
		dup := newVM("other-name", types.VMPending)
		dup.ID = vm.ID
		require.ErrorIs(t, s.CreateVM(ctx, dup), types.ErrConflict)
	})
	// Every state but deleted holds the name, failed included.
	for _, st := range types.AllVMStates {
		if st == types.VMDeleted {
			continue
		}
		t.Run("name held by a "+string(st)+" vm", func(t *testing.T) {
			holder := createVM(t, s, "held-"+string(st), st)
			err := s.CreateVM(ctx, newVM(holder.Name, types.VMPending))
			require.ErrorIs(t, err, types.ErrConflict)
		})
	}
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, "taken", got.Name, "a refused insert must not change the existing vm")
}

func testVMNameReuseAfterDelete(t *testing.T, s storage.Store) {
	ctx := t.Context()
	first := createVM(t, s, "reused", types.VMRunning)
	for _, st := range []types.VMState{types.VMDeleting, types.VMDeleted} {
		_, err := s.UpdateVMState(ctx, first.ID, st, "")
		require.NoError(t, err)
	}
	second := createVM(t, s, "reused", types.VMPending)
	require.ErrorIs(t, s.CreateVM(ctx, newVM("reused", types.VMPending)), types.ErrConflict,
		"the new vm holds the name again")

	// Deleting the second one frees the name once more; both deleted rows
	// stay readable.
	for _, st := range []types.VMState{types.VMDeleting, types.VMDeleted} {
		_, err := s.UpdateVMState(ctx, second.ID, st, "")
		require.NoError(t, err)
	}
	createVM(t, s, "reused", types.VMPending)
	for _, id := range []string{first.ID, second.ID} {
		got, err := s.GetVM(ctx, id)
		require.NoError(t, err)
		require.Equal(t, types.VMDeleted, got.State)
	}
}

func testListVMs(t *testing.T, s storage.Store) {
	ctx := t.Context()
	mk := func(name string, state types.VMState, owner string, offset time.Duration) *types.VM {
		vm := newVM(name, state)
		vm.Owner = owner
		vm.CreatedAt, vm.UpdatedAt = at(offset), at(offset)
		require.NoError(t, s.CreateVM(ctx, vm))
		return vm
	}
	// Inserted out of creation order, to check the order of the result.
	c := mk("c", types.VMStopped, "w2", 3*time.Second)
	a := mk("a", types.VMRunning, "w1", 1*time.Second)
	d := mk("d", types.VMDeleted, "w1", 4*time.Second)
	b := mk("b", types.VMPending, "", 2*time.Second)
	e := mk("e", types.VMFailed, "w1", 5*time.Second)

	for _, tc := range []struct {
		name   string
		filter storage.VMFilter
		want   []*types.VM
	}{
		{"zero filter hides deleted", storage.VMFilter{}, []*types.VM{a, b, c, e}},
		{"include deleted", storage.VMFilter{IncludeDeleted: true}, []*types.VM{a, b, c, d, e}},
		{"owner", storage.VMFilter{Owner: "w1"}, []*types.VM{a, e}},
		{"owner with deleted", storage.VMFilter{Owner: "w1", IncludeDeleted: true}, []*types.VM{a, d, e}},
		{"states", storage.VMFilter{States: []types.VMState{types.VMRunning, types.VMStopped}}, []*types.VM{a, c}},
		{"states and owner", storage.VMFilter{Owner: "w2", States: []types.VMState{types.VMRunning, types.VMStopped}}, []*types.VM{c}},
		{"no match", storage.VMFilter{Owner: "nobody"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.ListVMs(ctx, tc.filter)
			require.NoError(t, err)
			require.Equal(t, ids(tc.want, vmID), ids(got, vmID))
			for i := range got {
				require.Equal(t, normVM(tc.want[i]), normVM(got[i]))
			}
		})
	}
}

// testUpdateVMStateTransitions tries every pair of states and expects
// exactly what types.CheckTransition allows.
func testUpdateVMStateTransitions(t *testing.T, s storage.Store) {
	ctx := t.Context()
	for _, from := range types.AllVMStates {
		for _, to := range types.AllVMStates {
			t.Run(fmt.Sprintf("%s to %s", from, to), func(t *testing.T) {
				vm := createVM(t, s, newID("tr"), from)
				got, err := s.UpdateVMState(ctx, vm.ID, to, "why: "+string(to))
				stored, gerr := s.GetVM(ctx, vm.ID)
				require.NoError(t, gerr)
				if want := types.CheckTransition(from, to); want != nil {
					require.ErrorIs(t, err, types.ErrConflict)
					require.Nil(t, got)
					require.Equal(t, from, stored.State, "a refused transition must not change the vm")
					require.Empty(t, stored.Error)
					return
				}
				require.NoError(t, err)
				require.Equal(t, to, got.State)
				require.Equal(t, "why: "+string(to), got.Error)
				require.Equal(t, normVM(got), normVM(stored), "the returned vm is the stored one")
				require.Equal(t, vm.Name, got.Name)
			})
		}
	}
	t.Run("unknown state", func(t *testing.T) {
		vm := createVM(t, s, "unknown-target", types.VMPending)
		_, err := s.UpdateVMState(ctx, vm.ID, "sleeping", "")
		require.ErrorIs(t, err, types.ErrInvalid)
	})
}

func testUpdateVMStateSameState(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "same", types.VMRunning)
	first, err := s.UpdateVMState(ctx, vm.ID, types.VMRunning, "")
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, first.State)
	require.Equal(t, normVM(vm), normVM(first), "moving to the current state changes nothing")

	// ... besides the error text.
	second, err := s.UpdateVMState(ctx, vm.ID, types.VMRunning, "guest agent slow")
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, second.State)
	require.Equal(t, "guest agent slow", second.Error)

	// Deleted is terminal, but staying deleted is still a harmless retry.
	gone := createVM(t, s, "gone", types.VMDeleted)
	_, err = s.UpdateVMState(ctx, gone.ID, types.VMDeleted, "")
	require.NoError(t, err)
}

// raceTriple finds a state with two ways out that exclude each other: once
// either has been taken, the other is illegal. It is derived from
// types.CheckTransition so that the test follows the state machine.
func raceTriple(t *testing.T) (from, a, b types.VMState) {
	t.Helper()
	ok := func(x, y types.VMState) bool { return types.CheckTransition(x, y) == nil }
	for _, from := range types.AllVMStates {
		for _, a := range types.AllVMStates {
			for _, b := range types.AllVMStates {
				if a != from && b != from && a != b && ok(from, a) && ok(from, b) && !ok(a, b) && !ok(b, a) {
					return from, a, b
				}
			}
		}
	}
	t.Fatal("the state machine has no state with two mutually exclusive ways out")
	return "", "", ""
}

// testUpdateVMStateConcurrent races two transitions that exclude each
// other: exactly one must win, whatever the interleaving.
func testUpdateVMStateConcurrent(t *testing.T, s storage.Store) {
	ctx := t.Context()
	from, a, b := raceTriple(t)
	t.Logf("racing %s -> %s against %s -> %s", from, a, from, b)
	for round := range 20 {
		vm := createVM(t, s, fmt.Sprintf("race-%d", round), from)
		targets := []types.VMState{a, b}
		errs := make([]error, len(targets))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, to := range targets {
			wg.Go(func() {
				<-start
				_, errs[i] = s.UpdateVMState(ctx, vm.ID, to, "")
			})
		}
		close(start)
		wg.Wait()

		winners := 0
		var winner types.VMState
		for i, err := range errs {
			if err == nil {
				winners++
				winner = targets[i]
				continue
			}
			require.ErrorIs(t, err, types.ErrConflict, "round %d: the loser must get a conflict", round)
		}
		require.Equal(t, 1, winners, "round %d: exactly one transition must win: %v", round, errs)
		got, err := s.GetVM(ctx, vm.ID)
		require.NoError(t, err)
		require.Equal(t, winner, got.State, "round %d", round)
	}
}

func testClaimVM(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := newVM("claimed", types.VMPending)
	vm.Provider = "" // the service does not know which backend will run it
	require.NoError(t, s.CreateVM(ctx, vm))

	got, err := s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "w1", Provider: "qemu", Network: types.NetworkNAT})
	require.NoError(t, err)
	require.Equal(t, "w1", got.Owner)
	require.Equal(t, "qemu", got.Provider, "the claiming worker's backend is recorded")
	require.Equal(t, types.NetworkNAT, got.Network, "the claiming worker's network default is recorded")
	stored, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, got, stored)

	again, err := s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "w1", Provider: "docker", Network: types.NetworkNone})
	require.NoError(t, err, "claiming one's own vm again is a no-op")
	require.Equal(t, stored, again, "a repeated claim changes nothing")

	_, err = s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "w2", Provider: "docker"})
	require.ErrorIs(t, err, types.ErrConflict)
	require.Contains(t, err.Error(), "w1", "the message should name the owner")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, "w1", got.Owner, "a refused claim must not change the owner")
	require.Equal(t, "qemu", got.Provider, "a refused claim must not change the provider")

	_, err = s.ClaimVM(ctx, vm.ID, storage.Claim{Provider: "docker"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "w1"})
	require.ErrorIs(t, err, types.ErrInvalid)
	_, err = s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: "w1", Provider: "docker", Network: "bridge"})
	require.ErrorIs(t, err, types.ErrInvalid)

	// Without a network the stored one is kept.
	keep := newVM("claimed-keep", types.VMPending)
	keep.Network = types.NetworkNAT
	require.NoError(t, s.CreateVM(ctx, keep))
	got, err = s.ClaimVM(ctx, keep.ID, storage.Claim{Owner: "w1", Provider: "qemu"})
	require.NoError(t, err)
	require.Equal(t, types.NetworkNAT, got.Network)

	owned := newVM("born-owned", types.VMPending)
	owned.Owner = "w3"
	require.NoError(t, s.CreateVM(ctx, owned))
	_, err = s.ClaimVM(ctx, owned.ID, storage.Claim{Owner: "w1", Provider: "docker"})
	require.ErrorIs(t, err, types.ErrConflict)
	_, err = s.ClaimVM(ctx, owned.ID, storage.Claim{Owner: "w3", Provider: "docker"})
	require.NoError(t, err)
}

func testClaimVMConcurrent(t *testing.T, s storage.Store) {
	ctx := t.Context()
	for round := range 10 {
		vm := createVM(t, s, fmt.Sprintf("claim-race-%d", round), types.VMPending)
		owners := []string{"w1", "w2", "w3"}
		errs := make([]error, len(owners))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, owner := range owners {
			wg.Go(func() {
				<-start
				_, errs[i] = s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: owner, Provider: "docker"})
			})
		}
		close(start)
		wg.Wait()
		var winner string
		for i, err := range errs {
			if err == nil {
				require.Empty(t, winner, "round %d: two workers won the claim", round)
				winner = owners[i]
				continue
			}
			require.ErrorIs(t, err, types.ErrConflict)
		}
		require.NotEmpty(t, winner, "round %d: nobody won the claim: %v", round, errs)
		got, err := s.GetVM(ctx, vm.ID)
		require.NoError(t, err)
		require.Equal(t, winner, got.Owner)
	}
}

func testUpdateOwnedVMState(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := newVM("owned-cas", types.VMRunning)
	vm.Owner = "w1"
	require.NoError(t, s.CreateVM(ctx, vm))

	moved, err := s.UpdateOwnedVMState(ctx, vm.ID, "w2", types.VMRunning, types.VMFailed, "gone")
	require.NoError(t, err)
	require.False(t, moved, "another worker's vm must be left alone")
	moved, err = s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMStopped, types.VMRunning, "")
	require.NoError(t, err)
	require.False(t, moved, "a vm not in the expected state must be left alone")
	moved, err = s.UpdateOwnedVMState(ctx, "vm-missing", "w1", types.VMRunning, types.VMFailed, "gone")
	require.NoError(t, err)
	require.False(t, moved)
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, got.State)

	_, err = s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMRunning, types.VMPending, "")
	require.ErrorIs(t, err, types.ErrConflict, "a forbidden transition is refused")
	_, err = s.UpdateOwnedVMState(ctx, vm.ID, "", types.VMRunning, types.VMFailed, "")
	require.ErrorIs(t, err, types.ErrInvalid)

	moved, err = s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMRunning, types.VMFailed, "gone")
	require.NoError(t, err)
	require.True(t, moved)
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMFailed, got.State)
	require.Equal(t, "gone", got.Error)
	moved, err = s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMRunning, types.VMFailed, "again")
	require.NoError(t, err)
	require.False(t, moved, "a second call finds the vm moved on")
}

// testUpdateOwnedVMStateRace is the heartbeat's race: a worker saw a
// running VM lost by its backend while a stop (or delete) of the same VM
// began. Whoever moves it first wins; the loser changes nothing, so a
// stopping VM is never overwritten with failed.
func testUpdateOwnedVMStateRace(t *testing.T, s storage.Store) {
	ctx := t.Context()
	for round := range 10 {
		vm := newVM(fmt.Sprintf("lost-race-%d", round), types.VMRunning)
		vm.Owner = "w1"
		require.NoError(t, s.CreateVM(ctx, vm))
		start := make(chan struct{})
		var (
			wg      sync.WaitGroup
			failed  bool
			failErr error
			stopErr error
		)
		wg.Go(func() {
			<-start
			failed, failErr = s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMRunning, types.VMFailed, "lost")
		})
		wg.Go(func() {
			<-start
			_, stopErr = s.UpdateVMState(ctx, vm.ID, types.VMStopping, "")
		})
		close(start)
		wg.Wait()
		require.NoError(t, failErr)
		got, err := s.GetVM(ctx, vm.ID)
		require.NoError(t, err)
		if failed {
			// The failure came first; the stop then found a failed vm.
			require.ErrorIs(t, stopErr, types.ErrConflict, "round %d", round)
			require.Equal(t, types.VMFailed, got.State, "round %d", round)
		} else {
			require.NoError(t, stopErr, "round %d", round)
			require.Equal(t, types.VMStopping, got.State, "round %d: the stop must win over a stale read", round)
			require.Empty(t, got.Error, "round %d", round)
		}
	}
	// The stale read made deterministic: the row moved on after the
	// caller saw it running.
	vm := newVM("lost-stale", types.VMRunning)
	vm.Owner = "w1"
	require.NoError(t, s.CreateVM(ctx, vm))
	_, err := s.UpdateVMState(ctx, vm.ID, types.VMDeleting, "")
	require.NoError(t, err)
	moved, err := s.UpdateOwnedVMState(ctx, vm.ID, "w1", types.VMRunning, types.VMFailed, "lost")
	require.NoError(t, err)
	require.False(t, moved)
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMDeleting, got.State)
}

func newTask(vmID string, created time.Time) *types.Task {
	return &types.Task{
		ID:        newID("task"),
		Type:      types.TaskVMExecute,
		VMID:      vmID,
		Payload:   json.RawMessage(`{"cmd":"echo","args":["hi"]}`),
		State:     types.TaskPending,
		CreatedAt: created,
		UpdatedAt: created,
	}
}

func testTaskRoundTrip(t *testing.T, s storage.Store) {
	ctx := t.Context()
	finished := at(time.Minute)
	for _, tc := range []struct {
		name string
		task *types.Task
	}{
		{"pending", newTask("vm-1", at(0))},
		{"no vm, no payload", &types.Task{ID: newID("task"), Type: types.TaskVMCreate, State: types.TaskPending, CreatedAt: at(0), UpdatedAt: at(0)}},
		{"finished", &types.Task{
			ID: newID("task"), Type: types.TaskJobRun, VMID: "vm-2",
			// Stored byte for byte: key order and spacing survive.
			Payload: json.RawMessage(`{"z": 1, "a": [true, null]}`),
			State:   types.TaskFailed, Attempts: 3, Error: "gave up",
			Result:    json.RawMessage(`{"exit_code":1}`),
			CreatedAt: at(0), UpdatedAt: finished, FinishedAt: &finished,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := *tc.task
			require.NoError(t, s.CreateTask(ctx, tc.task))
			got, err := s.GetTask(ctx, tc.task.ID)
			require.NoError(t, err)
			require.Equal(t, normTask(&want), normTask(got))
		})
	}
	t.Run("defaults", func(t *testing.T) {
		task := &types.Task{ID: newID("task"), Type: types.TaskVMStop, VMID: "vm-3"}
		require.NoError(t, s.CreateTask(ctx, task))
		require.Equal(t, types.TaskPending, task.State)
		require.False(t, task.CreatedAt.IsZero())
		got, err := s.GetTask(ctx, task.ID)
		require.NoError(t, err)
		require.Equal(t, normTask(task), normTask(got))
	})
}

func testTaskErrors(t *testing.T, s storage.Store) {
	ctx := t.Context()
	task := newTask("vm-1", at(0))
	require.NoError(t, s.CreateTask(ctx, task))
	requireErrors(t, []errorCase{
		{"duplicate id", func() error {
			dup := newTask("vm-2", at(time.Second))
			dup.ID = task.ID
			return s.CreateTask(ctx, dup)
		}, types.ErrConflict},
		{"get missing", func() error { _, err := s.GetTask(ctx, "task-missing"); return err }, types.ErrNotFound},
		{"update missing", func() error {
			st := types.TaskRunning
			_, err := s.UpdateTask(ctx, "task-missing", storage.TaskUpdate{State: &st})
			return err
		}, types.ErrNotFound},
		{"no id", func() error { return s.CreateTask(ctx, &types.Task{Type: types.TaskVMCreate}) }, types.ErrInvalid},
		{"unknown state", func() error {
			bad := newTask("vm-1", at(0))
			bad.State = "sleeping"
			return s.CreateTask(ctx, bad)
		}, types.ErrInvalid},
		{"update to unknown state", func() error {
			st := types.TaskState("sleeping")
			_, err := s.UpdateTask(ctx, task.ID, storage.TaskUpdate{State: &st})
			return err
		}, types.ErrInvalid},
		{"payload not JSON", func() error {
			bad := newTask("vm-1", at(0))
			bad.Payload = json.RawMessage(`{not json`)
			return s.CreateTask(ctx, bad)
		}, types.ErrInvalid},
	})
	got, err := s.GetTask(ctx, task.ID)
	require.NoError(t, err)
	require.Equal(t, normTask(task), normTask(got), "refused writes must not change the task")
}

func testUpdateTask(t *testing.T, s storage.Store) {
	ctx := t.Context()
	task := newTask("vm-1", at(0))
	require.NoError(t, s.CreateTask(ctx, task))
	ptr := func(st types.TaskState) *types.TaskState { return &st }
	one, two, msg := 1, 2, "boom"

	steps := []struct {
		name   string
		update storage.TaskUpdate
		check  func(t *testing.T, got *types.Task)
	}{
		{"state only", storage.TaskUpdate{State: ptr(types.TaskRunning)}, func(t *testing.T, got *types.Task) {
			require.Equal(t, types.TaskRunning, got.State)
			require.Equal(t, 0, got.Attempts)
			require.Empty(t, got.Error)
			require.Nil(t, got.Result)
			require.Nil(t, got.FinishedAt)
			require.Equal(t, task.Payload, got.Payload)
		}},
		{"attempts and error", storage.TaskUpdate{State: ptr(types.TaskRetrying), Attempts: &one, Error: &msg}, func(t *testing.T, got *types.Task) {
			require.Equal(t, types.TaskRetrying, got.State)
			require.Equal(t, 1, got.Attempts)
			require.Equal(t, "boom", got.Error)
			require.Nil(t, got.FinishedAt)
		}},
		{"nothing set leaves everything", storage.TaskUpdate{}, func(t *testing.T, got *types.Task) {
			require.Equal(t, types.TaskRetrying, got.State)
			require.Equal(t, 1, got.Attempts)
			require.Equal(t, "boom", got.Error)
		}},
		{"terminal state sets FinishedAt", storage.TaskUpdate{
			State: ptr(types.TaskSucceeded), Attempts: &two, Result: json.RawMessage(`{"ok":true}`),
		}, func(t *testing.T, got *types.Task) {
			require.Equal(t, types.TaskSucceeded, got.State)
			require.Equal(t, 2, got.Attempts)
			require.Equal(t, "boom", got.Error, "an unset Error is left as it was")
			require.JSONEq(t, `{"ok":true}`, string(got.Result))
			require.NotNil(t, got.FinishedAt)
			require.False(t, got.FinishedAt.Before(got.CreatedAt))
		}},
	}
	for _, step := range steps {
		// Steps build on each other, so they are not subtests.
		got, err := s.UpdateTask(ctx, task.ID, step.update)
		require.NoError(t, err, step.name)
		step.check(t, got)
		stored, err := s.GetTask(ctx, task.ID)
		require.NoError(t, err, step.name)
		require.Equal(t, normTask(got), normTask(stored), "%s: the returned task is the stored one", step.name)
		require.Equal(t, task.Type, got.Type)
		require.Equal(t, task.VMID, got.VMID)
	}

	// Being told again that it succeeded keeps the first FinishedAt.
	before, err := s.GetTask(ctx, task.ID)
	require.NoError(t, err)
	again, err := s.UpdateTask(ctx, task.ID, storage.TaskUpdate{State: ptr(types.TaskSucceeded)})
	require.NoError(t, err)
	require.Equal(t, micro(*before.FinishedAt), micro(*again.FinishedAt))
}

func testListTasks(t *testing.T, s storage.Store) {
	ctx := t.Context()
	older := newTask("vm-1", at(time.Second))
	newest := newTask("vm-1", at(3*time.Second))
	middle := newTask("vm-1", at(2*time.Second))
	other := newTask("vm-2", at(4*time.Second))
	for _, task := range []*types.Task{older, newest, middle, other} {
		require.NoError(t, s.CreateTask(ctx, task))
	}
	got, err := s.ListTasks(ctx, "vm-1")
	require.NoError(t, err)
	require.Equal(t, ids([]*types.Task{newest, middle, older}, taskID), ids(got, taskID), "newest first")
	require.Equal(t, normTask(newest), normTask(got[0]))

	got, err = s.ListTasks(ctx, "vm-none")
	require.NoError(t, err)
	require.Empty(t, got)
}

func newExecution(vmID string, started time.Time) *types.Execution {
	return &types.Execution{
		ID:         newID("exec"),
		VMID:       vmID,
		Command:    "echo",
		Args:       []string{"hello"},
		Stdout:     "hello\n",
		StartedAt:  started,
		FinishedAt: started.Add(1500 * time.Microsecond),
		Duration:   1500 * time.Microsecond,
	}
}

func testExecutionRoundTrip(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "exec-vm", types.VMRunning)
	for _, tc := range []struct {
		name string
		exec *types.Execution
	}{
		{"simple", newExecution(vm.ID, at(0))},
		{"everything", &types.Execution{
			ID: newID("exec"), VMID: vm.ID, TaskID: "task-1",
			Command: "sh", Args: []string{"-c", "printf 'a\\0b'"}, Env: map[string]string{"A": "1"}, Cwd: "/tmp",
			ExitCode: 137,
			// Programs print anything: NUL bytes and invalid UTF-8 survive.
			Stdout: "a\x00b\xff\xfe", Stderr: "killed\n",
			StdoutTruncated: true, StderrTruncated: true, TimedOut: true,
			Error:     "",
			StartedAt: at(0), FinishedAt: at(30 * time.Second), Duration: 30 * time.Second,
		}},
		{"could not run", &types.Execution{
			ID: newID("exec"), VMID: vm.ID, Command: "nope", Args: []string{}, ExitCode: -1,
			Error: "exec: \"nope\": executable file not found in $PATH", StartedAt: at(0), FinishedAt: at(0),
		}},
		{"from NewExecution", types.NewExecution(newID("exec"), vm.ID, types.Command{Cmd: "true"}, &types.ExecResult{
			Stdout: []byte{}, StartedAt: at(0), FinishedAt: at(time.Millisecond),
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := *tc.exec
			require.NoError(t, s.PutExecution(ctx, tc.exec))
			got, err := s.GetExecution(ctx, tc.exec.ID)
			require.NoError(t, err)
			require.Equal(t, normExecution(&want), normExecution(got))
		})
	}
}

func testPutExecutionIdempotent(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "idem", types.VMRunning)
	e := newExecution(vm.ID, at(0))
	require.NoError(t, s.PutExecution(ctx, e))
	require.NoError(t, s.PutExecution(ctx, e), "putting the same execution twice is harmless")

	// A retried task that records a different outcome replaces the row.
	changed := *e
	changed.ExitCode, changed.Stdout, changed.Error = 2, "second try\n", "retried"
	require.NoError(t, s.PutExecution(ctx, &changed))

	got, err := s.GetExecution(ctx, e.ID)
	require.NoError(t, err)
	require.Equal(t, normExecution(&changed), normExecution(got))
	list, err := s.ListExecutions(ctx, vm.ID)
	require.NoError(t, err)
	require.Len(t, list, 1)
}

func testExecutionErrors(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "exec-errors", types.VMRunning)
	requireErrors(t, []errorCase{
		{"get missing", func() error { _, err := s.GetExecution(ctx, "exec-missing"); return err }, types.ErrNotFound},
		{"unknown vm", func() error { return s.PutExecution(ctx, newExecution("vm-missing", at(0))) }, types.ErrNotFound},
		{"unknown job", func() error {
			e := newExecution(vm.ID, at(0))
			e.JobID = "job-missing"
			return s.PutExecution(ctx, e)
		}, types.ErrNotFound},
		{"no id", func() error {
			e := newExecution(vm.ID, at(0))
			e.ID = ""
			return s.PutExecution(ctx, e)
		}, types.ErrInvalid},
	})
}

func testListExecutions(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "list-exec", types.VMRunning)
	other := createVM(t, s, "list-exec-other", types.VMRunning)
	third := newExecution(vm.ID, at(3*time.Second))
	first := newExecution(vm.ID, at(1*time.Second))
	second := newExecution(vm.ID, at(2*time.Second))
	// Same start as second: the id breaks the tie, so the order is stable.
	tie := newExecution(vm.ID, at(2*time.Second))
	tie.ID = second.ID + "-tie"
	foreign := newExecution(other.ID, at(0))
	for _, e := range []*types.Execution{third, tie, first, foreign, second} {
		require.NoError(t, s.PutExecution(ctx, e))
	}
	got, err := s.ListExecutions(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, ids([]*types.Execution{first, second, tie, third}, executionID), ids(got, executionID))
	require.Equal(t, normExecution(first), normExecution(got[0]))

	got, err = s.ListExecutions(ctx, "vm-none")
	require.NoError(t, err)
	require.Empty(t, got)
}

func newJob(vmID string) *types.Job {
	return &types.Job{
		ID:   newID("job"),
		VMID: vmID,
		Commands: []types.Command{
			{Cmd: "make", Args: []string{"build"}, Env: map[string]string{"CC": "gcc"}, Timeout: time.Minute},
			{Cmd: "cat", Stdin: []byte("in\x00put"), MaxOutputBytes: 10},
		},
		StopOnFailure: true,
		State:         types.JobPending,
		CreatedAt:     at(0),
		UpdatedAt:     at(0),
	}
}

func testJob(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "job-vm", types.VMRunning)
	job := newJob(vm.ID)
	job.TaskID = "task-1"
	want := *job
	require.NoError(t, s.CreateJob(ctx, job))
	got, err := s.GetJob(ctx, job.ID)
	require.NoError(t, err)
	require.Equal(t, normJob(&want), normJob(got))

	for _, tc := range []struct {
		state types.JobState
		msg   string
	}{
		{types.JobRunning, ""},
		{types.JobFailed, "command 2 exited 1"},
		{types.JobSucceeded, ""},
	} {
		require.NoError(t, s.UpdateJobState(ctx, job.ID, tc.state, tc.msg))
		got, err := s.GetJob(ctx, job.ID)
		require.NoError(t, err)
		require.Equal(t, tc.state, got.State)
		require.Equal(t, tc.msg, got.Error)
		require.Equal(t, job.Commands, got.Commands)
		require.False(t, got.UpdatedAt.Before(got.CreatedAt))
	}

	t.Run("defaults", func(t *testing.T) {
		j := &types.Job{ID: newID("job"), VMID: vm.ID, Commands: []types.Command{{Cmd: "true"}}}
		require.NoError(t, s.CreateJob(ctx, j))
		require.Equal(t, types.JobPending, j.State)
		require.False(t, j.CreatedAt.IsZero())
		got, err := s.GetJob(ctx, j.ID)
		require.NoError(t, err)
		require.Equal(t, normJob(j), normJob(got))
	})
}

func testJobErrors(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "job-errors", types.VMRunning)
	job := newJob(vm.ID)
	require.NoError(t, s.CreateJob(ctx, job))
	requireErrors(t, []errorCase{
		{"duplicate id", func() error {
			dup := newJob(vm.ID)
			dup.ID = job.ID
			return s.CreateJob(ctx, dup)
		}, types.ErrConflict},
		{"get missing", func() error { _, err := s.GetJob(ctx, "job-missing"); return err }, types.ErrNotFound},
		{"update missing", func() error { return s.UpdateJobState(ctx, "job-missing", types.JobRunning, "") }, types.ErrNotFound},
		{"unknown vm", func() error { return s.CreateJob(ctx, newJob("vm-missing")) }, types.ErrNotFound},
		{"unknown state", func() error { return s.UpdateJobState(ctx, job.ID, "sleeping", "") }, types.ErrInvalid},
		{"no id", func() error {
			j := newJob(vm.ID)
			j.ID = ""
			return s.CreateJob(ctx, j)
		}, types.ErrInvalid},
	})
}

func testJobExecutions(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, "job-exec", types.VMRunning)
	job, otherJob := newJob(vm.ID), newJob(vm.ID)
	require.NoError(t, s.CreateJob(ctx, job))
	require.NoError(t, s.CreateJob(ctx, otherJob))

	got, err := s.GetJob(ctx, job.ID)
	require.NoError(t, err)
	require.Empty(t, got.Executions, "a job that has not run has no executions")

	mk := func(jobID string, offset time.Duration) *types.Execution {
		e := newExecution(vm.ID, at(offset))
		e.JobID = jobID
		return e
	}
	second, first := mk(job.ID, 2*time.Second), mk(job.ID, time.Second)
	foreign, loose := mk(otherJob.ID, 0), mk("", 0)
	for _, e := range []*types.Execution{second, foreign, first, loose} {
		require.NoError(t, s.PutExecution(ctx, e))
	}
	got, err = s.GetJob(ctx, job.ID)
	require.NoError(t, err)
	require.Len(t, got.Executions, 2)
	require.Equal(t, normExecution(first), normExecution(got.Executions[0]))
	require.Equal(t, normExecution(second), normExecution(got.Executions[1]))

	all, err := s.ListExecutions(ctx, vm.ID)
	require.NoError(t, err)
	require.Len(t, all, 4, "a job's executions are also the vm's")
}

func testWorkers(t *testing.T, s storage.Store) {
	ctx := t.Context()
	got, err := s.ListWorkers(ctx)
	require.NoError(t, err)
	require.Empty(t, got)

	b := &types.Worker{ID: "worker-b", Hostname: "host-b", Provider: "docker", Healthy: true, LastSeen: at(0), DataAddr: "127.0.0.1:9465"}
	a := &types.Worker{ID: "worker-a", Hostname: "host-a", Provider: "qemu", Healthy: false, Detail: "no kvm", LastSeen: at(time.Second)}
	require.NoError(t, s.UpsertWorker(ctx, b))
	require.NoError(t, s.UpsertWorker(ctx, a))

	// A later heartbeat replaces what the worker said before.
	b2 := &types.Worker{ID: "worker-b", Hostname: "host-b2", Provider: "docker", Healthy: false, Detail: "dockerd down", LastSeen: at(time.Minute)}
	require.NoError(t, s.UpsertWorker(ctx, b2))

	got, err = s.ListWorkers(ctx)
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.Equal(t, normWorker(a), normWorker(got[0]))
	require.Equal(t, normWorker(b2), normWorker(got[1]))

	t.Run("zero LastSeen is now", func(t *testing.T) {
		w := &types.Worker{ID: "worker-c", Healthy: true}
		before := time.Now().Add(-time.Second)
		require.NoError(t, s.UpsertWorker(ctx, w))
		require.WithinRange(t, w.LastSeen, before, time.Now().Add(time.Second))
	})
	t.Run("no id", func(t *testing.T) {
		require.ErrorIs(t, s.UpsertWorker(ctx, &types.Worker{}), types.ErrInvalid)
	})
}

func testPingAndSchema(t *testing.T, s storage.Store) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	require.NoError(t, s.Ping(ctx))
	_, dirty, err := s.SchemaVersion(ctx)
	require.NoError(t, err)
	require.False(t, dirty)
}

func tenantVM(name, tenant string, vcpus, mem int) *types.VM {
	vm := newVM(name, types.VMRunning)
	vm.Tenant, vm.VCPUs, vm.MemoryMB = tenant, vcpus, mem
	return vm
}

func testTenants(t *testing.T, s storage.Store) {
	ctx := t.Context()
	a := tenantVM("web", "acme", 1, 128)
	require.NoError(t, s.CreateVM(ctx, a))
	got, err := s.GetVM(ctx, a.ID)
	require.NoError(t, err)
	require.Equal(t, "acme", got.Tenant)

	// Names are unique per tenant, not across tenants.
	require.NoError(t, s.CreateVM(ctx, tenantVM("web", "globex", 1, 128)))
	require.ErrorIs(t, s.CreateVM(ctx, tenantVM("web", "acme", 1, 128)), types.ErrConflict)

	acme := "acme"
	list, err := s.ListVMs(ctx, storage.VMFilter{Tenant: &acme})
	require.NoError(t, err)
	require.Equal(t, []string{a.ID}, ids(list, vmID))
	all, err := s.ListVMs(ctx, storage.VMFilter{})
	require.NoError(t, err)
	require.Len(t, all, 2)

	u, err := s.TenantUsage(ctx, "acme")
	require.NoError(t, err)
	require.Equal(t, types.Usage{VMs: 1, VCPUs: 1, MemoryMB: 128}, u)
	// Deleted VMs hold nothing.
	_, err = s.UpdateVMState(ctx, a.ID, types.VMDeleting, "")
	require.NoError(t, err)
	_, err = s.UpdateVMState(ctx, a.ID, types.VMDeleted, "")
	require.NoError(t, err)
	u, err = s.TenantUsage(ctx, "acme")
	require.NoError(t, err)
	require.Equal(t, types.Usage{}, u)
}

func testCreateVMWithin(t *testing.T, s storage.Store) {
	ctx := t.Context()
	lim := types.Limits{MaxVMs: 2, MaxVCPUs: 3, MaxMemoryMB: 512}
	require.NoError(t, s.CreateVMWithin(ctx, tenantVM("a", "t1", 2, 128), lim))
	err := s.CreateVMWithin(ctx, tenantVM("b", "t1", 2, 128), lim)
	require.ErrorIs(t, err, types.ErrLimit)
	require.Contains(t, err.Error(), "at most 3 vCPUs")
	require.Contains(t, err.Error(), "uses 2")
	err = s.CreateVMWithin(ctx, tenantVM("b", "t1", 1, 512), lim)
	require.ErrorIs(t, err, types.ErrLimit)
	require.Contains(t, err.Error(), "512 MiB")
	require.NoError(t, s.CreateVMWithin(ctx, tenantVM("b", "t1", 1, 128), lim))
	err = s.CreateVMWithin(ctx, tenantVM("c", "t1", 0+1, 64), lim)
	require.ErrorIs(t, err, types.ErrLimit)
	require.Contains(t, err.Error(), "at most 2 live VMs and has 2")
	// Another tenant is not affected, and a refused create left no row.
	require.NoError(t, s.CreateVMWithin(ctx, tenantVM("c", "t2", 1, 64), lim))
	t1 := "t1"
	list, err := s.ListVMs(ctx, storage.VMFilter{Tenant: &t1})
	require.NoError(t, err)
	require.Len(t, list, 2)
	// A clash of names is a conflict, not a limit.
	require.ErrorIs(t, s.CreateVMWithin(ctx, tenantVM("c", "t2", 1, 64), types.Limits{MaxVMs: 10}), types.ErrConflict)
}

func testCreateVMWithinConcurrent(t *testing.T, s storage.Store) {
	ctx := t.Context()
	lim := types.Limits{MaxVMs: 3}
	var ok, limited atomic.Int64
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() {
			err := s.CreateVMWithin(ctx, tenantVM(fmt.Sprintf("vm-%d", i), "race", 1, 64), lim)
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, types.ErrLimit):
				limited.Add(1)
			default:
				t.Errorf("unexpected error: %v", err)
			}
		})
	}
	wg.Wait()
	require.EqualValues(t, 3, ok.Load(), "exactly the limit is created when creates race")
	require.EqualValues(t, 7, limited.Load())
}

func testVMExpiry(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := newVM("exp", types.VMRunning)
	vm.Owner = "w1"
	exp := at(time.Hour)
	vm.ExpiresAt = &exp
	require.NoError(t, s.CreateVM(ctx, vm))
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.NotNil(t, got.ExpiresAt)
	require.Equal(t, micro(exp), *got.ExpiresAt)
	require.Equal(t, types.ExpiryDelete, got.OnExpiry, "the default action")

	pausing := newVM("pausing", types.VMRunning)
	pausing.OnExpiry = types.ExpiryPause
	require.NoError(t, s.CreateVM(ctx, pausing))
	got, err = s.GetVM(ctx, pausing.ID)
	require.NoError(t, err)
	require.Equal(t, types.ExpiryPause, got.OnExpiry)
	bad := newVM("bad-expiry", types.VMRunning)
	bad.OnExpiry = "explode"
	require.ErrorIs(t, s.CreateVM(ctx, bad), types.ErrInvalid)

	other := newVM("forever", types.VMRunning)
	other.Owner = "w1"
	require.NoError(t, s.CreateVM(ctx, other))

	before := at(30 * time.Minute)
	list, err := s.ListVMs(ctx, storage.VMFilter{Owner: "w1", ExpiredBy: &before})
	require.NoError(t, err)
	require.Empty(t, list)
	after := at(2 * time.Hour)
	list, err = s.ListVMs(ctx, storage.VMFilter{Owner: "w1", ExpiredBy: &after})
	require.NoError(t, err)
	require.Equal(t, []string{vm.ID}, ids(list, vmID))

	later := at(3 * time.Hour)
	upd, err := s.SetVMExpiry(ctx, vm.ID, &later)
	require.NoError(t, err)
	require.Equal(t, micro(later), *upd.ExpiresAt)
	list, err = s.ListVMs(ctx, storage.VMFilter{Owner: "w1", ExpiredBy: &after})
	require.NoError(t, err)
	require.Empty(t, list, "an extended VM is no longer expired")

	upd, err = s.SetVMExpiry(ctx, vm.ID, nil)
	require.NoError(t, err)
	require.Nil(t, upd.ExpiresAt)

	_, err = s.SetVMExpiry(ctx, "missing", &later)
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = s.UpdateVMState(ctx, other.ID, types.VMDeleting, "")
	require.NoError(t, err)
	_, err = s.UpdateVMState(ctx, other.ID, types.VMDeleted, "")
	require.NoError(t, err)
	_, err = s.SetVMExpiry(ctx, other.ID, &later)
	require.ErrorIs(t, err, types.ErrConflict)
}

// testVMConfinement: a VM's confinement is recorded, read back by GetVM
// and ListVMs, replaced and cleared; a missing or deleted VM is left
// alone without an error.
func testVMConfinement(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := newVM("confined", types.VMRunning)
	require.NoError(t, s.CreateVM(ctx, vm))
	got, err := s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Nil(t, got.Confinement, "none until a worker records it")

	c := &types.Confinement{UID: 900007, GID: 900007, Cgroup: "/aetherium/" + vm.ID}
	require.NoError(t, s.SetVMConfinement(ctx, vm.ID, c))
	require.NoError(t, s.SetVMConfinement(ctx, vm.ID, c), "idempotent")
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, c, got.Confinement)
	list, err := s.ListVMs(ctx, storage.VMFilter{})
	require.NoError(t, err)
	for _, v := range list {
		if v.ID == vm.ID {
			require.Equal(t, c, v.Confinement, "ListVMs reads it too")
		}
	}

	require.NoError(t, s.SetVMConfinement(ctx, vm.ID, nil))
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Nil(t, got.Confinement)

	require.NoError(t, s.SetVMConfinement(ctx, "missing", c), "a missing VM is not an error")
	_, err = s.UpdateVMState(ctx, vm.ID, types.VMDeleting, "")
	require.NoError(t, err)
	_, err = s.UpdateVMState(ctx, vm.ID, types.VMDeleted, "")
	require.NoError(t, err)
	require.NoError(t, s.SetVMConfinement(ctx, vm.ID, c))
	got, err = s.GetVM(ctx, vm.ID)
	require.NoError(t, err)
	require.Nil(t, got.Confinement, "a deleted VM is left alone")
}

func testListVMsFilters(t *testing.T, s storage.Store) {
	ctx := t.Context()
	var made []string
	for i := range 5 {
		vm := newVM(fmt.Sprintf("l-%d", i), types.VMRunning)
		vm.CreatedAt = at(time.Duration(i) * time.Second)
		vm.Labels = map[string]string{"team": "a", "idx": fmt.Sprint(i % 2)}
		require.NoError(t, s.CreateVM(ctx, vm))
		made = append(made, vm.ID)
	}
	odd, err := s.ListVMs(ctx, storage.VMFilter{Labels: map[string]string{"idx": "1"}})
	require.NoError(t, err)
	require.Equal(t, []string{made[1], made[3]}, ids(odd, vmID))
	none, err := s.ListVMs(ctx, storage.VMFilter{Labels: map[string]string{"team": "b"}})
	require.NoError(t, err)
	require.Empty(t, none)

	page, err := s.ListVMs(ctx, storage.VMFilter{Limit: 2})
	require.NoError(t, err)
	require.Equal(t, made[:2], ids(page, vmID))
	page, err = s.ListVMs(ctx, storage.VMFilter{Limit: 2, After: made[1]})
	require.NoError(t, err)
	require.Equal(t, made[2:4], ids(page, vmID))
	page, err = s.ListVMs(ctx, storage.VMFilter{Limit: 2, After: made[3]})
	require.NoError(t, err)
	require.Equal(t, made[4:], ids(page, vmID))
}

func testAPIKeys(t *testing.T, s storage.Store) {
	ctx := t.Context()
	k := &types.APIKey{ID: newID("key"), Name: "ci", Tenant: "acme", Hash: []byte{1, 2, 3},
		Limits: types.Limits{MaxVMs: 5}, CreatedAt: at(0)}
	require.NoError(t, s.CreateAPIKey(ctx, k))
	require.ErrorIs(t, s.CreateAPIKey(ctx, k), types.ErrConflict)
	require.ErrorIs(t, s.CreateAPIKey(ctx, &types.APIKey{ID: newID("key"), Name: "x", Tenant: "t"}), types.ErrInvalid, "an empty hash is refused")

	got, err := s.GetAPIKey(ctx, k.ID)
	require.NoError(t, err)
	require.Equal(t, k.Hash, got.Hash)
	require.Equal(t, k.Limits, got.Limits)
	require.Equal(t, micro(k.CreatedAt), got.CreatedAt)
	require.Nil(t, got.RevokedAt)

	admin := &types.APIKey{ID: newID("key"), Name: "ops", Tenant: "ops", Admin: true, Hash: []byte{4}, CreatedAt: at(time.Second)}
	require.NoError(t, s.CreateAPIKey(ctx, admin))
	list, err := s.ListAPIKeys(ctx)
	require.NoError(t, err)
	require.Equal(t, []string{k.ID, admin.ID}, ids(list, func(k *types.APIKey) string { return k.ID }))
	require.True(t, list[1].Admin)

	rev, err := s.RevokeAPIKey(ctx, k.ID)
	require.NoError(t, err)
	require.NotNil(t, rev.RevokedAt)
	again, err := s.RevokeAPIKey(ctx, k.ID)
	require.NoError(t, err)
	require.Equal(t, *rev.RevokedAt, *again.RevokedAt, "revoking twice keeps the first time")
	_, err = s.RevokeAPIKey(ctx, "missing")
	require.ErrorIs(t, err, types.ErrNotFound)
	_, err = s.GetAPIKey(ctx, "missing")
	require.ErrorIs(t, err, types.ErrNotFound)
}

func testWorkerDataAddr(t *testing.T, s storage.Store) {
	ctx := t.Context()
	w := &types.Worker{ID: "w-data", Healthy: true, DataAddr: "10.0.0.5:9465"}
	require.NoError(t, s.UpsertWorker(ctx, w))
	got, err := s.GetWorker(ctx, "w-data")
	require.NoError(t, err)
	require.Equal(t, "10.0.0.5:9465", got.DataAddr)
	_, err = s.GetWorker(ctx, "missing")
	require.ErrorIs(t, err, types.ErrNotFound)
}

func testSandboxes(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := createVM(t, s, newID("sbx"), types.VMRunning)
	sb := &storage.Sandbox{VMID: vm.ID, Template: "base", TokenHashes: [][]byte{{9, 8, 7}}, CreatedAt: at(0)}
	require.NoError(t, s.CreateSandbox(ctx, sb))
	require.ErrorIs(t, s.CreateSandbox(ctx, sb), types.ErrConflict)
	got, err := s.GetSandbox(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, &storage.Sandbox{VMID: vm.ID, Template: "base", TokenHashes: [][]byte{{9, 8, 7}}, CreatedAt: micro(at(0))}, got)

	require.NoError(t, s.AddSandboxToken(ctx, vm.ID, []byte{6}))
	got, err = s.GetSandbox(ctx, vm.ID)
	require.NoError(t, err)
	require.Equal(t, [][]byte{{9, 8, 7}, {6}}, got.TokenHashes, "tokens are kept oldest first")

	requireErrors(t, []errorCase{
		{"missing vm", func() error {
			return s.CreateSandbox(ctx, &storage.Sandbox{VMID: newID("vm"), Template: "base", TokenHashes: [][]byte{{1}}})
		}, types.ErrNotFound},
		{"no hash", func() error { return s.CreateSandbox(ctx, &storage.Sandbox{VMID: vm.ID, Template: "base"}) }, types.ErrInvalid},
		{"empty hash", func() error { return s.CreateSandbox(ctx, &storage.Sandbox{VMID: vm.ID, TokenHashes: [][]byte{{}}}) }, types.ErrInvalid},
		{"no vm id", func() error {
			return s.CreateSandbox(ctx, &storage.Sandbox{Template: "base", TokenHashes: [][]byte{{1}}})
		}, types.ErrInvalid},
		{"add to missing", func() error { return s.AddSandboxToken(ctx, newID("vm"), []byte{1}) }, types.ErrNotFound},
		{"add empty", func() error { return s.AddSandboxToken(ctx, vm.ID, nil) }, types.ErrInvalid},
		{"get missing", func() error { _, err := s.GetSandbox(ctx, newID("vm")); return err }, types.ErrNotFound},
	})
}

func testTemplates(t *testing.T, s storage.Store) {
	ctx := t.Context()
	big := &storage.Template{Name: newID("big"), VCPUs: 4, MemoryMB: 2048, Env: map[string]string{"A": "1"}, CreatedAt: at(0)}
	bare := &storage.Template{Name: newID("bare"), VCPUs: 1, MemoryMB: 64}
	require.NoError(t, s.CreateTemplate(ctx, big))
	require.NoError(t, s.CreateTemplate(ctx, bare))
	require.False(t, bare.CreatedAt.IsZero(), "a zero CreatedAt is filled in")

	got, err := s.GetTemplate(ctx, big.Name)
	require.NoError(t, err)
	require.Equal(t, &storage.Template{Name: big.Name, VCPUs: 4, MemoryMB: 2048, Env: map[string]string{"A": "1"}, CreatedAt: micro(at(0))}, got)
	got, err = s.GetTemplate(ctx, bare.Name)
	require.NoError(t, err)
	require.Nil(t, got.Env, "a nil env reads back nil")

	list, err := s.ListTemplates(ctx)
	require.NoError(t, err)
	names := ids(list, func(tpl *storage.Template) string { return tpl.Name })
	require.Subset(t, names, []string{big.Name, bare.Name})

	requireErrors(t, []errorCase{
		{"same name", func() error { return s.CreateTemplate(ctx, &storage.Template{Name: big.Name, VCPUs: 1, MemoryMB: 64}) }, types.ErrConflict},
		{"no name", func() error { return s.CreateTemplate(ctx, &storage.Template{VCPUs: 1, MemoryMB: 64}) }, types.ErrInvalid},
		{"zero vcpus", func() error { return s.CreateTemplate(ctx, &storage.Template{Name: newID("t"), MemoryMB: 64}) }, types.ErrInvalid},
		{"small memory", func() error {
			return s.CreateTemplate(ctx, &storage.Template{Name: newID("t"), VCPUs: 1, MemoryMB: 63})
		}, types.ErrInvalid},
		{"get missing", func() error { _, err := s.GetTemplate(ctx, "missing"); return err }, types.ErrNotFound},
		{"delete missing", func() error { return s.DeleteTemplate(ctx, "missing") }, types.ErrNotFound},
	})

	require.NoError(t, s.DeleteTemplate(ctx, big.Name))
	_, err = s.GetTemplate(ctx, big.Name)
	require.ErrorIs(t, err, types.ErrNotFound)
}

func testCountVMs(t *testing.T, s storage.Store) {
	ctx := t.Context()
	got, err := s.CountVMs(ctx)
	require.NoError(t, err)
	require.Empty(t, got)
	createVM(t, s, "c1", types.VMRunning)
	createVM(t, s, "c2", types.VMRunning)
	q := newVM("c3", types.VMPending)
	q.Provider = "qemu"
	require.NoError(t, s.CreateVM(ctx, q))
	gone := createVM(t, s, "c4", types.VMDeleting)
	_, err = s.UpdateVMState(ctx, gone.ID, types.VMDeleted, "")
	require.NoError(t, err)
	got, err = s.CountVMs(ctx)
	require.NoError(t, err)
	require.ElementsMatch(t, []storage.VMCount{
		{State: types.VMRunning, Provider: "docker", N: 2},
		{State: types.VMPending, Provider: "qemu", N: 1},
	}, got, "deleted VMs are not counted")
}

func testVMTools(t *testing.T, s storage.Store) {
	ctx := t.Context()
	live := createVM(t, s, newID("tools"), types.VMRunning)
	gone := createVM(t, s, newID("tools"), types.VMDeleted)
	hello, mise, old := newID("hello"), newID("mise"), newID("old")
	rows := []types.VMTool{
		{Key: hello, Spec: "http:hello[url=http://127.0.0.1:1/h-{{version}}.tgz]@1.0.0", Tool: "http:hello[url=http://127.0.0.1:1/h-{{version}}.tgz]", Version: "1.0.0", AddedAt: at(time.Second)},
		{Key: mise, Tool: "mise", Version: "2026.9.15", AddedAt: at(time.Second)},
	}
	require.NoError(t, s.AddVMTools(ctx, live.ID, rows))
	require.NoError(t, s.AddVMTools(ctx, gone.ID, []types.VMTool{{Key: old, Spec: "node@22", Tool: "node", Version: "22.1.0"}}))

	got, err := s.ListVMTools(ctx, live.ID)
	require.NoError(t, err)
	want := []types.VMTool{rows[0], rows[1]}
	for i := range want {
		want[i].VMID, want[i].AddedAt = live.ID, micro(want[i].AddedAt)
	}
	// Same instant: ordered by key.
	if want[0].Key > want[1].Key {
		want[0], want[1] = want[1], want[0]
	}
	require.Equal(t, want, got)

	t.Run("idempotent", func(t *testing.T) {
		again := rows[0]
		again.Version, again.AddedAt = "9.9.9", at(time.Hour)
		require.NoError(t, s.AddVMTools(ctx, live.ID, []types.VMTool{again}))
		got, err := s.ListVMTools(ctx, live.ID)
		require.NoError(t, err)
		require.Equal(t, want, got, "a key already recorded keeps its first row")
	})
	t.Run("later rows come after", func(t *testing.T) {
		later := types.VMTool{Key: newID("later"), Spec: "npm:cowsay@1.6.0", Tool: "npm:cowsay", Version: "1.6.0"}
		require.NoError(t, s.AddVMTools(ctx, live.ID, []types.VMTool{later}))
		got, err := s.ListVMTools(ctx, live.ID)
		require.NoError(t, err)
		require.Len(t, got, 3)
		require.Equal(t, later.Key, got[2].Key)
		require.False(t, got[2].AddedAt.IsZero(), "a zero AddedAt is filled in")
	})
	t.Run("keys in use", func(t *testing.T) {
		keys, err := s.ToolKeysInUse(ctx)
		require.NoError(t, err)
		require.Contains(t, keys, hello)
		require.Contains(t, keys, mise)
		require.NotContains(t, keys, old, "a deleted vm holds nothing")
		require.IsNonDecreasing(t, keys)
		_, err = s.UpdateVMState(ctx, live.ID, types.VMFailed, "boom")
		require.NoError(t, err)
		keys, err = s.ToolKeysInUse(ctx)
		require.NoError(t, err)
		require.Contains(t, keys, hello, "a failed vm still holds its tools until deleted")
	})
	t.Run("empty", func(t *testing.T) {
		got, err := s.ListVMTools(ctx, newID("vm"))
		require.NoError(t, err)
		require.NotNil(t, got)
		require.Empty(t, got)
		require.NoError(t, s.AddVMTools(ctx, live.ID, nil))
	})
	requireErrors(t, []errorCase{
		{"missing vm", func() error {
			return s.AddVMTools(ctx, newID("vm"), []types.VMTool{{Key: "k", Tool: "t", Version: "1"}})
		}, types.ErrNotFound},
		{"empty key", func() error { return s.AddVMTools(ctx, live.ID, []types.VMTool{{Tool: "t", Version: "1"}}) }, types.ErrInvalid},
		{"no vm id", func() error { return s.AddVMTools(ctx, "", []types.VMTool{{Key: "k"}}) }, types.ErrInvalid},
	})
}

func testOpenTasks(t *testing.T, s storage.Store) {
	ctx := t.Context()
	vm := newID("vm")
	var open []string
	for i, st := range []types.TaskState{types.TaskPending, types.TaskRunning, types.TaskRetrying, types.TaskSucceeded, types.TaskFailed} {
		task := newTask(vm, at(time.Duration(i)*time.Second))
		task.State, task.Queue = st, "q1"
		if st == types.TaskRunning {
			task.WorkerID = "w-open"
		}
		require.NoError(t, s.CreateTask(ctx, task))
		if !st.Terminal() {
			open = append(open, task.ID)
		}
	}
	got, err := s.ListOpenTasks(ctx, storage.OpenTaskFilter{VMID: vm})
	require.NoError(t, err)
	require.ElementsMatch(t, open, ids(got, taskID))
	require.Equal(t, "q1", got[0].Queue)

	got, err = s.ListOpenTasks(ctx, storage.OpenTaskFilter{VMID: vm, WorkerID: "w-open"})
	require.NoError(t, err)
	require.Equal(t, []string{open[1]}, ids(got, taskID))
	got, err = s.ListOpenTasks(ctx, storage.OpenTaskFilter{VMID: vm, States: []types.TaskState{types.TaskRetrying}})
	require.NoError(t, err)
	require.Equal(t, []string{open[2]}, ids(got, taskID))
	_, err = s.ListOpenTasks(ctx, storage.OpenTaskFilter{States: []types.TaskState{types.TaskFailed}})
	require.ErrorIs(t, err, types.ErrInvalid)

	// The worker id and queue are updated like any field.
	u, err := s.UpdateTask(ctx, open[0], storage.TaskUpdate{WorkerID: ptr("w2"), Queue: ptr("q2")})
	require.NoError(t, err)
	require.Equal(t, "w2", u.WorkerID)
	require.Equal(t, "q2", u.Queue)

	ended, err := s.FailOpenTasks(ctx, vm, open[0], "vm deleted")
	require.NoError(t, err)
	require.ElementsMatch(t, open[1:], ids(ended, taskID))
	for _, e := range ended {
		require.Equal(t, types.TaskFailed, e.State)
		require.Equal(t, "vm deleted", e.Error)
		require.NotNil(t, e.FinishedAt)
	}
	got, err = s.ListOpenTasks(ctx, storage.OpenTaskFilter{VMID: vm})
	require.NoError(t, err)
	require.Equal(t, []string{open[0]}, ids(got, taskID))
	ended, err = s.FailOpenTasks(ctx, vm, open[0], "again")
	require.NoError(t, err)
	require.Empty(t, ended)
}

func ptr[T any](v T) *T { return &v }

func testExecutionStarts(t *testing.T, s storage.Store) {
	ctx := t.Context()
	id := newID("exec")
	_, err := s.GetExecutionStart(ctx, id)
	require.ErrorIs(t, err, types.ErrNotFound)
	first := &storage.ExecutionStart{ID: id, VMID: "vm-1", TaskID: "task-1", PID: 42, StartedAt: at(0)}
	require.NoError(t, s.MarkExecutionStarted(ctx, first))
	require.NoError(t, s.MarkExecutionStarted(ctx, &storage.ExecutionStart{ID: id, VMID: "vm-1", PID: 43}))
	got, err := s.GetExecutionStart(ctx, id)
	require.NoError(t, err)
	require.Equal(t, 42, got.PID)
	require.Equal(t, "task-1", got.TaskID)
	require.True(t, got.StartedAt.Equal(at(0)))
	require.ErrorIs(t, s.MarkExecutionStarted(ctx, &storage.ExecutionStart{ID: newID("exec")}), types.ErrInvalid)
}

func testMarkOwnerVMsLost(t *testing.T, s storage.Store) {
	ctx := t.Context()
	owner := newID("worker")
	want := map[string]bool{}
	for _, st := range types.AllVMStates {
		vm := createVM(t, s, newID("lost-"+string(st)), st)
		_, err := s.ClaimVM(ctx, vm.ID, storage.Claim{Owner: owner, Provider: "docker"})
		require.NoError(t, err)
		switch st {
		case types.VMPending, types.VMCreating, types.VMRunning, types.VMPaused, types.VMSuspended, types.VMStopping, types.VMStopped:
			want[vm.ID] = true // a VM already lost, failed or on its way out stays as it is
		}
	}
	other := createVM(t, s, newID("other"), types.VMRunning)
	_, err := s.ClaimVM(ctx, other.ID, storage.Claim{Owner: newID("worker"), Provider: "docker"})
	require.NoError(t, err)

	moved, err := s.MarkOwnerVMsLost(ctx, owner, "owner silent")
	require.NoError(t, err)
	got := map[string]bool{}
	for _, vm := range moved {
		got[vm.ID] = true
		require.Equal(t, types.VMLost, vm.State)
		require.Equal(t, "owner silent", vm.Error)
	}
	require.Equal(t, want, got)
	again, err := s.MarkOwnerVMsLost(ctx, owner, "owner silent")
	require.NoError(t, err)
	require.Empty(t, again)
	o, err := s.GetVM(ctx, other.ID)
	require.NoError(t, err)
	require.Equal(t, types.VMRunning, o.State)
	// The owner takes a lost VM back.
	for id := range want {
		ok, err := s.UpdateOwnedVMState(ctx, id, owner, types.VMLost, types.VMRunning, "")
		require.NoError(t, err)
		require.True(t, ok)
		break
	}
	_, err = s.MarkOwnerVMsLost(ctx, "", "x")
	require.ErrorIs(t, err, types.ErrInvalid)
}

func testRunExclusive(t *testing.T, s storage.Store) {
	ctx := t.Context()
	name := newID("lock")
	inside, leave := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		ran, err := s.RunExclusive(ctx, name, func(context.Context) error {
			close(inside)
			<-leave
			return nil
		})
		if err == nil && !ran {
			err = errors.New("the first caller did not run")
		}
		done <- err
	}()
	<-inside
	ran, err := s.RunExclusive(ctx, name, func(context.Context) error { return nil })
	require.NoError(t, err)
	require.False(t, ran, "a second holder ran while the first held the lock")
	ran, err = s.RunExclusive(ctx, newID("lock"), func(context.Context) error { return nil })
	require.NoError(t, err)
	require.True(t, ran, "another name is another lock")
	close(leave)
	require.NoError(t, <-done)
	boom := errors.New("boom")
	ran, err = s.RunExclusive(ctx, name, func(context.Context) error { return boom })
	require.True(t, ran)
	require.ErrorIs(t, err, boom)
}

func testSnapshots(t *testing.T, s storage.Store) {
	ctx := t.Context()
	name := newID("snap")
	sn := &types.Snapshot{ID: newID("snapid"), Name: name, Kind: types.KindSnapshot, VMID: "vm-1", Owner: "w1",
		VCPUs: 1, MemoryMB: 256, Tools: []string{"node@22"}, Env: map[string]string{"A": "b"}, Tenant: "t1"}
	require.NoError(t, s.CreateSnapshot(ctx, sn))
	require.Equal(t, types.SnapshotCreating, sn.State)
	got, err := s.GetSnapshot(ctx, sn.ID)
	require.NoError(t, err)
	require.Equal(t, []string{"node@22"}, got.Tools)
	require.Equal(t, "b", got.Env["A"])
	require.Equal(t, types.NetworkNone, got.Network)

	// One live name per kind; a template may share a snapshot's name.
	clash := *sn
	clash.ID = newID("snapid")
	require.ErrorIs(t, s.CreateSnapshot(ctx, &clash), types.ErrConflict)
	tpl := clash
	tpl.Kind = types.KindTemplate
	require.NoError(t, s.CreateSnapshot(ctx, &tpl))
	require.ErrorIs(t, s.CreateSnapshot(ctx, &types.Snapshot{ID: newID("x"), Name: "bad name!", Kind: types.KindSnapshot, VCPUs: 1, MemoryMB: 128}), types.ErrInvalid)

	found, err := s.FindSnapshot(ctx, types.KindTemplate, name)
	require.NoError(t, err)
	require.Equal(t, tpl.ID, found.ID)
	_, err = s.FindSnapshot(ctx, types.KindSnapshot, newID("none"))
	require.ErrorIs(t, err, types.ErrNotFound)

	ready, dir, size := types.SnapshotReady, "/var/lib/x", int64(42)
	u, err := s.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: &ready, Dir: &dir, SizeBytes: &size})
	require.NoError(t, err)
	require.Equal(t, types.SnapshotReady, u.State)
	require.Equal(t, dir, u.Dir)
	require.Equal(t, size, u.SizeBytes)
	_, err = s.UpdateSnapshot(ctx, newID("none"), storage.SnapshotUpdate{State: &ready})
	require.ErrorIs(t, err, types.ErrNotFound)

	tenant := "t1"
	list, err := s.ListSnapshots(ctx, types.KindSnapshot, &tenant)
	require.NoError(t, err)
	require.Contains(t, ids(list, func(x *types.Snapshot) string { return x.ID }), sn.ID)
	require.NotContains(t, ids(list, func(x *types.Snapshot) string { return x.ID }), tpl.ID)

	// Clones are the live VMs started from it.
	clone := newVM(newID("clone"), types.VMRunning)
	clone.FromSnapshot = sn.ID
	require.NoError(t, s.CreateVM(ctx, clone))
	clones, err := s.ListSnapshotClones(ctx, sn.ID)
	require.NoError(t, err)
	require.Equal(t, []string{clone.ID}, ids(clones, vmID))
	_, err = s.UpdateVMState(ctx, clone.ID, types.VMDeleting, "")
	require.NoError(t, err)
	_, err = s.UpdateVMState(ctx, clone.ID, types.VMDeleted, "")
	require.NoError(t, err)
	clones, err = s.ListSnapshotClones(ctx, sn.ID)
	require.NoError(t, err)
	require.Empty(t, clones)

	// A deleted snapshot frees its name.
	gone := types.SnapshotDeleted
	_, err = s.UpdateSnapshot(ctx, sn.ID, storage.SnapshotUpdate{State: &gone})
	require.NoError(t, err)
	clash.ID = newID("snapid")
	require.NoError(t, s.CreateSnapshot(ctx, &clash))
}
