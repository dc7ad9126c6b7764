-- Tools (pkg/tools): which cached tool versions each VM was given, at
-- create time or later by a tools:install task. The tool cache's prune
-- consults it so that no entry a live VM uses is removed. Rows go with
-- their VM row; a deleted VM's rows stay as its history but no longer hold
-- an entry.
CREATE TABLE vm_tools (
    vm_id    TEXT        NOT NULL,
    key      TEXT        NOT NULL,
    spec     TEXT        NOT NULL,
    tool     TEXT        NOT NULL,
    version  TEXT        NOT NULL,
    added_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT vm_tools_pkey PRIMARY KEY (vm_id, key),
    CONSTRAINT vm_tools_vm_id_fkey FOREIGN KEY (vm_id) REFERENCES vms (id) ON DELETE CASCADE,
    CONSTRAINT vm_tools_key_check CHECK (key <> '')
);

CREATE INDEX vm_tools_key_idx ON vm_tools (key);
