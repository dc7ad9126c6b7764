package vmutil

import (
	"fmt"
	"sync"

	"github.com/aetherium/aetherium-core/pkg/agent"
)

// Clients caches one agent client per VM. A client is made on first use
// and kept until Drop (the VM stopped) or CloseAll (the backend closes).
// The zero value is ready.
type Clients struct {
	mu sync.Mutex
	m  map[string]*agent.Client
}

// Get returns VM id's client, making it with dial when there is none.
func (c *Clients) Get(id string, dial agent.Dialer) (*agent.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.m[id]; ok {
		return cl, nil
	}
	cl, err := agent.NewClient(dial)
	if err != nil {
		return nil, fmt.Errorf("connecting to vm %s's agent: %w", id, err)
	}
	if c.m == nil {
		c.m = map[string]*agent.Client{}
	}
	c.m[id] = cl
	return cl, nil
}

// Drop closes and forgets VM id's client, if any.
func (c *Clients) Drop(id string) {
	c.mu.Lock()
	cl, ok := c.m[id]
	delete(c.m, id)
	c.mu.Unlock()
	if ok {
		cl.Close()
	}
}

// CloseAll closes and forgets every client.
func (c *Clients) CloseAll() {
	c.mu.Lock()
	m := c.m
	c.m = nil
	c.mu.Unlock()
	for _, cl := range m {
		cl.Close()
	}
}
