package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/aetherium/aetherium-core/pkg/types"
)

// RedisConfig locates Redis.
type RedisConfig struct {
	Addr     string
	Password string
	DB       int
}

// ConnOpt returns the Asynq connection options.
func (c RedisConfig) ConnOpt() asynq.RedisClientOpt {
	return asynq.RedisClientOpt{Addr: c.Addr, Password: c.Password, DB: c.DB}
}

// Redis implements Queue, Notifier and OutputStream on one Redis.
type Redis struct {
	cfg       RedisConfig
	rdb       *redis.Client
	client    *asynq.Client
	inspector *asynq.Inspector
}

var (
	_ Queue        = (*Redis)(nil)
	_ Notifier     = (*Redis)(nil)
	_ OutputStream = (*Redis)(nil)
)

// outputTTL is how long a streamed command's output stays readable.
const outputTTL = time.Hour

// NewRedis connects to Redis and checks that it answers. An unreachable
// Redis returns an error wrapping types.ErrUnavailable that says how to
// start it.
func NewRedis(ctx context.Context, cfg RedisConfig) (*Redis, error) {
	rdb := redis.NewClient(&redis.Options{Addr: cfg.Addr, Password: cfg.Password, DB: cfg.DB})
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		return nil, UnavailableError(cfg.Addr, err)
	}
	return &Redis{
		cfg:       cfg,
		rdb:       rdb,
		client:    asynq.NewClientFromRedisClient(rdb),
		inspector: asynq.NewInspectorFromRedisClient(rdb),
	}, nil
}

// UnavailableError explains an unreachable Redis.
func UnavailableError(addr string, err error) error {
	return fmt.Errorf("%w: cannot reach Redis at %s: %v; start it with `make services-up` or set queue.redis_addr", types.ErrUnavailable, addr, err)
}

// Client returns the underlying Redis client (shared, do not close).
func (r *Redis) Client() *redis.Client { return r.rdb }

// Ping checks that Redis answers.
func (r *Redis) Ping(ctx context.Context) error {
	if err := r.rdb.Ping(ctx).Err(); err != nil {
		return UnavailableError(r.cfg.Addr, err)
	}
	return nil
}

// Close releases the connections.
func (r *Redis) Close() error { return r.rdb.Close() }

// Enqueue implements Queue.
func (r *Redis) Enqueue(ctx context.Context, t *types.Task, o EnqueueOptions) error {
	opts := []asynq.Option{asynq.TaskID(t.ID), asynq.Queue(o.Queue), asynq.MaxRetry(o.MaxRetry), asynq.Retention(24 * time.Hour)}
	if o.Timeout > 0 {
		opts = append(opts, asynq.Timeout(o.Timeout))
	}
	_, err := r.client.EnqueueContext(ctx, asynq.NewTask(string(t.Type), t.Payload), opts...)
	switch {
	case errors.Is(err, asynq.ErrTaskIDConflict):
		return nil // already queued: enqueueing twice is harmless
	case err != nil:
		return UnavailableError(r.cfg.Addr, fmt.Errorf("enqueueing %s task %s: %w", t.Type, t.ID, err))
	}
	return nil
}

// Cancel implements Queue.
func (r *Redis) Cancel(ctx context.Context, taskID, queueName string) error {
	info, err := r.inspector.GetTaskInfo(queueName, taskID)
	switch {
	case errors.Is(err, asynq.ErrTaskNotFound) || errors.Is(err, asynq.ErrQueueNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("looking up task %s in queue %s: %w", taskID, queueName, err)
	case info.State == asynq.TaskStateActive:
		// Cancellation goes to every worker over pub/sub; the one running
		// the task cancels its context.
		if err := r.inspector.CancelProcessing(taskID); err != nil {
			return fmt.Errorf("cancelling task %s: %w", taskID, err)
		}
	case info.State != asynq.TaskStateCompleted:
		if err := r.inspector.DeleteTask(queueName, taskID); err != nil && !errors.Is(err, asynq.ErrTaskNotFound) {
			return fmt.Errorf("removing task %s from queue %s: %w", taskID, queueName, err)
		}
	}
	return nil
}

func taskChannel(id string) string { return "aetherium:task:" + id }
func outputKey(id string) string   { return "aetherium:output:" + id }

// NotifyTask implements Notifier.
func (r *Redis) NotifyTask(ctx context.Context, taskID string) error {
	return r.rdb.Publish(ctx, taskChannel(taskID), "").Err()
}

// WatchTask implements Notifier.
func (r *Redis) WatchTask(ctx context.Context, taskID string) (<-chan struct{}, func(), error) {
	ps := r.rdb.Subscribe(ctx, taskChannel(taskID))
	if _, err := ps.Receive(ctx); err != nil { // wait for the subscription to be live
		ps.Close()
		return nil, nil, UnavailableError(r.cfg.Addr, err)
	}
	events := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(events)
		msgs := ps.Channel()
		for {
			select {
			case <-done:
				return
			case _, ok := <-msgs:
				if !ok {
					return
				}
				select {
				case events <- struct{}{}:
				default: // a wake-up is already pending
				}
			}
		}
	}()
	var stopped bool
	stop := func() {
		if !stopped {
			stopped = true
			close(done)
			ps.Close()
		}
	}
	return events, stop, nil
}

// AppendOutput implements OutputStream.
func (r *Redis) AppendOutput(ctx context.Context, taskID string, c OutputChunk) error {
	values := map[string]any{"k": string(c.Kind), "d": c.Data}
	if c.Exit != nil {
		b, _ := json.Marshal(c.Exit)
		values["d"] = b
	}
	key := outputKey(taskID)
	pipe := r.rdb.Pipeline()
	pipe.XAdd(ctx, &redis.XAddArgs{Stream: key, Values: values})
	pipe.Expire(ctx, key, outputTTL)
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("appending output of task %s: %w", taskID, err)
	}
	return nil
}

// ReadOutput implements OutputStream.
func (r *Redis) ReadOutput(ctx context.Context, taskID string, fn func(OutputChunk) error) (*ExitInfo, error) {
	key, last := outputKey(taskID), "0-0"
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		res, err := r.rdb.XRead(ctx, &redis.XReadArgs{Streams: []string{key, last}, Count: 256, Block: time.Second}).Result()
		if errors.Is(err, redis.Nil) {
			continue // nothing new within the block time
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("reading output of task %s: %w", taskID, err)
		}
		for _, s := range res {
			for _, m := range s.Messages {
				last = m.ID
				kind, _ := m.Values["k"].(string)
				data, _ := m.Values["d"].(string)
				c := OutputChunk{Kind: OutputKind(kind), Data: []byte(data)}
				if c.Kind == OutputExit {
					var ei ExitInfo
					if err := json.Unmarshal(c.Data, &ei); err != nil {
						return nil, fmt.Errorf("decoding exit of task %s: %w", taskID, err)
					}
					return &ei, nil
				}
				if err := fn(c); err != nil {
					return nil, err
				}
			}
		}
	}
}

// go-redis logs its connection-pool failures to standard error by default,
// which would land in the middle of aether-cli's output (a command's
// stderr) while Redis is down. The same failures reach callers as returned
// errors; the log lines go to slog at debug level instead.
func init() { redis.SetLogger(slogRedisLogger{}) }

type slogRedisLogger struct{}

func (slogRedisLogger) Printf(ctx context.Context, format string, v ...any) {
	slog.Default().DebugContext(ctx, "redis: "+fmt.Sprintf(format, v...))
}
