//! What the server does with a stanza a bound client sent: the session-level
//! rules of RFC 6120 section 10 (no `to` means the account, IQs to the
//! account or server are answered by modules) before general routing. Shared
//! by every client transport (TCP, WebSocket).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use jid::Jid;
use minidom::Element;

use crate::modules::{AvailabilityChange, Flow};
use crate::server::Server;
use crate::sessions::Session;
use crate::stanza::{self, Kind};
use crate::xml::ns;

/// The priority of an available presence (RFC 6121 4.7.2.3): -128..=127,
/// 0 when absent or invalid.
pub fn presence_priority(p: &Element) -> i32 {
    p.get_child("priority", ns::CLIENT)
        .and_then(|e| e.text().trim().parse::<i32>().ok())
        .filter(|v| (-128..=127).contains(v))
        .unwrap_or(0)
}

/// Record the availability a broadcast presence (no `to`) announces, and
/// say what changed.
pub fn update_availability(session: &Session, presence: &Element) -> Option<AvailabilityChange> {
    match presence.attr("type") {
        None => {
            session
                .priority
                .store(presence_priority(presence), Ordering::Relaxed);
            *session.presence.lock().unwrap_or_else(|p| p.into_inner()) = Some(presence.clone());
            let was = session.available.swap(true, Ordering::Relaxed);
            Some(if was {
                AvailabilityChange::Update
            } else {
                AvailabilityChange::Initial
            })
        }
        Some("unavailable") => {
            let was = session.available.swap(false, Ordering::Relaxed);
            *session.presence.lock().unwrap_or_else(|p| p.into_inner()) = None;
            was.then_some(AvailabilityChange::Unavailable)
        }
        _ => None,
    }
}

impl Server {
    /// Process a validated, `from`-stamped stanza from a bound client.
    pub async fn handle_client_stanza(&self, session: &Arc<Session>, mut stanza: Element) {
        let Some(kind) = stanza::kind(&stanza) else {
            return;
        };
        let to = stanza.attr("to").and_then(|t| Jid::new(t).ok());
        if kind == Kind::Presence && to.is_none() {
            // A broadcast presence: the availability changes here, and the
            // modules (roster/presence, offline) act on the change.
            if let Some(change) = update_availability(session, &stanza) {
                for m in self.modules.iter() {
                    m.on_presence_broadcast(self, session, change, &stanza)
                        .await;
                }
            }
            return;
        }
        for m in self.modules.iter() {
            if m.on_user_send(self, session, &mut stanza).await == Flow::Stop {
                return;
            }
        }
        let own_bare = session.jid.to_bare();
        match kind {
            Kind::Iq => {
                let typ = stanza::stanza_type(&stanza).to_owned();
                // RFC 6120 10.3.3 / 10.5.3: no `to`, the account itself, or
                // the server: the server answers.
                let target: Option<Jid> = match &to {
                    None => Some(Jid::from(own_bare.clone())),
                    Some(j) if j.is_bare() && j.to_bare() == own_bare => Some(j.clone()),
                    Some(j)
                        if j.node().is_none()
                            && self.config.is_local_domain(j.domain().as_str()) =>
                    {
                        Some(j.clone())
                    }
                    _ => None,
                };
                match (target, typ.as_str()) {
                    (Some(t), "get" | "set") => {
                        if let Some(reply) = self.dispatch_iq(&stanza, &t, Some(session)).await {
                            self.route_reply_to_session(session, reply).await;
                        }
                    }
                    (Some(_), _) => self.resolve_pending_iq(stanza),
                    (None, _) => self.route(stanza).await,
                }
            }
            Kind::Message => {
                if to.is_none() {
                    stanza::set_attr(&mut stanza, "to", own_bare.to_string());
                }
                self.route(stanza).await;
            }
            Kind::Presence => {
                if to.is_some() {
                    self.route(stanza).await;
                }
            }
        }
    }

    /// Deliver a reply generated for a session straight back to it.
    async fn route_reply_to_session(&self, session: &Arc<Session>, reply: Element) {
        if reply.attr("to") == Some(session.jid.to_string().as_str()) {
            if let crate::router::MailboxResult::Failed(r) =
                self.send_to_session(session, reply).await
            {
                tracing::debug!(id = ?r.attr("id"), "reply to a closed session dropped");
            }
        } else {
            self.route(reply).await;
        }
    }
}
