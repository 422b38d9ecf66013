//! Offline messages (XEP-0160) with delayed-delivery stamps (XEP-0203) and
//! the storage hints of XEP-0334.
//!
//! A message no resource can take (`on_undeliverable`) is stored in the
//! database before the hook returns, so it survives a restart or a crash. At
//! the owner's next available presence with a non-negative priority the
//! stored messages are handed to that session in order, and only the ones
//! handed over are deleted. [`store_offline`] is the same path for other
//! modules (stream management hands over the unacknowledged messages of
//! sessions that expired).

use std::sync::Arc;

use async_trait::async_trait;
use jid::BareJid;
use minidom::Element;
use tokio::sync::Mutex;

use super::{AvailabilityChange, Flow, Module};
use crate::router::MailboxResult;
use crate::server::Server;
use crate::sessions::Session;
use crate::stanza::{self, StanzaError};
use crate::storage::{OfflineStore, now_micros};
use crate::xml::{ns, writer};

/// Chat state notifications (XEP-0085).
pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

/// Messages read from the store per round trip while delivering.
const PAGE: i64 = 100;

/// Per-user serialisation of store and delivery, so that two sessions
/// becoming available at once cannot both deliver the same messages, and a
/// message stored while a session becomes available is not left behind.
/// Striped: a fixed number of locks, whatever the number of users.
static LOCKS: [Mutex<()>; 64] = [const { Mutex::const_new(()) }; 64];

fn lock_for(bare: &BareJid) -> &'static Mutex<()> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bare.hash(&mut h);
    &LOCKS[(h.finish() % LOCKS.len() as u64) as usize]
}

/// What offline storage does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storability {
    /// Store it.
    Store,
    /// Not stored; the sender should get `service-unavailable` (RFC 6121
    /// 8.5.2.2.1), e.g. a message carrying the `<no-store/>` hint.
    Refuse,
    /// Not stored and not worth an error: errors, pure chat states,
    /// headlines and groupchat messages (an error to a room can get the
    /// user kicked), copies generated for a session (carbons, archive
    /// results).
    Discard,
}

/// Children that carry nothing worth storing on their own.
fn is_ephemeral(child: &Element) -> bool {
    let n = child.ns();
    n == CHATSTATES
        || n == ns::HINTS
        || n == ns::SID
        || n == ns::DELAY
        || n == ns::CARBONS
        || ((n == ns::CLIENT || n == ns::SERVER) && child.name() == "thread")
}

/// XEP-0160 section 3 and XEP-0334: which messages are stored.
pub fn storability(msg: &Element) -> Storability {
    if msg.name() != "message" {
        return Storability::Discard;
    }
    let typ = stanza::stanza_type(msg);
    if typ == "error" {
        // Hints in errors are ignored (XEP-0334 section 5).
        return Storability::Discard;
    }
    // Copies made for a session: never stored on their own.
    if msg.has_child("sent", ns::CARBONS)
        || msg.has_child("received", ns::CARBONS)
        || msg
            .children()
            .any(|c| c.name() == "result" && c.ns().starts_with("urn:xmpp:mam:"))
    {
        return Storability::Discard;
    }
    if typ == "groupchat" {
        return Storability::Discard;
    }
    if msg.has_child("no-store", ns::HINTS) {
        return Storability::Refuse;
    }
    if msg.has_child("store", ns::HINTS) {
        return Storability::Store;
    }
    if typ == "headline" {
        return Storability::Discard;
    }
    // chat, normal (and unknown types, which RFC 6121 5.2.2 treats as
    // normal): stored if they carry a body or any other payload than chat
    // states (receipts, markers, encrypted payloads, ...).
    if msg.children().any(|c| !is_ephemeral(c)) {
        Storability::Store
    } else {
        Storability::Discard
    }
}

/// The result of [`store_offline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineOutcome {
    /// Committed to the database.
    Stored,
    /// Not for offline storage, and to be dropped quietly.
    Discarded,
    /// Not for offline storage: bounce with `service-unavailable`.
    Refused,
    /// The user's offline queue is full.
    Full,
    /// The database failed.
    Failed,
}

/// The stored form: the message with a XEP-0203 delay stamp from the
/// user's server (unless it carries one from that server already, e.g.
/// when it was stored before).
fn stamped(msg: &Element, domain: &str, now: i64) -> Element {
    let mut m = msg.clone();
    let stamped_here = m
        .children()
        .any(|c| c.is("delay", ns::DELAY) && c.attr("from") == Some(domain));
    if !stamped_here {
        m.append_child(
            Element::builder("delay", ns::DELAY)
                .attr(stanza::name("from"), domain)
                .attr(stanza::name("stamp"), stanza::format_timestamp(now))
                .append("Offline Storage")
                .build(),
        );
    }
    m
}

