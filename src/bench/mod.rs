//! The load generator behind `starling-bench` (src/bin/starling-bench.rs):
//! real XMPP clients over TLS (STARTTLS, SCRAM with a client-side key
//! cache, bind, stream management, presence, messages) that measure a
//! server from the outside, so that Starling, Prosody and ejabberd are
//! measured the same way. Scenarios: login storm, idle memory, one-to-one
//! messaging at stepped rates, room fan-out. See docs/benchmarks.md.
//!
//! Everything here is bounded in count and time, and meant for loopback.

pub mod conn;
pub mod fleet;
pub mod login;
pub mod messaging;
pub mod muc;
pub mod report;
pub mod stats;
pub mod users;
