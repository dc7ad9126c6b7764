-- How each VM's VMM is confined (uid, gid, cgroup), as its worker found
-- it when the VM last booted; NULL for backends that do not confine.
ALTER TABLE vms ADD COLUMN confinement jsonb;
