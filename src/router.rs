//! The one place that decides where a stanza goes: a local session (RFC 6121
//! section 8.5 delivery rules), the server itself (IQ dispatch to modules),
//! a local service (MUC), or a remote domain.
//!
//! Delivery guarantee: a message handed to [`Server::route`] ends up in a
//! session mailbox, in durable storage (a module's `on_undeliverable`), or
//! bounced with an error to its sender; never silently dropped (except error
//! stanzas and headlines, which RFC 6121 allows to be discarded).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jid::{BareJid, Jid};
use minidom::Element;
use tokio::sync::mpsc::error::TrySendError;

use crate::modules::{Flow, IqReply, IqRequest};
use crate::server::Server;
use crate::sessions::{Session, SessionMsg};
use crate::stanza::{self, Kind, StanzaError};
use crate::storage::AccountStore;
use crate::xml::ns;

/// How long a delivery waits for a full session mailbox before the session
/// is considered stuck.
const MAILBOX_WAIT: Duration = Duration::from_secs(3);

/// A local service with its own domain (e.g. the MUC service).
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Human-readable name for disco#items of the parent domain.
    fn label(&self) -> String;
    /// Handle a stanza addressed to the service domain or an entity in it.
    async fn handle(&self, server: &Server, stanza: Element);
}

/// Where outgoing stanzas for remote domains go (server-to-server).
#[async_trait]
pub trait RemoteRouter: Send + Sync + 'static {
    /// Take responsibility for a stanza to a remote domain (deliver, queue,
    /// or bounce it).
    async fn send(&self, server: &Server, stanza: Element);
}

/// The result of trying to put a stanza into a session mailbox.
pub enum MailboxResult {
    Queued,
    /// The session is gone or stuck; the stanza comes back.
    Failed(Element),
}

impl Server {
    /// Route a stanza (with `from` and `to` set) from any source. Errors it
    /// causes are routed back to the sender.
    pub async fn route(&self, stanza: Element) {
        let mut queue = vec![stanza];
        let mut guard = 0;
        while let Some(s) = queue.pop() {
            guard += 1;
            if guard > 64 {
                tracing::warn!("routing loop cut off");
                break;
            }
            self.route_one(s, &mut queue).await;
        }
    }

    /// Send an error reply for `original` back to its sender (never for errors).
    pub async fn bounce(&self, original: &Element, err: StanzaError) {
        if let Some(reply) = stanza::error_reply(original, &err) {
            self.route(reply).await;
        }
    }

    fn bounce_into(queue: &mut Vec<Element>, original: &Element, err: StanzaError) {
        if let Some(reply) = stanza::error_reply(original, &err) {
            queue.push(reply);
        }
    }

    async fn route_one(&self, stanza: Element, queue: &mut Vec<Element>) {
        let Some(kind) = stanza::kind(&stanza) else {
            tracing::warn!(name = stanza.name(), "not a stanza, dropped");
            return;
        };
        let to = match stanza::jid_attr(&stanza, "to") {
            Ok(Some(j)) => j,
            Ok(None) => {
                tracing::debug!("stanza without 'to' reached the router, dropped");
                return;
            }
            Err(_) => {
                Self::bounce_into(queue, &stanza, StanzaError::jid_malformed());
                return;
            }
        };
        let domain = to.domain().as_str();
        if self.config.is_local_domain(domain) {
            if to.node().is_none() {
                self.handle_for_server(kind, stanza, to, None, queue).await;
            } else {
                self.deliver_local(kind, stanza, to, queue).await;
            }
        } else if let Some(service) = self.service(domain) {
            service.handle(self, stanza).await;
        } else if let Some(remote) = self.remote_router() {
            remote.send(self, stanza).await;
        } else {
            Self::bounce_into(
                queue,
                &stanza,
                StanzaError::new("remote-server-not-found")
                    .with_text("federation is not enabled on this server"),
            );
        }
    }

