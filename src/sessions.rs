//! The table of bound client sessions: bare JID -> resources, each with the
//! state routing needs (priority, availability, carbons, ...) and the sender
//! side of its bounded mailbox.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use tokio::sync::mpsc;

/// What other parts of the server send to a session's task.
#[derive(Debug)]
pub enum SessionMsg {
    /// A stanza for the client.
    Stanza(Element),
    /// Close the stream with this stream error condition (e.g. `conflict`
    /// when another session took the resource, `policy-violation`,
    /// `system-shutdown`), with an optional text.
    Close {
        condition: &'static str,
        text: Option<String>,
    },
}

/// A stanza serialised once for many recipients (a room's fan-out): the
/// same bytes go to every occupant, only the `to` attribute differs, and it
/// is always the receiving session's own full JID. The serialisation is split
/// around the place of `to` (`<message` | ` to='…'` | ` from='…' …>…</message>`),
/// and the element is kept for the rare consumer that needs a tree (e.g. a
/// stream-management queue handing unacknowledged stanzas back to the router).
#[derive(Debug)]
pub struct SharedStanza {
    /// The stanza without a `to` attribute.
    element: Element,
    /// `<message` / `<presence` / `<iq`.
    head: Box<[u8]>,
    /// Everything after the element name: the other attributes, the
    /// children and the end tag, as written in a `jabber:client` or
    /// `jabber:server` stream.
    tail: Box<[u8]>,
}

impl SharedStanza {
    /// Serialise `element` (its `to` attribute, if any, is dropped).
    pub fn new(mut element: Element) -> Self {
        crate::stanza::remove_attr(&mut element, "to");
        let mut bytes = Vec::with_capacity(256);
        crate::xml::serialize_into(&mut bytes, &element, crate::xml::ns::CLIENT);
        let split = 1 + element.name().len();
        let tail = bytes.split_off(split.min(bytes.len()));
        SharedStanza {
            element,
            head: bytes.into_boxed_slice(),
            tail: tail.into_boxed_slice(),
        }
    }

    /// The stanza (without `to`).
    pub fn element(&self) -> &Element {
        &self.element
    }

    /// Append the stanza addressed to `to` to a client or server stream
    /// buffer: one copy of the shared bytes plus the escaped address.
    pub fn write_to(&self, out: &mut Vec<u8>, to: &str) {
        out.reserve(self.head.len() + self.tail.len() + to.len() + 6);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b" to='");
        crate::xml::writer::escape_attr(out, to);
        out.push(b'\'');
        out.extend_from_slice(&self.tail);
    }

    /// The stanza as an element addressed to `to`.
    pub fn element_for(&self, to: &str) -> Element {
        let mut el = self.element.clone();
        crate::stanza::set_attr(&mut el, "to", to);
        el
    }

    /// Bytes of the shared serialisation.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The mailbox message that hands a shared stanza to `session`.
///
/// Until the client stream writer takes shared stanzas directly (a
/// `SessionMsg::Shared(Arc<SharedStanza>)` written with
/// [`SharedStanza::write_to`] and the session's JID), this builds the element
/// for the session; callers do not change when that switch happens.
pub fn shared_msg(stanza: &std::sync::Arc<SharedStanza>, session: &Session) -> SessionMsg {
    SessionMsg::Stanza(stanza.element_for(&session.jid_string))
}

/// Shared state of one bound session.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub jid: FullJid,
    /// `jid` as a string (written as `to` of shared stanzas).
    pub jid_string: String,
    pub tx: mpsc::Sender<SessionMsg>,
    /// Presence priority (RFC 6121 section 4.7.2.3), -128..=127.
    pub priority: AtomicI32,
    /// Has sent initial presence and not gone unavailable since.
    pub available: AtomicBool,
    /// The last broadcast available presence (for probes).
    pub presence: Mutex<Option<Element>>,
    /// Message carbons (XEP-0280) enabled.
    pub carbons: AtomicBool,
    /// Requested the roster (an "interested resource", RFC 6121 2.1.6).
    pub roster_requested: AtomicBool,
    /// Entities that received directed presence from this session (they are
    /// owed an unavailable presence when it ends).
    pub directed_presence: Mutex<HashSet<Jid>>,
    /// Set when the session is going away (no new deliveries).
    pub closing: AtomicBool,
    /// Remote address of the connection (for admin listings).
    pub peer: Option<std::net::SocketAddr>,
    /// Microseconds since the epoch when the session was bound.
    pub bound_at: i64,
    /// Cancelled when the session must be closed although its mailbox is
    /// full (stuck client): the task closes with `policy-violation`.
    pub kill: tokio_util::sync::CancellationToken,
}

