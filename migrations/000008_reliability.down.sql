DROP TABLE execution_starts;
DROP INDEX tasks_open_idx;
ALTER TABLE tasks DROP COLUMN worker_id;
ALTER TABLE tasks DROP COLUMN queue;
UPDATE vms SET state = 'failed', error = 'its owner worker was lost' WHERE state = 'lost';
ALTER TABLE vms DROP CONSTRAINT vms_state_check;
ALTER TABLE vms ADD CONSTRAINT vms_state_check CHECK (state IN
    ('pending', 'creating', 'running', 'stopping', 'stopped', 'deleting', 'deleted', 'failed'));
