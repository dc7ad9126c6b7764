package e2b

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/aetherium/aetherium-core/pkg/agent"
	"github.com/aetherium/aetherium-core/pkg/service"
	"github.com/aetherium/aetherium-core/pkg/types"
)

// clientCache holds one agent client per sandbox, so that calls share a
// connection instead of dialling the worker each time. Clients unused for
// idle are closed; drop closes one at once (the sandbox was deleted).
type clientCache struct {
	dialer service.AgentDialer
	idle   time.Duration
	log    *slog.Logger

	mu      sync.Mutex
	clients map[string]*cachedClient
	stop    chan struct{}
	stopped bool
}

type cachedClient struct {
	c        *agent.Client
	lastUsed time.Time
	// users counts requests holding the client; the sweep never closes a
	// client in use, so a long process stream is not cut off.
	users int
	// shell is the sandbox's command shell once known ("" before): it is
	// forgotten with the client, so no state outlives a sandbox.
	shell string
}

// shell returns the shell recorded for sandbox id, or "".
func (cc *clientCache) shell(id string) string {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if e, ok := cc.clients[id]; ok {
		return e.shell
	}
	return ""
}

// setShell records the shell of sandbox id while its client is cached.
func (cc *clientCache) setShell(id, sh string) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if e, ok := cc.clients[id]; ok {
		e.shell = sh
	}
}

func newClientCache(d service.AgentDialer, idle time.Duration, log *slog.Logger) *clientCache {
	cc := &clientCache{dialer: d, idle: idle, log: log, clients: map[string]*cachedClient{}, stop: make(chan struct{})}
	go cc.sweep()
	return cc
}

// get returns the client of sandbox id, making it if needed, and a release
// function the caller runs when its request ends. The dialer runs with a
// context carrying no deadline of the caller's: the connection outlives
// the request.
func (cc *clientCache) get(ctx context.Context, id string) (*agent.Client, func(), error) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.stopped {
		return nil, nil, fmt.Errorf("%w: aether-api is shutting down; try again shortly", types.ErrUnavailable)
	}
	e, ok := cc.clients[id]
	if !ok {
		dctx := context.WithoutCancel(ctx)
		c, err := agent.NewClient(func(ctx context.Context) (net.Conn, error) {
			return cc.dialer.DialAgent(mergeValues(ctx, dctx), id)
		})
		if err != nil {
			return nil, nil, err
		}
		e = &cachedClient{c: c}
		cc.clients[id] = e
	}
	e.users++
	e.lastUsed = time.Now()
	var once sync.Once
	release := func() {
		once.Do(func() {
			cc.mu.Lock()
			e.users--
			e.lastUsed = time.Now()
			cc.mu.Unlock()
		})
	}
	return e.c, release, nil
}

// drop closes the client of sandbox id, if any.
func (cc *clientCache) drop(id string) {
	cc.mu.Lock()
	e, ok := cc.clients[id]
	delete(cc.clients, id)
	cc.mu.Unlock()
	if ok {
		_ = e.c.Close()
	}
}

func (cc *clientCache) sweep() {
	t := time.NewTicker(min(cc.idle, time.Minute))
	defer t.Stop()
	for {
		select {
		case <-cc.stop:
			return
		case <-t.C:
		}
		var old []*agent.Client
		cc.mu.Lock()
		for id, e := range cc.clients {
			if e.users == 0 && time.Since(e.lastUsed) > cc.idle {
				old = append(old, e.c)
				delete(cc.clients, id)
			}
		}
		cc.mu.Unlock()
		for _, c := range old {
			_ = c.Close()
		}
	}
}

func (cc *clientCache) close() {
	cc.mu.Lock()
	cs := cc.clients
	cc.clients = map[string]*cachedClient{}
	if !cc.stopped {
		cc.stopped = true
		close(cc.stop)
	}
	cc.mu.Unlock()
	for _, e := range cs {
		_ = e.c.Close()
	}
}

// mergeValues is ctx (its deadline and cancellation) with the values of
// vals (the scope the dialer checks).
func mergeValues(ctx, vals context.Context) context.Context {
	return valuesCtx{Context: ctx, vals: vals}
}

type valuesCtx struct {
	context.Context
	vals context.Context
}

func (c valuesCtx) Value(key any) any { return c.vals.Value(key) }
