//! Client-to-server streams: the sans-IO state machine, the TCP/TLS driver,
//! and the session-level stanza rules shared by every client transport.

pub mod connection;
pub mod csi;
pub mod machine;
pub mod session;
pub mod sm;
pub mod transport;

pub use connection::{refuse, serve, serve_transport};
pub use machine::{C2sMachine, C2sSettings};
