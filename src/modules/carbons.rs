//! Message Carbons (XEP-0280): copies of a user's messages to their other
//! resources that enabled carbons, wrapped as XEP-0297 forwarded messages.
//!
//! - `sent` copies (`on_user_send`): a message a resource sends goes, as a
//!   copy, to every other carbons-enabled resource of the sender.
//! - `received` copies (`on_delivered`): a message delivered to some
//!   resources of the recipient goes, as a copy, to the recipient's other
//!   carbons-enabled resources.
//!
//! Which messages are copied follows section 6 of the XEP; `<private/>`
//! (urn:xmpp:carbons:2) and the `<no-copy/>` hint (XEP-0334) stop copies on
//! both sides. `<private/>` is left in the delivered message: XEP-0280
//! (1.0.1, section 9) lifted the requirement to strip it, because stripping
//! lets a sender silently hide that a message was not copied.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use jid::{BareJid, Jid};
use minidom::Element;

use super::offline::CHATSTATES;
use super::{Flow, IqReply, IqRequest, Module};
use crate::server::Server;
use crate::sessions::Session;
use crate::stanza::{self, StanzaError};
use crate::xml::ns;

/// XEP-0249 direct MUC invitations.
pub const CONFERENCE: &str = "jabber:x:conference";

/// Which side of the conversation a copy is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The user sent the message (`<sent/>` copies).
    Sent,
    /// The user received the message (`<received/>` copies).
    Received,
}

/// Payloads typically used in instant messaging (XEP-0184 receipts,
/// XEP-0085 chat states, XEP-0333 chat markers).
fn has_im_payload(msg: &Element) -> bool {
    msg.children().any(|c| {
        let n = c.ns();
        n == ns::RECEIPTS || n == CHATSTATES || n == ns::CHAT_MARKERS
    })
}

/// XEP-0280 section 6.1: is this message copied to other resources?
pub fn eligible(msg: &Element, direction: Direction) -> bool {
    if msg.name() != "message" {
        return false;
    }
    if msg.has_child("private", ns::CARBONS) || msg.has_child("no-copy", ns::HINTS) {
        return false;
    }
    // Never copy a copy.
    if msg.has_child("sent", ns::CARBONS) || msg.has_child("received", ns::CARBONS) {
        return false;
    }
    let typ = stanza::stanza_type(msg);
    if typ == "groupchat" {
        return false;
    }
    // XEP-0249 direct and XEP-0045 mediated invitations.
    if msg.has_child("x", CONFERENCE) {
        return true;
    }
    if let Some(x) = msg.get_child("x", ns::MUC_USER) {
        if x.has_child("invite", ns::MUC_USER) {
            return true;
        }
        // A private message from a room occupant: the room already sends it
        // to every joined resource.
        if direction == Direction::Received {
            return false;
        }
    }
    match typ {
        "chat" => true,
        // Errors in answer to an eligible message: the error reply carries
        // the original payload (RFC 6120 8.3.1), so judge that.
        "error" | "normal" => msg.has_child("body", ns::CLIENT) || has_im_payload(msg),
        "headline" => has_im_payload(msg),
        // Unknown types are treated as normal (RFC 6121 5.2.2).
        _ => msg.has_child("body", ns::CLIENT) || has_im_payload(msg),
    }
}

/// The forwarded copy of `msg` for `to`, from the user's bare JID.
pub fn wrap(msg: &Element, user: &BareJid, to: &str, direction: Direction) -> Element {
    let wrapper_name = match direction {
        Direction::Sent => "sent",
        Direction::Received => "received",
    };
    let forwarded = Element::builder("forwarded", ns::FORWARD)
        .append(msg.clone())
        .build();
    let mut b = Element::builder("message", ns::CLIENT)
        .attr(stanza::name("from"), user.to_string())
        .attr(stanza::name("to"), to);
    if let Some(t) = msg.attr("type") {
        b = b.attr(stanza::name("type"), t);
    }
    b.append(
        Element::builder(wrapper_name, ns::CARBONS)
            .append(forwarded)
            .build(),
    )
    .build()
}

/// Send copies of `msg` to the carbons-enabled sessions of `user` that
/// `skip` does not exclude. A copy that cannot be queued is dropped, never
/// bounced (XEP-0280 section 11.3).
async fn copy_to(
    server: &Server,
    user: &BareJid,
    msg: &Element,
    direction: Direction,
    skip: impl Fn(&Session) -> bool,
) {
    for s in server.sessions.resources(user) {
        if !s.carbons_enabled() || skip(&s) {
            continue;
        }
        let copy = wrap(msg, user, &s.jid.to_string(), direction);
        if let crate::router::MailboxResult::Failed(_) = server.send_to_session(&s, copy).await {
            tracing::debug!(jid = %s.jid, "carbon copy not delivered");
        }
    }
}

pub struct Carbons;

