-- The bedside device gateway's table: PostgreSQL, schema gateway. One row per reading.

CREATE SCHEMA IF NOT EXISTS gateway;

CREATE TABLE gateway.vital_reading (
    reading_id   bigserial PRIMARY KEY,
    device_id    varchar(30) NOT NULL,
    bed          varchar(10) NOT NULL,
    mrn          char(10),                            -- NULL until the device is associated
    metric       varchar(10) NOT NULL,                -- HR, SPO2, RR, TEMP, SBP, DBP
    value        numeric(8,2) NOT NULL,
    unit         varchar(10) NOT NULL,
    quality      char(1) NOT NULL DEFAULT 'G',        -- G good, Q questionable, A artifact
    measured_at  timestamptz NOT NULL
);
