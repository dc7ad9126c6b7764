DROP TABLE snapshots;
DROP INDEX vms_from_snapshot_idx;
ALTER TABLE vms DROP COLUMN from_snapshot;
UPDATE vms SET state = 'failed', error = 'paused or suspended when the schema was downgraded' WHERE state IN ('paused', 'suspended');
ALTER TABLE vms DROP CONSTRAINT vms_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_state_check CHECK (state IN
    ('pending', 'creating', 'running', 'stopping', 'stopped', 'deleting', 'deleted', 'failed', 'lost'));
