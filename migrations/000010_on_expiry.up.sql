-- What the owning worker does with a VM when its expires_at passes:
-- delete it (the default), or pause it (suspend to disk where the backend
-- can, pause its vCPUs elsewhere) and clear expires_at. E2B's autoPause.
ALTER TABLE vms ADD COLUMN on_expiry TEXT NOT NULL DEFAULT 'delete'
    CONSTRAINT vms_on_expiry_check CHECK (on_expiry IN ('delete', 'pause'));
