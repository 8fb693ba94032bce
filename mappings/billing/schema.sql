-- The legacy billing system these mappings read: MySQL / MariaDB, database `billing`.
-- Charges are never updated in place once billed: a reversal is a new row pointing at the
-- charge it cancels, and the original row's status changes to R. Claims are resubmitted as
-- new rows that replace an earlier claim (frequency code 7) or void it (8). Text is latin1,
-- as the system was set up in 2003, and a claim's last service date is the zero date until the
-- claim is closed (the server runs with a lax sql_mode).

CREATE DATABASE IF NOT EXISTS billing;

CREATE TABLE billing.charge (
    charge_id      BIGINT PRIMARY KEY,
    version        INT NOT NULL DEFAULT 1,            -- bumped by every change of the row
    account_no     VARCHAR(20) NOT NULL,
    mrn            CHAR(10) NOT NULL,
    encounter_no   VARCHAR(20),
    cpt_code       VARCHAR(5) NOT NULL,
    description    VARCHAR(200) CHARACTER SET latin1,
    quantity       INT NOT NULL DEFAULT 1,
    amount         DECIMAL(12,2) NOT NULL,            -- negative on reversals
    status         CHAR(1) NOT NULL,                  -- P pending, B billed, R reversed, V void
    reversal_of    BIGINT NULL,                       -- the charge this row reverses
    service_date   DATE NOT NULL,
    posted_at      DATETIME(3) NOT NULL,              -- local time
    updated_by     VARCHAR(8) NULL                    -- clerk's initials, not mapped
);

CREATE TABLE billing.claim (
    claim_id        BIGINT PRIMARY KEY,
    claim_no        VARCHAR(20) NOT NULL,
    mrn             CHAR(10) NOT NULL,
    payer_id        VARCHAR(10) NOT NULL,
    billing_npi     VARCHAR(10) NOT NULL,
    frequency_code  CHAR(1) NOT NULL,                 -- 1 original, 7 replacement, 8 void
    replaces_claim  VARCHAR(20) NULL,                 -- claim_no of the claim this one corrects
    status          CHAR(1) NOT NULL,                 -- D draft, S submitted, X cancelled
    total           DECIMAL(12,2) NOT NULL,
    service_from    DATE NOT NULL,
    service_to      DATE NOT NULL DEFAULT '0000-00-00', -- zero while the claim is open
    created_at      DATETIME NOT NULL                 -- local time
);

-- Not the billing system's: the connector's signal table (signal.data.collection in
-- connectors/billing-mysql.toml). `fhir-cdc snapshot` asks the connector to read rows again
-- by inserting a row here (Debezium's layout). The connector only reads it in the binary
-- log, and it may be emptied at any time.
CREATE TABLE billing.fhir_cdc_signal (
    id    VARCHAR(64) PRIMARY KEY,
    type  VARCHAR(32) NOT NULL,
    data  TEXT NULL
);
