DROP TABLE templates;
DROP TABLE e2b_sandboxes;
