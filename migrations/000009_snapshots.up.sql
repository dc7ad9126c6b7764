-- Pause, suspend, snapshots and templates (issue 12).
ALTER TABLE vms DROP CONSTRAINT vms_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_state_check CHECK (state IN
    ('pending', 'creating', 'running', 'paused', 'suspended', 'stopping', 'stopped',
     'deleting', 'deleted', 'failed', 'lost'));
-- The snapshot (or template) a VM was started from: one with live clones
-- cannot be deleted.
ALTER TABLE vms ADD COLUMN from_snapshot TEXT NOT NULL DEFAULT '';
CREATE INDEX vms_from_snapshot_idx ON vms (from_snapshot) WHERE from_snapshot <> '';

-- A snapshot of a VM (kind 'snapshot'), or a template: a VM booted with
-- tools and a setup command, snapshotted when its agent was ready (kind
-- 'template'). Its files live on its owner worker's disk, in dir.
CREATE TABLE snapshots (
    id         TEXT        NOT NULL,
    name       TEXT        NOT NULL,
    kind       TEXT        NOT NULL,
    vm_id      TEXT        NOT NULL DEFAULT '', -- the VM it was taken from
    owner      TEXT        NOT NULL DEFAULT '', -- the worker holding its files
    provider   TEXT        NOT NULL DEFAULT '',
    vcpus      INTEGER     NOT NULL,
    memory_mb  INTEGER     NOT NULL,
    network    TEXT        NOT NULL DEFAULT 'none',
    tools      TEXT,                            -- JSON list of tool specs
    setup      TEXT        NOT NULL DEFAULT '',
    env        TEXT,                            -- JSON map: default env of clones
    dir        TEXT        NOT NULL DEFAULT '',
    size_bytes BIGINT      NOT NULL DEFAULT 0,
    state      TEXT        NOT NULL,
    error      TEXT        NOT NULL DEFAULT '',
    tenant     TEXT        NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT snapshots_pkey PRIMARY KEY (id),
    CONSTRAINT snapshots_kind_check CHECK (kind IN ('snapshot', 'template')),
    CONSTRAINT snapshots_state_check CHECK (state IN ('creating', 'ready', 'failed', 'deleting', 'deleted')),
    CONSTRAINT snapshots_vcpus_check CHECK (vcpus >= 1),
    CONSTRAINT snapshots_memory_mb_check CHECK (memory_mb >= 64)
);
-- A name may be reused once what held it is deleted; snapshots and
-- templates have a name space each.
CREATE UNIQUE INDEX snapshots_name_live_key ON snapshots (kind, name) WHERE state <> 'deleted';
