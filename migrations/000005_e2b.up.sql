-- The E2B-compatible API (pkg/e2b): sandboxes and templates.

-- A sandbox is a VM made through the E2B API. Only the SHA-256 of its
-- access tokens (envdAccessToken) is kept: create issues one and every
-- connect another, since a token cannot be shown again. The row goes with
-- its VM.
CREATE TABLE e2b_sandboxes (
    vm_id        TEXT        NOT NULL,
    template     TEXT        NOT NULL,
    token_hashes BYTEA[]     NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT e2b_sandboxes_pkey PRIMARY KEY (vm_id),
    CONSTRAINT e2b_sandboxes_vm_id_fkey FOREIGN KEY (vm_id) REFERENCES vms (id) ON DELETE CASCADE
);

-- Templates registered by an operator (`aether-cli template create`):
-- a VM size and environment that a templateID names. "base" is built in
-- and needs no row.
CREATE TABLE templates (
    name       TEXT        NOT NULL,
    vcpus      INTEGER     NOT NULL,
    memory_mb  INTEGER     NOT NULL,
    env        TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT templates_pkey PRIMARY KEY (name),
    CONSTRAINT templates_vcpus_check CHECK (vcpus >= 1),
    CONSTRAINT templates_memory_mb_check CHECK (memory_mb >= 64)
);
