-- What a connector needs (docs/operations.md), plus ownership of the test database.
GRANT REPLICATION SLAVE, REPLICATION CLIENT, SELECT ON *.* TO 'fhir_cdc'@'%';
GRANT ALL PRIVILEGES ON fhir_cdc.* TO 'fhir_cdc'@'%';
