package docker

// LockVM takes VM id's lock as a life-cycle step does, for the shared
// conformance case that cancels a call waiting behind it.
func (o *Orchestrator) LockVM(id string) (unlock func()) { return o.locks.Lock(id) }

// KeptCapabilities are the capabilities every container keeps.
var KeptCapabilities = keptCapabilities
