DROP TABLE vm_tools;
