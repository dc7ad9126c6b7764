-- Address leases of VM networking (pkg/network). A pool is one bridge on
-- one host: workers sharing a bridge share its pool, and an address is
-- unique within its pool. A VM holds at most one lease; deleting the row
-- returns the address to the pool. vm_id has no foreign key to vms: a lease
-- may be made before the VM row is final, and VM rows are never deleted.
CREATE TABLE network_leases (
    pool       TEXT        NOT NULL,
    vm_id      TEXT        NOT NULL,
    subnet     CIDR        NOT NULL,
    ip         INET        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT network_leases_pkey PRIMARY KEY (vm_id),
    CONSTRAINT network_leases_pool_ip_key UNIQUE (pool, ip),
    CONSTRAINT network_leases_ip_in_subnet CHECK (ip << subnet)
);
