//! Client-to-server streams: the sans-IO state machine, the TCP/TLS driver,
//! and the session-level stanza rules shared by every client transport.

pub mod connection;
pub mod machine;
pub mod session;

pub use connection::{refuse, serve};
pub use machine::{C2sMachine, C2sSettings};