/// Store a message for `bare` as `on_undeliverable` does: applies the
/// storage rules, the per-user limit, adds the delay stamp, and returns
/// once the row is committed. When the user has meanwhile become available,
/// the queue is delivered at once. Sends no error: the caller decides
/// (see [`OfflineOutcome`]).
pub async fn store_offline(server: &Server, bare: &BareJid, msg: &Element) -> OfflineOutcome {
    let max = server.config.offline.max_per_user;
    if max == 0 {
        return OfflineOutcome::Refused;
    }
    match storability(msg) {
        Storability::Store => {}
        Storability::Refuse => return OfflineOutcome::Refused,
        Storability::Discard => return OfflineOutcome::Discarded,
    }
    let now = now_micros();
    let xml = writer::serialize(&stamped(msg, bare.domain().as_str(), now));
    let Ok(xml) = String::from_utf8(xml) else {
        tracing::error!(to = %bare, "serialised message is not UTF-8; not stored");
        return OfflineOutcome::Failed;
    };
    let owner = bare.to_string();
    let _guard = lock_for(bare).lock().await;
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    match server.store.push_offline(&owner, now, &xml, max).await {
        Ok(Some(id)) => {
            tracing::debug!(to = %bare, id, "message stored offline");
        }
        Ok(None) => {
            tracing::info!(to = %bare, max, "offline queue full; message refused");
            return OfflineOutcome::Full;
        }
        Err(e) => {
            tracing::error!(to = %bare, error = %e, "storing an offline message failed");
            return OfflineOutcome::Failed;
        }
    }
    // The user may have become available between the routing decision and
    // the commit: then their delivery already ran, so deliver now.
    if let Some(target) = server.sessions.message_targets(bare).into_iter().next() {
        deliver_locked(server, bare, &target).await;
    }
    OfflineOutcome::Stored
}

/// Hand the stored messages of the session's user to the session, oldest
/// first, deleting each page's handed-over messages. Stops (keeping the
/// rest stored) when the session cannot take more. Returns how many were
/// handed over.
pub async fn deliver_offline(server: &Server, session: &Arc<Session>) -> usize {
    let bare = session.bare();
    let _guard = lock_for(&bare).lock().await;
    deliver_locked(server, &bare, session).await
}

async fn deliver_locked(server: &Server, bare: &BareJid, session: &Arc<Session>) -> usize {
    let owner = bare.to_string();
    let mut after = 0;
    let mut total = 0;
    loop {
        let page = match server.store.offline_page(&owner, after, PAGE).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(user = %bare, error = %e, "reading offline messages failed");
                return total;
            }
        };
        let full_page = page.len() as i64 == PAGE;
        let mut done = Vec::with_capacity(page.len());
        let mut stopped = false;
        for m in page {
            after = m.id;
            let el = match m.xml.parse::<Element>() {
                Ok(el) => el,
                Err(e) => {
                    // It can never be delivered: drop it rather than block
                    // the queue behind it forever.
                    tracing::error!(user = %bare, id = m.id, error = %e, "stored offline message is not XML; dropped");
                    done.push(m.id);
                    continue;
                }
            };
            match server.send_to_session(session, el).await {
                MailboxResult::Queued => {
                    done.push(m.id);
                    total += 1;
                }
                MailboxResult::Failed(_) => {
                    stopped = true;
                    break;
                }
            }
        }
        if let Err(e) = server.store.delete_offline(&owner, &done).await {
            // They were handed over; they may come again at the next login.
            tracing::error!(user = %bare, error = %e, "deleting delivered offline messages failed");
            return total;
        }
        if stopped || !full_page {
            break;
        }
    }
    if total > 0 {
        tracing::debug!(jid = %session.jid, count = total, "offline messages delivered");
    }
    total
}

/// The module: stores on `on_undeliverable`, delivers on available
/// presence, advertises `msgoffline`.
pub struct Offline;

