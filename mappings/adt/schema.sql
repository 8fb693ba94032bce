-- A small ADT (admission, discharge, transfer) database on SQL Server: the sample behind
-- mappings/adt and connectors/adt-sqlserver.toml. Run with sqlcmd as a member of
-- sysadmin (enabling CDC on the database needs it); integration-tests/docker/
-- sqlserver-init.sql runs it into the docker-compose SQL Server.
--
-- CDC on the database and on each mapped table, SNAPSHOT isolation for the connector's
-- snapshot chunks, and the signal table through which `fhir-cdc snapshot` asks for
-- ad-hoc snapshots. SQL Server Agent must run: it runs the capture job.

IF DB_ID(N'adt') IS NULL CREATE DATABASE adt;
GO
USE adt;
GO
ALTER DATABASE adt SET ALLOW_SNAPSHOT_ISOLATION ON;
GO
IF NOT EXISTS (SELECT 1 FROM sys.databases WHERE name = N'adt' AND is_cdc_enabled = 1)
  EXEC sys.sp_cdc_enable_db;
GO

CREATE TABLE dbo.adt_patient (
  patient_id   int            NOT NULL PRIMARY KEY,
  mrn          varchar(20)    NOT NULL,
  family_name  nvarchar(60)   NOT NULL,
  given_name   nvarchar(60)   NULL,
  birth_date   date           NULL,
  sex          char(1)        NULL,              -- M, F, U
  deceased_at  datetime2(3)   NULL,              -- local time of the hospital
  row_guid     uniqueidentifier NOT NULL DEFAULT NEWID(),
  updated_at   datetime       NOT NULL DEFAULT GETDATE()
);
GO

CREATE TABLE dbo.adt_visit (
  visit_id       bigint        NOT NULL PRIMARY KEY,
  visit_no       varchar(20)   NOT NULL,
  mrn            varchar(20)   NOT NULL,
  patient_class  char(1)       NOT NULL,         -- I inpatient, O outpatient, E emergency
  status         char(1)       NOT NULL,         -- A admitted, D discharged, X cancelled
  ward           nvarchar(40)  NULL,
  admitted_at    datetime      NOT NULL,         -- local time of the hospital
  discharged_at  datetime      NULL,
  deposit        money         NULL
);
GO

CREATE TABLE dbo.fhir_cdc_signal (
  id    varchar(64)   NOT NULL PRIMARY KEY,
  type  varchar(32)   NOT NULL,
  data  nvarchar(max) NULL
);
GO

EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'adt_patient', @role_name = NULL;
EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'adt_visit', @role_name = NULL;
EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'fhir_cdc_signal', @role_name = NULL;
GO

-- The connector's login: read the tables and the change tables, see its snapshot
-- transaction's LSN, and (for `fhir-cdc snapshot`) write requests.
IF SUSER_ID(N'fhir_cdc') IS NULL
  CREATE LOGIN fhir_cdc WITH PASSWORD = N'FhirCdc-Reader-1', CHECK_POLICY = OFF;
GO
CREATE USER fhir_cdc FOR LOGIN fhir_cdc;
GRANT SELECT ON SCHEMA::dbo TO fhir_cdc;
GRANT SELECT ON SCHEMA::cdc TO fhir_cdc;
GRANT INSERT ON dbo.fhir_cdc_signal TO fhir_cdc;
GO
USE master;
GRANT VIEW SERVER STATE TO fhir_cdc;
GO
