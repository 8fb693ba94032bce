-- The legacy laboratory information system (LIS) these mappings read: PostgreSQL, schema lis.
-- Typical of the genre: CHAR-padded codes, local test codes, status letters, timestamps
-- without zone written in the lab's local time (America/Chicago), and corrections done as
-- updates of the same row.

CREATE SCHEMA IF NOT EXISTS lis;

CREATE TABLE lis.patient (
    patient_id    serial PRIMARY KEY,
    mrn           char(10) NOT NULL UNIQUE,          -- medical record number, space-padded
    last_name     varchar(60) NOT NULL,
    first_name    varchar(60),
    middle_name   varchar(60),
    birth_date    date,
    sex           char(1),                           -- M, F, U
    ssn           varchar(11),                       -- published only as a keyed token
    deceased      char(1) NOT NULL DEFAULT 'N',      -- Y / N
    phone         varchar(30),
    updated_at    timestamp NOT NULL DEFAULT now()
);

CREATE TABLE lis.lab_order (
    order_id          serial PRIMARY KEY,
    accession_no      varchar(20) NOT NULL UNIQUE,
    mrn               char(10) NOT NULL,
    order_code        varchar(10) NOT NULL,          -- local panel code: BMP, CBC, LIPID
    order_status      char(1) NOT NULL,              -- O ordered, P partial, F final, C corrected, X cancelled
    priority          char(1) NOT NULL DEFAULT 'R',  -- R routine, S stat
    ordering_provider varchar(20),                   -- provider number
    ordered_at        timestamp NOT NULL,            -- local time
    reported_at       timestamptz
);

CREATE TABLE lis.specimen (
    specimen_id   serial PRIMARY KEY,
    accession_no  varchar(20) NOT NULL,
    mrn           char(10) NOT NULL,
    specimen_type varchar(5) NOT NULL,               -- BLD, SER, PLAS, URN
    collected_at  timestamp NOT NULL,                -- local time
    received_at   timestamptz
);

CREATE TABLE lis.lab_result (
    result_id      serial PRIMARY KEY,
    accession_no   varchar(20) NOT NULL,
    mrn            char(10) NOT NULL,
    test_code      varchar(10) NOT NULL,             -- local test code: GLU, K, NA, HGB, ...
    value_numeric  numeric(14,4),
    value_text     varchar(200),
    units          varchar(20),
    ref_low        numeric(14,4),
    ref_high       numeric(14,4),
    abnormal_flag  char(1),                          -- H, L, N, A (abnormal), C (critical)
    result_status  char(1) NOT NULL,                 -- P preliminary, F final, C corrected, A amended, X cancelled
    collected_at   timestamp NOT NULL,               -- local time
    verified_at    timestamptz,
    comment        text
);

-- The test catalogue: local test codes to LOINC, kept by the lab's staff. The results of the
-- point-of-care interface hold only the local code.
CREATE TABLE lis.test_catalogue (
    local_code    varchar(10) PRIMARY KEY,
    loinc_code    varchar(10),
    loinc_name    varchar(200),
    active        char(1) NOT NULL DEFAULT 'Y'
);

-- Results from the point-of-care analyser interface, stored as the analysers send them: the
-- result as text ("7.25", "<0.01", ">600", "POS"), the collection date and time as text in
-- the lab's local time, the abnormal flags as a comma-separated list.
CREATE TABLE lis.poc_result (
    result_id      serial PRIMARY KEY,
    mrn            char(10) NOT NULL,
    test_code      varchar(10) NOT NULL,              -- local code, see lis.test_catalogue
    result_raw     varchar(40),
    units          varchar(20),
    flags          varchar(20),                       -- H, L, A, AA, comma-separated
    result_status  char(1) NOT NULL,                  -- P preliminary, F final, C corrected
    collected_date char(8) NOT NULL,                  -- YYYYMMDD
    collected_time char(4) NOT NULL                   -- HHMM
);

-- What the DBA attaching fhir-cdc adds: whole rows in the log, so that a correction arrives
-- with what it corrected (docs/operations.md).
ALTER TABLE lis.patient REPLICA IDENTITY FULL;
ALTER TABLE lis.lab_order REPLICA IDENTITY FULL;
ALTER TABLE lis.specimen REPLICA IDENTITY FULL;
ALTER TABLE lis.lab_result REPLICA IDENTITY FULL;
ALTER TABLE lis.test_catalogue REPLICA IDENTITY FULL;
ALTER TABLE lis.poc_result REPLICA IDENTITY FULL;
