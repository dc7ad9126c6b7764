package worker

import "time"

// SetLostGrace lowers how long a task row is open before the sweeper asks
// Asynq about it, for the tests; the returned func restores it.
func SetLostGrace(d time.Duration) func() {
	old := lostGrace
	lostGrace = d
	return func() { lostGrace = old }
}
