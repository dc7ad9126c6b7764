-- A VM's network mode: none (loopback only) or nat (TAP, address, NAT).
ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'none'
    CONSTRAINT vms_network_valid CHECK (network IN ('none', 'nat'));
