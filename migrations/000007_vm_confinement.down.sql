ALTER TABLE vms DROP COLUMN confinement;
