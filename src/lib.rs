//! Starling: an XMPP server.
pub mod xml;
pub mod auth;
pub mod config;
pub mod storage;
pub mod tls;