#[async_trait]
impl Module for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }

    fn server_features(&self) -> Vec<&'static str> {
        vec![ns::OFFLINE]
    }

    async fn on_undeliverable(&self, server: &Server, to: &BareJid, stanza: &Element) -> Flow {
        match store_offline(server, to, stanza).await {
            OfflineOutcome::Stored | OfflineOutcome::Discarded => Flow::Stop,
            OfflineOutcome::Refused => Flow::Continue,
            OfflineOutcome::Full => {
                server
                    .bounce(
                        stanza,
                        StanzaError::service_unavailable().with_text(format!(
                            "{to} is offline and their offline message storage is full"
                        )),
                    )
                    .await;
                Flow::Stop
            }
            OfflineOutcome::Failed => {
                server
                    .bounce(
                        stanza,
                        StanzaError::internal()
                            .with_text("the message could not be stored for the offline recipient"),
                    )
                    .await;
                Flow::Stop
            }
        }
    }

    async fn on_presence_broadcast(
        &self,
        server: &Server,
        session: &Arc<Session>,
        change: AvailabilityChange,
        _presence: &Element,
    ) {
        // XEP-0160: at the next available presence with a non-negative
        // priority (also when an available session raises a negative
        // priority to a non-negative one).
        //
        // In a task of its own: this hook runs in the session's task, which
        // is also what drains the session's mailbox, so delivering more
        // messages than the mailbox holds from here would stall it.
        if matches!(
            change,
            AvailabilityChange::Initial | AvailabilityChange::Update
        ) && session.priority() >= 0
        {
            let server2 = server.clone();
            let session = session.clone();
            server.tasks.spawn(async move {
                deliver_offline(&server2, &session).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn storage_rules_follow_xep_0160_and_hints() {
        use Storability::*;
        let cases = [
            (
                "<message xmlns='jabber:client' type='chat'><body>x</body></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client'><body>x</body></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client' type='bogus'><body>x</body></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client' type='normal'><subject>s</subject></message>",
                Store,
            ),
            // Only chat states (and a thread): not stored, not bounced.
            (
                "<message xmlns='jabber:client' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/><thread>t</thread></message>",
                Discard,
            ),
            ("<message xmlns='jabber:client' type='chat'/>", Discard),
            // Receipts and encrypted payloads without a body are stored.
            (
                "<message xmlns='jabber:client' type='chat'><received xmlns='urn:xmpp:receipts' id='1'/></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/><store xmlns='urn:xmpp:hints'/></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client' type='headline'><body>x</body></message>",
                Discard,
            ),
            (
                "<message xmlns='jabber:client' type='headline'><body>x</body><store xmlns='urn:xmpp:hints'/></message>",
                Store,
            ),
            (
                "<message xmlns='jabber:client' type='groupchat'><body>x</body><store xmlns='urn:xmpp:hints'/></message>",
                Discard,
            ),
            (
                "<message xmlns='jabber:client' type='error'><body>x</body><store xmlns='urn:xmpp:hints'/></message>",
                Discard,
            ),
            (
                "<message xmlns='jabber:client' type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>",
                Refuse,
            ),
            (
                "<message xmlns='jabber:client' type='chat'><sent xmlns='urn:xmpp:carbons:2'/></message>",
                Discard,
            ),
            (
                "<message xmlns='jabber:client'><result xmlns='urn:xmpp:mam:2'/></message>",
                Discard,
            ),
            ("<presence xmlns='jabber:client'/>", Discard),
        ];
        for (xml, want) in cases {
            assert_eq!(storability(&msg(xml)), want, "{xml}");
        }
    }

    #[test]
    fn delay_is_added_once_per_server() {
        let m = msg("<message xmlns='jabber:client' to='a@x'><body>x</body></message>");
        let s = stamped(&m, "x", 1_000_000);
        let delays: Vec<&Element> = s.children().filter(|c| c.is("delay", ns::DELAY)).collect();
        assert_eq!(delays.len(), 1);
        assert_eq!(delays[0].attr("from"), Some("x"));
        assert_eq!(delays[0].attr("stamp"), Some("1970-01-01T00:00:01.000Z"));
        let again = stamped(&s, "x", 5_000_000);
        assert_eq!(
            again
                .children()
                .filter(|c| c.is("delay", ns::DELAY))
                .count(),
            1,
            "the first stamp is kept"
        );
        let other = stamped(&s, "y", 5_000_000);
        assert_eq!(
            other
                .children()
                .filter(|c| c.is("delay", ns::DELAY))
                .count(),
            2
        );
        // Round trip through the stored text keeps everything.
        let text = String::from_utf8(writer::serialize(&s)).unwrap();
        let back: Element = text.parse().unwrap();
        assert_eq!(back, s);
    }
}