#[async_trait]
impl Module for Carbons {
    fn name(&self) -> &'static str {
        "carbons"
    }

    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::CARBONS]
    }

    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::CARBONS]
    }

    async fn handle_iq(&self, _server: &Server, req: IqRequest<'_>) -> IqReply {
        // Only a local session may switch its own carbons (section 3).
        let Some(session) = req.session else {
            return IqReply::Error(StanzaError::not_allowed());
        };
        let own =
            req.is_own_account() || (req.to_server() && req.to.domain() == session.jid.domain());
        if !own {
            return IqReply::Error(StanzaError::not_allowed());
        }
        if !req.is_set {
            return IqReply::Error(
                StanzaError::bad_request().with_text("carbons are enabled or disabled with a set"),
            );
        }
        let enable = match req.payload.name() {
            "enable" => true,
            "disable" => false,
            _ => return IqReply::Error(StanzaError::bad_request()),
        };
        // Repeated enables or disables are not errors (section 10.1).
        session.carbons.store(enable, Ordering::Relaxed);
        tracing::debug!(jid = %session.jid, enable, "carbons");
        IqReply::Result(None)
    }

    async fn on_user_send(
        &self,
        server: &Server,
        session: &Arc<Session>,
        stanza: &mut Element,
    ) -> Flow {
        if stanza.name() != "message" || !eligible(stanza, Direction::Sent) {
            return Flow::Continue;
        }
        let user = session.bare();
        // A message to one's own account is copied as `received` on
        // delivery; a `sent` copy on top would duplicate it.
        let to_self = match stanza::jid_attr(stanza, "to") {
            Ok(Some(to)) => to.to_bare() == user,
            Ok(None) => true,
            Err(_) => return Flow::Continue,
        };
        if !to_self {
            let me = session.id;
            copy_to(server, &user, stanza, Direction::Sent, |s| s.id == me).await;
        }
        Flow::Continue
    }

    /// No resource took the message (only negative priorities, or none
    /// available): carbons-enabled resources still get a `received` copy
    /// (none of them received it), and offline storage keeps it for the next
    /// login.
    async fn on_undeliverable(&self, server: &Server, to: &BareJid, stanza: &Element) -> Flow {
        if eligible(stanza, Direction::Received) {
            self.on_delivered(server, to, stanza, &[]).await;
        }
        Flow::Continue
    }

    async fn on_delivered(
        &self,
        server: &Server,
        to: &BareJid,
        stanza: &Element,
        sessions: &[Arc<Session>],
    ) {
        if !eligible(stanza, Direction::Received) {
            return;
        }
        let sender: Option<Jid> = stanza::jid_attr(stanza, "from").ok().flatten();
        copy_to(server, to, stanza, Direction::Received, |s| {
            sessions.iter().any(|d| d.id == s.id)
                // A message to oneself: not back to the resource that sent it.
                || sender.as_ref().is_some_and(|f| f.to_string() == s.jid.to_string())
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::*;

    fn msg(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn eligibility_follows_section_6() {
        let cases = [
            ("<message xmlns='jabber:client' type='chat'/>", true, true),
            (
                "<message xmlns='jabber:client'><body>b</body></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client' type='normal'/>",
                false,
                false,
            ),
            (
                "<message xmlns='jabber:client' type='normal'><received xmlns='urn:xmpp:receipts' id='x'/></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client'><displayed xmlns='urn:xmpp:chat-markers:0' id='x'/></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client' type='headline'><body>news</body></message>",
                false,
                false,
            ),
            (
                "<message xmlns='jabber:client' type='headline'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client' type='groupchat'><body>b</body></message>",
                false,
                false,
            ),
            (
                "<message xmlns='jabber:client' type='error'><body>b</body><error type='cancel'/></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client' type='error'><error type='cancel'/></message>",
                false,
                false,
            ),
            (
                "<message xmlns='jabber:client' type='chat'><body>b</body><private xmlns='urn:xmpp:carbons:2'/></message>",
                false,
                false,
            ),
            (
                "<message xmlns='jabber:client' type='chat'><body>b</body><no-copy xmlns='urn:xmpp:hints'/></message>",
                false,
                false,
            ),
            // MUC private messages: copied when sent, not when received.
            (
                "<message xmlns='jabber:client' type='chat'><body>b</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
                true,
                false,
            ),
            // Invitations, direct and mediated.
            (
                "<message xmlns='jabber:client'><x xmlns='jabber:x:conference' jid='r@muc.x'/></message>",
                true,
                true,
            ),
            (
                "<message xmlns='jabber:client'><x xmlns='http://jabber.org/protocol/muc#user'><invite from='a@x'/></x></message>",
                true,
                true,
            ),
            // Copies are never copied again.
            (
                "<message xmlns='jabber:client' type='chat'><received xmlns='urn:xmpp:carbons:2'/></message>",
                false,
                false,
            ),
            ("<presence xmlns='jabber:client'/>", false, false),
        ];
        for (xml, sent, received) in cases {
            let m = msg(xml);
            assert_eq!(eligible(&m, Sent), sent, "sent: {xml}");
            assert_eq!(eligible(&m, Received), received, "received: {xml}");
        }
    }

    #[test]
    fn copies_are_wrapped_per_xep_0297() {
        let m = msg(
            "<message xmlns='jabber:client' from='j@c/b' to='r@m/g' type='chat' id='7'><body>hi</body></message>",
        );
        let user = BareJid::new("r@m").unwrap();
        let c = wrap(&m, &user, "r@m/home", Received);
        assert_eq!(c.attr("from"), Some("r@m"));
        assert_eq!(c.attr("to"), Some("r@m/home"));
        assert_eq!(c.attr("type"), Some("chat"));
        let inner = c
            .get_child("received", ns::CARBONS)
            .and_then(|r| r.get_child("forwarded", ns::FORWARD))
            .and_then(|f| f.get_child("message", ns::CLIENT))
            .unwrap();
        assert_eq!(inner, &m);
        let text = crate::xml::writer::to_string(&c);
        assert!(
            text.contains("<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'"),
            "{text}"
        );
        let untyped = wrap(
            &msg("<message xmlns='jabber:client'><body>x</body></message>"),
            &user,
            "r@m/a",
            Sent,
        );
        assert_eq!(untyped.attr("type"), None);
        assert!(untyped.has_child("sent", ns::CARBONS));
    }
}
