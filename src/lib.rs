//! Starling: an XMPP server.
pub mod xml;
pub mod auth;
