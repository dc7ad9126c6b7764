-- Reliability under faults (issue 13).
--
-- 'lost': the VM's owner worker stopped reporting for worker.dead_after;
-- its owner adopts it again (running) or cleans it up when it returns.
ALTER TABLE vms DROP CONSTRAINT vms_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_state_check CHECK (state IN
    ('pending', 'creating', 'running', 'stopping', 'stopped', 'deleting', 'deleted', 'failed', 'lost'));

-- Where a task was enqueued (its Asynq queue), so that a task Asynq lost
-- (Redis restarted without its data) is enqueued again in the same queue
-- under the same id; and which worker runs its current attempt, so that a
-- restarted worker takes back its own tasks at once.
ALTER TABLE tasks ADD COLUMN queue TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN worker_id TEXT NOT NULL DEFAULT '';
CREATE INDEX tasks_open_idx ON tasks (updated_at) WHERE state IN ('pending', 'running', 'retrying');

-- A command whose start the guest agent reported. Once a row is here the
-- command is never started again: a retry may only reattach to it.
CREATE TABLE execution_starts (
    id         TEXT        NOT NULL,
    vm_id      TEXT        NOT NULL,
    task_id    TEXT        NOT NULL DEFAULT '',
    pid        INTEGER     NOT NULL DEFAULT 0,
    started_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT execution_starts_pkey PRIMARY KEY (id)
);
