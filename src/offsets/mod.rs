//! Source positions and when they may be acknowledged.

mod ack;

pub use ack::AckTracker;
