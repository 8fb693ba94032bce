//! Where a consumer job's outputs go, each committing a batch with its input offsets as one
//! unit (see `super::runtime::Target`).

pub mod memory;
pub mod postgres;
