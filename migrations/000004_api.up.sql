-- The HTTP API: tenants, expiry, API keys and the workers' data plane.

-- The tenant owning a VM ('' for VMs made without one, by the local CLI).
ALTER TABLE vms ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
-- When the owning worker deletes the VM (NULL: never).
ALTER TABLE vms ADD COLUMN expires_at TIMESTAMPTZ;
-- Names are unique per tenant, so one tenant cannot learn another's names.
DROP INDEX vms_name_live_key;
CREATE UNIQUE INDEX vms_tenant_name_live_key ON vms (tenant, name) WHERE state <> 'deleted';
CREATE INDEX vms_tenant_idx ON vms (tenant, created_at) WHERE state <> 'deleted';
CREATE INDEX vms_expires_idx ON vms (owner, expires_at) WHERE expires_at IS NOT NULL AND state <> 'deleted';

-- API keys: only the SHA-256 of the secret is stored. Rows are never
-- deleted: a revoked key keeps its row so that it stays refused.
CREATE TABLE api_keys (
    id            TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    tenant        TEXT        NOT NULL,
    admin         BOOLEAN     NOT NULL DEFAULT FALSE,
    hash          BYTEA       NOT NULL,
    max_vms       INTEGER     NOT NULL DEFAULT 0,
    max_vcpus     INTEGER     NOT NULL DEFAULT 0,
    max_memory_mb INTEGER     NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL,
    revoked_at    TIMESTAMPTZ,
    CONSTRAINT api_keys_pkey PRIMARY KEY (id),
    CONSTRAINT api_keys_limits_check CHECK (max_vms >= 0 AND max_vcpus >= 0 AND max_memory_mb >= 0)
);

-- Where a worker's data plane listens ('' when it has none).
ALTER TABLE workers ADD COLUMN data_addr TEXT NOT NULL DEFAULT '';
