//! Protocol modules. Each protocol area is one module behind the [`Module`]
//! trait; the router calls the hooks in the order of [`Modules::standard`].
//! IQs are dispatched by the namespace of their payload.
//!
//! Hook order for a message from a local user to a local user:
//! `on_user_send` (sender side: blocking, carbons `sent`, archive) ->
//! routing -> `on_receive` (recipient side: blocking, archive, stanza-id) ->
//! delivery to session mailboxes -> `on_delivered` (carbons `received`), or
//! `on_undeliverable` (offline storage) when no resource can take it.

pub mod disco;
pub mod ping;
pub mod time;
pub mod version;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use jid::{BareJid, Jid};
use minidom::Element;

use crate::server::Server;
use crate::sessions::Session;
use crate::stanza::StanzaError;

/// How a broadcast presence (one without `to`) changed a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvailabilityChange {
    /// The first available presence of the session (RFC 6121 4.2).
    Initial,
    /// A later available presence (status, show or priority change).
    Update,
    /// `type='unavailable'` after being available.
    Unavailable,
}

/// Whether the next hooks (and default processing) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// An IQ request of type get or set addressed to the server or to an account
/// (bare JID), handled by the module owning its payload namespace.
pub struct IqRequest<'a> {
    pub iq: &'a Element,
    pub from: &'a Jid,
    /// The addressee: a local domain, or a local user's bare JID.
    pub to: &'a Jid,
    pub payload: &'a Element,
    pub is_set: bool,
    /// The local session the request came from, if any.
    pub session: Option<&'a Arc<Session>>,
}

impl IqRequest<'_> {
    /// Is the request about the requester's own account (to its bare JID,
    /// or to its server with no `to`)?
    pub fn is_own_account(&self) -> bool {
        self.to.node().is_some() && self.from.to_bare() == self.to.to_bare()
    }
    pub fn to_server(&self) -> bool {
        self.to.node().is_none()
    }
}

pub enum IqReply {
    /// `type='result'` with an optional payload.
    Result(Option<Element>),
    Error(StanzaError),
    /// Not for this module: try the next one.
    Unhandled,
    /// The module answered (or will answer) by itself.
    Handled,
}

#[async_trait]
pub trait Module: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// disco#info features of the server (domain JID).
    fn server_features(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// disco#info features of an account (bare JID).
    fn account_features(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Stream features offered to a client once authenticated.
    fn stream_features(&self) -> Vec<Element> {
        Vec::new()
    }
    /// Payload namespaces of the IQs this module answers.
    fn iq_namespaces(&self) -> Vec<&'static str> {
        Vec::new()
    }
    async fn handle_iq(&self, _server: &Server, _req: IqRequest<'_>) -> IqReply {
        IqReply::Unhandled
    }
    /// A local client sent a broadcast presence (no `to`) that changed its
    /// availability; the session's priority and availability are already
    /// updated. (Broadcast presences do not go through `on_user_send`.)
    async fn on_presence_broadcast(
        &self,
        _server: &Server,
        _session: &Arc<Session>,
        _change: AvailabilityChange,
        _presence: &Element,
    ) {
    }
    /// A stanza a local client sent (already `from`-stamped), before routing.
    /// Broadcast presences do not come here (see `on_presence_broadcast`).
    async fn on_user_send(
        &self,
        _server: &Server,
        _session: &Arc<Session>,
        _stanza: &mut Element,
    ) -> Flow {
        Flow::Continue
    }
    /// A stanza for local user `to`, before resources are chosen.
    async fn on_receive(&self, _server: &Server, _to: &BareJid, _stanza: &mut Element) -> Flow {
        Flow::Continue
    }
    /// A message was handed to these sessions of `to`.
    async fn on_delivered(
        &self,
        _server: &Server,
        _to: &BareJid,
        _stanza: &Element,
        _sessions: &[Arc<Session>],
    ) {
    }
    /// No resource of `to` can take this message (RFC 6121 8.5.2.2).
    /// Return Stop when it was taken care of (e.g. stored offline).
    async fn on_undeliverable(&self, _server: &Server, _to: &BareJid, _stanza: &Element) -> Flow {
        Flow::Continue
    }
    /// A resource was bound.
    async fn on_session_bound(&self, _server: &Server, _session: &Arc<Session>) {}
    /// A session ended (after its socket closed or it was replaced).
    async fn on_session_closed(&self, _server: &Server, _session: &Arc<Session>) {}
    /// Start background tasks, once, when the server starts.
    fn start(&self, _server: &Server) {}
}

/// The ordered module list, with the IQ namespace index.
pub struct Modules {
    list: Vec<Arc<dyn Module>>,
    by_ns: HashMap<&'static str, Vec<usize>>,
}

impl Modules {
    pub fn new(list: Vec<Arc<dyn Module>>) -> Self {
        let mut by_ns: HashMap<&'static str, Vec<usize>> = HashMap::new();
        for (i, m) in list.iter().enumerate() {
            for ns in m.iq_namespaces() {
                by_ns.entry(ns).or_default().push(i);
            }
        }
        Modules { list, by_ns }
    }

    /// The modules of a standard server, in hook order.
    pub fn standard(_config: &crate::config::Config) -> Self {
        Modules::new(vec![
            Arc::new(disco::Disco),
            Arc::new(ping::Ping),
            Arc::new(version::Version),
            Arc::new(time::EntityTime),
        ])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Module>> {
        self.list.iter()
    }

    /// Modules answering IQs with this payload namespace, in order.
    pub fn for_namespace(&self, ns: &str) -> impl Iterator<Item = &Arc<dyn Module>> {
        self.by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .map(|&i| &self.list[i])
    }

    pub fn server_features(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.list.iter().flat_map(|m| m.server_features()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn account_features(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self
            .list
            .iter()
            .flat_map(|m| m.account_features())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn stream_features(&self) -> Vec<Element> {
        self.list.iter().flat_map(|m| m.stream_features()).collect()
    }
}
