package qemu

// LockVM takes VM id's lock as a life-cycle step does, for the shared
// conformance case that cancels a call waiting behind it.
func (o *Orchestrator) LockVM(id string) (unlock func()) { return o.locks.Lock(id) }

// ResetChannel ends VM id's agent session, so the next call dials anew.
func (o *Orchestrator) ResetChannel(id string) {
	o.mu.Lock()
	c := o.chans[id]
	o.mu.Unlock()
	if c != nil {
		c.Reset()
	}
}
