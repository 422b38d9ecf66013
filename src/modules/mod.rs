//! Protocol modules. Each protocol area is one module behind the [`Module`]
//! trait; the router calls the hooks in the order of [`Modules::standard`].
//! IQs are dispatched by the namespace of their payload.
//!
//! Hook order for a message from a local user to a local user:
//! `on_user_send` (sender side: blocking, carbons `sent`, archive) ->
//! routing -> `on_receive` (recipient side: blocking, archive, stanza-id) ->
//! delivery to session mailboxes -> `on_delivered` (carbons `received`), or
//! `on_undeliverable` (offline storage) when no resource can take it.

pub mod carbons;
pub mod disco;
pub mod mam;
pub mod muc;
pub mod offline;
pub mod ping;
pub mod private;
pub mod time;
pub mod vcard;
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
    /// Return Stop when it was taken care of (e.g. stored offline); else
    /// the sender gets `service-unavailable` (headlines are dropped).
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

/// An advertised disco feature that is not the payload namespace of an IQ:
/// behaviour a module implements in its hooks.
#[derive(Debug, Clone, Copy)]
pub struct HookFeature {
    pub feature: &'static str,
    /// The module that advertises and implements it (`Module::name`).
    pub module: &'static str,
    /// The integration test proving the behaviour, as `file::test_name`.
    pub test: &'static str,
}

/// Every advertised feature must be either an IQ namespace some module
/// answers (or a `#` sub-feature of one), or listed here with its module and
/// test. [`Modules::unhandled_features`] checks it, and so do the tests in
/// `tests/disco_features.rs`: add a row when a module advertises behaviour.
pub const HOOK_FEATURES: &[HookFeature] = &[
    HookFeature {
        feature: crate::xml::ns::OFFLINE,
        module: "offline",
        test: "offline::messages_to_an_offline_user_arrive_once_in_order_with_delay",
    },
    HookFeature {
        feature: crate::xml::ns::SID,
        module: "mam",
        test: "mam::forged_stanza_ids_are_stripped",
    },
];

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
    pub fn standard(config: &crate::config::Config) -> Self {
        let mut list: Vec<Arc<dyn Module>> = vec![
            Arc::new(disco::Disco),
            Arc::new(ping::Ping),
            Arc::new(version::Version),
            Arc::new(time::EntityTime),
        ];
        // The archive comes after the modules that may stop a message
        // (blocking): it archives what is actually sent and received. Its
        // `on_user_send` removes forged stanza-ids before carbons copy the
        // message; its `on_receive` adds the stanza-id before delivery,
        // carbons `received` and offline storage.
        if config.archive.enabled {
            list.push(Arc::new(mam::Mam::new(config)));
        }
        let rest: Vec<Arc<dyn Module>> = vec![
            // After blocking and archiving (which may stop or stamp a
            // message) so that copies carry what the recipient gets.
            Arc::new(carbons::Carbons),
            Arc::new(vcard::VCard),
            Arc::new(private::PrivateStorage),
            Arc::new(muc::Muc::new()),
        ];
        list.extend(rest);
        // Last: offline delivery after the presence work of an initial
        // presence; storage only for what no other module took.
        if config.offline.max_per_user > 0 {
            list.push(Arc::new(offline::Offline));
        }
        Modules::new(list)
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

    /// Advertised features (server or account) with nothing behind them:
    /// `(module, feature)` for each feature that is neither an IQ namespace
    /// with a handler (nor a `#` sub-feature of one) nor a [`HOOK_FEATURES`]
    /// row of the module advertising it.
    pub fn unhandled_features(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        for m in &self.list {
            let mut features = m.server_features();
            features.extend(m.account_features());
            for f in features {
                let base = f.split('#').next().unwrap_or(f);
                let iq = self.by_ns.contains_key(f) || self.by_ns.contains_key(base);
                let hook = HOOK_FEATURES
                    .iter()
                    .any(|h| h.feature == f && h.module == m.name());
                if !iq && !hook {
                    out.push((m.name(), f));
                }
            }
        }
        out
    }

    pub fn stream_features(&self) -> Vec<Element> {
        self.list.iter().flat_map(|m| m.stream_features()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Advertiser(&'static str, Vec<&'static str>);

    #[async_trait]
    impl Module for Advertiser {
        fn name(&self) -> &'static str {
            self.0
        }
        fn server_features(&self) -> Vec<&'static str> {
            self.1.clone()
        }
    }

    #[test]
    fn every_standard_feature_has_a_handler() {
        let modules = Modules::standard(&crate::config::Config::default());
        assert_eq!(modules.unhandled_features(), Vec::new());
        assert!(modules.server_features().contains(&crate::xml::ns::OFFLINE));
    }

    #[test]
    fn a_feature_without_handler_is_reported() {
        let mut list: Vec<Arc<dyn Module>> = vec![Arc::new(ping::Ping)];
        list.push(Arc::new(Advertiser(
            "liar",
            vec![
                "urn:xmpp:ping",
                "urn:xmpp:ping#sub",
                "urn:example:nothing",
                "msgoffline",
            ],
        )));
        let modules = Modules::new(list);
        // The ping namespace has a handler (in another module) and so has
        // its sub-feature; msgoffline is a hook feature of another module.
        assert_eq!(
            modules.unhandled_features(),
            vec![("liar", "urn:example:nothing"), ("liar", "msgoffline")]
        );
    }

    #[test]
    fn offline_storage_can_be_switched_off() {
        let mut cfg = crate::config::Config::default();
        cfg.offline.max_per_user = 0;
        let modules = Modules::standard(&cfg);
        assert!(!modules.server_features().contains(&crate::xml::ns::OFFLINE));
        assert!(modules.iter().all(|m| m.name() != "offline"));
    }
}