impl Session {
    pub fn priority(&self) -> i32 {
        self.priority.load(Ordering::Relaxed)
    }
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed) && !self.closing.load(Ordering::Relaxed)
    }
    pub fn carbons_enabled(&self) -> bool {
        self.carbons.load(Ordering::Relaxed)
    }
    pub fn bare(&self) -> BareJid {
        self.jid.to_bare()
    }
}

#[derive(Debug, Default)]
pub struct SessionTable {
    map: RwLock<HashMap<BareJid, Vec<Arc<Session>>>>,
    next_id: AtomicU64,
    count: AtomicU64,
}

impl SessionTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind a session. Returns the new session and the one it replaced (same
    /// full JID), which must be told `conflict`.
    pub fn bind(
        &self,
        jid: FullJid,
        tx: mpsc::Sender<SessionMsg>,
        peer: Option<std::net::SocketAddr>,
    ) -> (Arc<Session>, Option<Arc<Session>>) {
        let session = Arc::new(Session {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            jid: jid.clone(),
            jid_string: jid.to_string(),
            tx,
            priority: AtomicI32::new(0),
            available: AtomicBool::new(false),
            presence: Mutex::new(None),
            carbons: AtomicBool::new(false),
            roster_requested: AtomicBool::new(false),
            directed_presence: Mutex::new(HashSet::new()),
            closing: AtomicBool::new(false),
            peer,
            bound_at: crate::storage::now_micros(),
            kill: tokio_util::sync::CancellationToken::new(),
        });
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let list = map.entry(jid.to_bare()).or_default();
        let mut replaced = None;
        if let Some(pos) = list.iter().position(|s| s.jid == jid) {
            let old = list.remove(pos);
            old.closing.store(true, Ordering::Relaxed);
            replaced = Some(old);
        } else {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        list.push(session.clone());
        (session, replaced)
    }

    /// Remove a session (only if it is still the bound one for its JID).
    pub fn unbind(&self, session: &Session) -> bool {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let bare = session.jid.to_bare();
        let mut removed = false;
        if let Some(list) = map.get_mut(&bare) {
            if let Some(pos) = list.iter().position(|s| s.id == session.id) {
                list.remove(pos);
                removed = true;
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                map.remove(&bare);
            }
        }
        removed
    }

    /// Sessions of a user (bound, possibly not available).
    pub fn resources(&self, bare: &BareJid) -> Vec<Arc<Session>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare).cloned().unwrap_or_default()
    }

    pub fn resource_count(&self, bare: &BareJid) -> usize {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(bare).map(|l| l.len()).unwrap_or(0)
    }

    pub fn get(&self, full: &FullJid) -> Option<Arc<Session>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(&full.to_bare())
            .and_then(|l| l.iter().find(|s| &s.jid == full).cloned())
    }

    pub fn is_online(&self, bare: &BareJid) -> bool {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.contains_key(bare)
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every bound session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().cloned().collect()
    }

    /// The resources a message to the bare JID goes to (RFC 6121 8.5.2.1.1):
    /// the available ones with the highest non-negative priority.
    pub fn message_targets(&self, bare: &BareJid) -> Vec<Arc<Session>> {
        let list = self.resources(bare);
        let best = list
            .iter()
            .filter(|s| s.is_available() && s.priority() >= 0)
            .map(|s| s.priority())
            .max();
        match best {
            Some(p) => list
                .into_iter()
                .filter(|s| s.is_available() && s.priority() == p)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Available resources with non-negative priority (headlines, RFC 6121 8.5.2.1.1).
    pub fn nonnegative_available(&self, bare: &BareJid) -> Vec<Arc<Session>> {
        self.resources(bare)
            .into_iter()
            .filter(|s| s.is_available() && s.priority() >= 0)
            .collect()
    }

    /// All available resources (presence to the bare JID).
    pub fn available(&self, bare: &BareJid) -> Vec<Arc<Session>> {
        self.resources(bare)
            .into_iter()
            .filter(|s| s.is_available())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &str) -> FullJid {
        FullJid::new(s).unwrap()
    }

    #[test]
    fn shared_stanza_bytes_equal_a_normal_serialisation() {
        let el: Element = "<message xmlns='jabber:client' from='r@c.x/n&apos;k' to='ignored@x' \
            type='groupchat' id='1'><body>a &lt; b</body><stanza-id xmlns='urn:xmpp:sid:0' id='5' by='r@c.x'/></message>"
            .parse()
            .unwrap();
        let shared = SharedStanza::new(el.clone());
        assert!(shared.element().attr("to").is_none());
        let mut out = Vec::new();
        shared.write_to(&mut out, "u@x/it's");
        let expected = shared.element_for("u@x/it's");
        let mut direct = Vec::new();
        crate::xml::serialize_into(&mut direct, &expected, crate::xml::ns::CLIENT);
        // Same element either way (attribute order may differ in bytes).
        let mut p = crate::xml::StreamParser::new(1 << 20);
        p.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
            .unwrap();
        p.feed(&out).unwrap();
        let _ = p.next_event();
        match p.next_event() {
            Some(crate::xml::StreamEvent::Element(e)) => {
                assert_eq!(e, expected);
                assert_eq!(e.attr("to"), Some("u@x/it's"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("<message to='u@x/it&apos;s' ")
        );
        let (tx, _rx) = mpsc::channel(1);
        let t = SessionTable::new();
        let (s, _) = t.bind(full("u@x/r"), tx, None);
        match shared_msg(&std::sync::Arc::new(shared), &s) {
            SessionMsg::Stanza(e) => assert_eq!(e.attr("to"), Some("u@x/r")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bind_replace_unbind() {
        let t = SessionTable::new();
        let (tx, _rx) = mpsc::channel(4);
        let (a, none) = t.bind(full("u@x/a"), tx.clone(), None);
        assert!(none.is_none());
        let (b, _) = t.bind(full("u@x/b"), tx.clone(), None);
        assert_eq!(t.count(), 2);
        let (a2, replaced) = t.bind(full("u@x/a"), tx.clone(), None);
        assert_eq!(replaced.unwrap().id, a.id);
        assert_eq!(t.count(), 2);
        assert!(!t.unbind(&a), "the replaced session is no longer bound");
        assert!(t.unbind(&a2));
        assert!(t.unbind(&b));
        assert_eq!(t.count(), 0);
        assert!(!t.is_online(&BareJid::new("u@x").unwrap()));
    }

    #[test]
    fn message_targets_follow_priority() {
        let t = SessionTable::new();
        let (tx, _rx) = mpsc::channel(4);
        let bare = BareJid::new("u@x").unwrap();
        let (a, _) = t.bind(full("u@x/a"), tx.clone(), None);
        let (b, _) = t.bind(full("u@x/b"), tx.clone(), None);
        let (c, _) = t.bind(full("u@x/c"), tx.clone(), None);
        assert!(t.message_targets(&bare).is_empty(), "none available yet");
        for s in [&a, &b, &c] {
            s.available.store(true, Ordering::Relaxed);
        }
        a.priority.store(5, Ordering::Relaxed);
        b.priority.store(5, Ordering::Relaxed);
        c.priority.store(1, Ordering::Relaxed);
        let ids: Vec<u64> = t.message_targets(&bare).iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![a.id, b.id]);
        a.priority.store(-1, Ordering::Relaxed);
        b.priority.store(-1, Ordering::Relaxed);
        c.priority.store(-5, Ordering::Relaxed);
        assert!(
            t.message_targets(&bare).is_empty(),
            "negative priority gets no bare-JID messages"
        );
        assert_eq!(t.available(&bare).len(), 3);
    }
}
