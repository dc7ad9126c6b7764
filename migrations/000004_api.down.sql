ALTER TABLE workers DROP COLUMN data_addr;
DROP TABLE api_keys;
DROP INDEX vms_expires_idx;
DROP INDEX vms_tenant_idx;
DROP INDEX vms_tenant_name_live_key;
CREATE UNIQUE INDEX vms_name_live_key ON vms (name) WHERE state <> 'deleted';
ALTER TABLE vms DROP COLUMN expires_at;
ALTER TABLE vms DROP COLUMN tenant;
