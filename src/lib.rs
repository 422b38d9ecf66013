//! Starling: an XMPP server.
//!
//! [`server::Server::start`] runs the whole server in-process; `starling
//! serve` (src/main.rs) and the integration tests both use it.

pub mod auth;
pub mod bench;
pub mod c2s;
pub mod client;
pub mod config;
pub mod modules;
pub mod router;
pub mod s2s;
pub mod server;
pub mod sessions;
pub mod stanza;
pub mod storage;
pub mod stream;
pub mod tls;
pub mod xml;
