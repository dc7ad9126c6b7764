DROP TABLE IF EXISTS network_leases;
