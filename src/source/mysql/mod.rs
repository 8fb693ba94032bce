//! MySQL and MariaDB: the row-based binary log.

pub mod preflight;
