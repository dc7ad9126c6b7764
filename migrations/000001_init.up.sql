-- Initial schema. Ids are TEXT and maps, lists and raw JSON are TEXT holding
-- JSON (NULL when absent), so the same schema also works on SQLite. Command
-- output is BYTEA because a program may print NUL bytes or invalid UTF-8,
-- which PostgreSQL's TEXT rejects. Rows are never deleted: a VM is
-- soft-deleted by moving it to state 'deleted'.

CREATE TABLE vms (
    id         TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    vcpus      INTEGER     NOT NULL,
    memory_mb  INTEGER     NOT NULL,
    state      TEXT        NOT NULL,
    provider   TEXT        NOT NULL DEFAULT '',
    owner      TEXT        NOT NULL DEFAULT '', -- '' until a worker claims it
    labels     TEXT,
    env        TEXT,
    error      TEXT        NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT vms_pkey PRIMARY KEY (id),
    CONSTRAINT vms_vcpus_check CHECK (vcpus >= 1),
    CONSTRAINT vms_memory_mb_check CHECK (memory_mb >= 64),
    CONSTRAINT vms_state_check CHECK (state IN
        ('pending', 'creating', 'running', 'stopping', 'stopped', 'deleting', 'deleted', 'failed'))
);
-- A name may be reused once the VM that held it is deleted.
CREATE UNIQUE INDEX vms_name_live_key ON vms (name) WHERE state <> 'deleted';
CREATE INDEX vms_owner_idx ON vms (owner, created_at);
CREATE INDEX vms_created_idx ON vms (created_at, id);

CREATE TABLE tasks (
    id          TEXT        NOT NULL,
    type        TEXT        NOT NULL,
    -- No foreign key: a task may be recorded before the VM it acts on (a
    -- vm:create task and its VM row are written in either order).
    vm_id       TEXT,
    payload     TEXT,
    state       TEXT        NOT NULL,
    attempts    INTEGER     NOT NULL DEFAULT 0,
    error       TEXT        NOT NULL DEFAULT '',
    result      TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    CONSTRAINT tasks_pkey PRIMARY KEY (id),
    CONSTRAINT tasks_attempts_check CHECK (attempts >= 0),
    CONSTRAINT tasks_state_check CHECK (state IN
        ('pending', 'running', 'retrying', 'succeeded', 'failed'))
);
CREATE INDEX tasks_vm_created_idx ON tasks (vm_id, created_at);

CREATE TABLE jobs (
    id              TEXT        NOT NULL,
    vm_id           TEXT        NOT NULL,
    task_id         TEXT,
    commands        TEXT,
    stop_on_failure BOOLEAN     NOT NULL DEFAULT FALSE,
    state           TEXT        NOT NULL,
    error           TEXT        NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    CONSTRAINT jobs_pkey PRIMARY KEY (id),
    CONSTRAINT jobs_vm_id_fkey FOREIGN KEY (vm_id) REFERENCES vms (id),
    CONSTRAINT jobs_state_check CHECK (state IN ('pending', 'running', 'succeeded', 'failed'))
);
CREATE INDEX jobs_vm_idx ON jobs (vm_id, created_at);

CREATE TABLE executions (
    id               TEXT        NOT NULL,
    vm_id            TEXT        NOT NULL,
    job_id           TEXT,
    task_id          TEXT,
    command          TEXT        NOT NULL,
    args             TEXT,
    env              TEXT,
    cwd              TEXT        NOT NULL DEFAULT '',
    exit_code        INTEGER     NOT NULL DEFAULT 0,
    stdout           BYTEA       NOT NULL,
    stderr           BYTEA       NOT NULL,
    stdout_truncated BOOLEAN     NOT NULL DEFAULT FALSE,
    stderr_truncated BOOLEAN     NOT NULL DEFAULT FALSE,
    timed_out        BOOLEAN     NOT NULL DEFAULT FALSE,
    error            TEXT        NOT NULL DEFAULT '',
    started_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ NOT NULL,
    duration_ns      BIGINT      NOT NULL DEFAULT 0,
    CONSTRAINT executions_pkey PRIMARY KEY (id),
    CONSTRAINT executions_vm_id_fkey FOREIGN KEY (vm_id) REFERENCES vms (id),
    CONSTRAINT executions_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs (id)
);
-- A VM's and a job's executions are listed in the order they started; id
-- breaks ties so the order is stable.
CREATE INDEX executions_vm_started_idx ON executions (vm_id, started_at, id);
CREATE INDEX executions_job_started_idx ON executions (job_id, started_at, id);

CREATE TABLE workers (
    id        TEXT        NOT NULL,
    hostname  TEXT        NOT NULL DEFAULT '',
    provider  TEXT        NOT NULL DEFAULT '',
    healthy   BOOLEAN     NOT NULL DEFAULT FALSE,
    detail    TEXT        NOT NULL DEFAULT '',
    last_seen TIMESTAMPTZ NOT NULL,
    CONSTRAINT workers_pkey PRIMARY KEY (id)
);
