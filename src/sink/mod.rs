//! Where canonical events go.

pub mod kafka;