    /// A stanza addressed to a local domain itself.
    async fn handle_for_server(
        &self,
        kind: Kind,
        stanza: Element,
        to: Jid,
        session: Option<&Arc<Session>>,
        queue: &mut Vec<Element>,
    ) {
        match kind {
            Kind::Iq => match stanza::stanza_type(&stanza) {
                "get" | "set" => {
                    if let Some(reply) = self.dispatch_iq(&stanza, &to, session).await {
                        queue.push(reply);
                    }
                }
                "result" | "error" => self.resolve_pending_iq(stanza),
                _ => Self::bounce_into(queue, &stanza, StanzaError::bad_request()),
            },
            Kind::Message | Kind::Presence => {
                for m in self.modules.iter() {
                    let mut s = stanza.clone();
                    if m.on_receive(self, &BareJid::from_parts(None, to.domain()), &mut s)
                        .await
                        == Flow::Stop
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Answer an IQ get/set addressed to the server or to an account on a
    /// client's behalf. Returns the reply (None if a module answers itself).
    pub async fn dispatch_iq(
        &self,
        iq: &Element,
        to: &Jid,
        session: Option<&Arc<Session>>,
    ) -> Option<Element> {
        let typ = stanza::stanza_type(iq);
        let is_set = match typ {
            "get" => false,
            "set" => true,
            _ => return None,
        };
        let from = match stanza::jid_attr(iq, "from") {
            Ok(Some(f)) => f,
            _ => return None,
        };
        let mut children = iq.children();
        let (Some(payload), None) = (children.next(), children.next()) else {
            return stanza::error_reply(iq, &StanzaError::bad_request());
        };
        let payload_ns = payload.ns();
        for m in self.modules.for_namespace(&payload_ns) {
            let req = IqRequest {
                iq,
                from: &from,
                to,
                payload,
                is_set,
                session,
            };
            match m.handle_iq(self, req).await {
                IqReply::Result(p) => return Some(stanza::iq_result(iq, p)),
                IqReply::Error(e) => return stanza::error_reply(iq, &e),
                IqReply::Handled => return None,
                IqReply::Unhandled => continue,
            }
        }
        stanza::error_reply(iq, &StanzaError::service_unavailable())
    }

    /// Does a local account exist? Online users exist without a query.
    pub async fn user_exists(&self, bare: &BareJid) -> bool {
        if self.sessions.is_online(bare) {
            return true;
        }
        let Some(node) = bare.node() else {
            return false;
        };
        match self
            .store
            .account_exists(bare.domain().as_str(), node.as_str())
            .await
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "account lookup failed");
                false
            }
        }
    }

    async fn deliver_local(
        &self,
        kind: Kind,
        mut stanza: Element,
        to: Jid,
        queue: &mut Vec<Element>,
    ) {
        let bare = to.to_bare();
        let typ = stanza::stanza_type(&stanza).to_owned();
        if !self.user_exists(&bare).await {
            // RFC 6121 8.5.1: no such user.
            match kind {
                Kind::Message if typ != "error" => {
                    Self::bounce_into(queue, &stanza, StanzaError::service_unavailable())
                }
                Kind::Iq if typ == "get" || typ == "set" => {
                    Self::bounce_into(queue, &stanza, StanzaError::service_unavailable())
                }
                _ => {}
            }
            return;
        }
        for m in self.modules.iter() {
            if m.on_receive(self, &bare, &mut stanza).await == Flow::Stop {
                return;
            }
        }
        match kind {
            Kind::Message => self.deliver_message(stanza, to, &bare, &typ, queue).await,
            Kind::Presence => {
                let targets = match to.try_as_full() {
                    Ok(full) => self.sessions.get(full).into_iter().collect(),
                    Err(_) => self.sessions.available(&bare),
                };
                for s in targets {
                    let mut copy = stanza.clone();
                    if to.is_bare() {
                        stanza::set_attr(&mut copy, "to", s.jid.to_string());
                    }
                    self.send_to_session(&s, copy).await;
                }
            }
            Kind::Iq => match to.try_as_full() {
                Ok(full) => match self.sessions.get(full) {
                    Some(s) => {
                        if let MailboxResult::Failed(back) = self.send_to_session(&s, stanza).await
                            && (typ == "get" || typ == "set")
                        {
                            Self::bounce_into(queue, &back, StanzaError::service_unavailable());
                        }
                    }
                    None => {
                        if typ == "get" || typ == "set" {
                            Self::bounce_into(queue, &stanza, StanzaError::service_unavailable());
                        }
                    }
                },
                Err(_) => {
                    if (typ == "get" || typ == "set")
                        && let Some(reply) = self.dispatch_iq(&stanza, &to, None).await
                    {
                        queue.push(reply);
                    }
                    // results and errors to a bare JID are ignored (RFC 6121 8.5.2.1.3)
                }
            },
        }
    }

    async fn deliver_message(
        &self,
        stanza: Element,
        to: Jid,
        bare: &BareJid,
        typ: &str,
        queue: &mut Vec<Element>,
    ) {
        // To a connected full JID: that resource (RFC 6121 8.5.3.1).
        if let Ok(full) = to.try_as_full() {
            if let Some(s) = self.sessions.get(full) {
                if let MailboxResult::Queued = self.send_to_session(&s, stanza.clone()).await {
                    self.after_delivery(bare, &stanza, &[s]).await;
                    return;
                }
                // The session is gone or stuck: the bare-JID rules apply.
            } else if typ == "groupchat" {
                Self::bounce_into(queue, &stanza, StanzaError::service_unavailable());
                return;
            }
        }
        self.deliver_message_bare(stanza, bare, typ, queue).await
    }

    async fn deliver_message_bare(
        &self,
        stanza: Element,
        bare: &BareJid,
        typ: &str,
        queue: &mut Vec<Element>,
    ) {
        match typ {
            "error" => {
                // Errors to an unavailable resource are dropped; to a bare
                // JID they go to the available resources like headlines.
                for s in self.sessions.nonnegative_available(bare) {
                    self.send_to_session(&s, stanza.clone()).await;
                }
            }
            "groupchat" => Self::bounce_into(queue, &stanza, StanzaError::service_unavailable()),
            "headline" => {
                let targets = self.sessions.nonnegative_available(bare);
                if targets.is_empty() {
                    // Dropped (RFC 6121 8.5.2.2.1) unless a module keeps
                    // it (a `<store/>` hint, XEP-0334).
                    for m in self.modules.iter() {
                        if m.on_undeliverable(self, bare, &stanza).await == Flow::Stop {
                            break;
                        }
                    }
                }
                for s in targets {
                    self.send_to_session(&s, stanza.clone()).await;
                }
            }
            _ => {
                let targets = self.sessions.message_targets(bare);
                let mut delivered = Vec::with_capacity(targets.len());
                for s in targets {
                    if let MailboxResult::Queued = self.send_to_session(&s, stanza.clone()).await {
                        delivered.push(s);
                    }
                }
                if delivered.is_empty() {
                    self.undeliverable(stanza, bare, queue).await;
                } else {
                    self.after_delivery(bare, &stanza, &delivered).await;
                }
            }
        }
    }

    /// Modules see the delivered message (e.g. carbons `received`).
    async fn after_delivery(&self, bare: &BareJid, stanza: &Element, sessions: &[Arc<Session>]) {
        for m in self.modules.iter() {
            m.on_delivered(self, bare, stanza, sessions).await;
        }
    }

    /// No resource can take a message: offline storage (a module), or
    /// `service-unavailable` back to the sender (RFC 6121 8.5.2.2.1).
    pub async fn undeliverable(&self, stanza: Element, bare: &BareJid, queue: &mut Vec<Element>) {
        for m in self.modules.iter() {
            if m.on_undeliverable(self, bare, &stanza).await == Flow::Stop {
                return;
            }
        }
        Self::bounce_into(queue, &stanza, StanzaError::service_unavailable());
    }

    /// Put a stanza into a session's mailbox, waiting briefly when it is
    /// full. A session that stays full is told to close (policy-violation)
    /// and the stanza comes back to the caller.
    pub async fn send_to_session(&self, session: &Arc<Session>, stanza: Element) -> MailboxResult {
        if session.closing.load(std::sync::atomic::Ordering::Relaxed) {
            return MailboxResult::Failed(stanza);
        }
        let back = match session.tx.try_send(SessionMsg::Stanza(stanza)) {
            Ok(()) => return MailboxResult::Queued,
            Err(TrySendError::Closed(m)) => m,
            Err(TrySendError::Full(m)) => match session.tx.send_timeout(m, MAILBOX_WAIT).await {
                Ok(()) => return MailboxResult::Queued,
                Err(e) => {
                    tracing::warn!(jid = %session.jid, "session mailbox stuck; closing it");
                    session
                        .closing
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    session.kill.cancel();
                    e.into_inner()
                }
            },
        };
        match back {
            SessionMsg::Stanza(s) => MailboxResult::Failed(s),
            // Only stanzas are sent above.
            SessionMsg::Close { .. } => MailboxResult::Failed(Element::bare("message", ns::CLIENT)),
        }
    }
}
