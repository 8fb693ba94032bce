-- Run once by the sqlserver-init service of docker-compose.yml.
IF DB_ID('fhir_cdc') IS NULL CREATE DATABASE fhir_cdc;
GO
USE fhir_cdc;
GO
ALTER DATABASE fhir_cdc SET ALLOW_SNAPSHOT_ISOLATION ON;
GO
IF NOT EXISTS (SELECT 1 FROM sys.databases WHERE name = 'fhir_cdc' AND is_cdc_enabled = 1)
  EXEC sys.sp_cdc_enable_db;
GO
