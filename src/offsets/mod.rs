//! Source positions, when they may be acknowledged, and the connector's own state.

mod ack;
mod state;
mod store;

pub use ack::AckTracker;
pub use state::{ConnectorState, SnapshotRequest, TableProgress};
pub use store::{RunningMappings, StateError, StateStore};
