//! Where canonical events go: Kafka's producer and admin clients ([`kafka`]), and the
//! window of messages in flight whose acknowledgements make source positions safe
//! ([`window`]).

pub mod kafka;
pub mod window;
