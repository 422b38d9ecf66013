//! Stream management (XEP-0198), sans-IO: the counters, the queue of
//! unacknowledged stanzas and the timing of acknowledgement requests. The
//! registry of resumable sessions lives here too.
//!
//! Counters are 32-bit and wrap (XEP-0198 section 4: "h ... MUST be reset to
//! zero when it reaches 2^32").

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use jid::BareJid;
use minidom::Element;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Settings of stream management.
#[derive(Debug, Clone)]
pub struct SmSettings {
    /// Offer resumption at all.
    pub resumption: bool,
    /// Resumption timeout when the client does not ask for one (seconds).
    pub default_timeout: u32,
    /// The largest resumption timeout a client may ask for (seconds).
    pub max_timeout: u32,
    /// Request an ack after this many unacknowledged stanzas ...
    pub request_after_stanzas: u32,
    /// ... or after this long with unacknowledged stanzas.
    pub request_after: Duration,
    /// An ack request unanswered this long means the socket is dead.
    pub ack_timeout: Duration,
    /// Most unacknowledged stanzas kept for one session.
    pub max_unacked: usize,
}

impl Default for SmSettings {
    fn default() -> Self {
        SmSettings {
            resumption: true,
            default_timeout: 300,
            max_timeout: 3600,
            request_after_stanzas: 5,
            request_after: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(60),
            max_unacked: 10_000,
        }
    }
}

/// A peer acknowledged more than it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandledCountTooHigh {
    pub h: u32,
    pub send_count: u32,
}

/// State of stream management on one session.
#[derive(Debug)]
pub struct StreamManagement {
    /// Stanzas received from the client and handled (our `h`).
    pub inbound: u32,
    /// Stanzas sent to the client (sequence number of the last one).
    pub outbound: u32,
    /// The client's last acknowledged `h`.
    pub acked: u32,
    /// Sent but unacknowledged stanzas, oldest first.
    pub unacked: VecDeque<Element>,
    /// When we last asked for an ack, if it is not answered yet.
    pub request_outstanding: Option<Instant>,
    /// When the oldest stanza not yet covered by a request was sent.
    pub unrequested_since: Option<Instant>,
    /// Stanzas sent since our last request.
    pub since_request: u32,
    /// SM-ID if resumption was enabled.
    pub id: Option<String>,
    /// Resumption timeout granted (seconds).
    pub max: u32,
}

impl StreamManagement {
    pub fn new(id: Option<String>, max: u32) -> Self {
        StreamManagement {
            inbound: 0,
            outbound: 0,
            acked: 0,
            unacked: VecDeque::new(),
            request_outstanding: None,
            unrequested_since: None,
            since_request: 0,
            id,
            max,
        }
    }

    /// A stanza from the client was handled.
    pub fn handled_inbound(&mut self) {
        self.inbound = self.inbound.wrapping_add(1);
    }

    /// A stanza goes to the client: count it and keep it until acked.
    pub fn sent(&mut self, stanza: Element, now: Instant) {
        self.outbound = self.outbound.wrapping_add(1);
        self.unacked.push_back(stanza);
        self.since_request += 1;
        if self.unrequested_since.is_none() {
            self.unrequested_since = Some(now);
        }
    }

    /// Process `<a h/>` (or the h of `<resume/>`): drop what it covers.
    pub fn ack(&mut self, h: u32) -> Result<(), HandledCountTooHigh> {
        let newly = h.wrapping_sub(self.acked) as usize;
        if newly > self.unacked.len() {
            return Err(HandledCountTooHigh {
                h,
                send_count: self.outbound,
            });
        }
        self.unacked.drain(..newly);
        self.acked = h;
        self.request_outstanding = None;
        Ok(())
    }

    /// Should we send `<r/>` now?
    pub fn should_request(&self, s: &SmSettings, now: Instant) -> bool {
        if self.request_outstanding.is_some() || self.since_request == 0 {
            return false;
        }
        self.since_request >= s.request_after_stanzas
            || self
                .unrequested_since
                .is_some_and(|t| now.duration_since(t) >= s.request_after)
    }

    /// We send `<r/>`.
    pub fn requested(&mut self, now: Instant) {
        self.request_outstanding = Some(now);
        self.since_request = 0;
        self.unrequested_since = None;
    }

    /// Has an ack request gone unanswered too long (a dead socket)?
    pub fn ack_overdue(&self, s: &SmSettings, now: Instant) -> bool {
        self.request_outstanding
            .is_some_and(|t| now.duration_since(t) >= s.ack_timeout)
    }

    /// The next moment [`Self::should_request`] or [`Self::ack_overdue`]
    /// can change by itself.
    pub fn next_deadline(&self, s: &SmSettings) -> Option<Instant> {
        match self.request_outstanding {
            Some(t) => Some(t + s.ack_timeout),
            None => self.unrequested_since.map(|t| t + s.request_after),
        }
    }

    /// Take every unacknowledged stanza (for retransmission or rerouting).
    pub fn take_unacked(&mut self) -> Vec<Element> {
        self.unacked.drain(..).collect()
    }

    pub fn enabled_element(&self, resume: bool) -> Element {
        let mut b = Element::builder("enabled", crate::xml::ns::SM);
        if let (true, Some(id)) = (resume, &self.id) {
            b = b
                .attr(crate::stanza::name("id"), id.as_str())
                .attr(crate::stanza::name("resume"), "true")
                .attr(crate::stanza::name("max"), self.max.to_string());
        }
        b.build()
    }
}

/// `<failed xmlns='urn:xmpp:sm:3'>` with a stanza error condition.
pub fn failed(condition: &str, h: Option<u32>) -> Element {
    let mut b = Element::builder("failed", crate::xml::ns::SM);
    if let Some(h) = h {
        b = b.attr(crate::stanza::name("h"), h.to_string());
    }
    b.append(Element::builder(condition, crate::xml::ns::STANZA_ERRORS).build())
        .build()
}

pub fn ack_element(h: u32) -> Element {
    Element::builder("a", crate::xml::ns::SM)
        .attr(crate::stanza::name("h"), h.to_string())
        .build()
}

pub fn request_element() -> Element {
    Element::builder("r", crate::xml::ns::SM).build()
}

/// A `<resume/>` handed to the session that owns the SM-ID. The new
/// connection's transport moves into the old session's task.
pub struct ResumeRequest {
    pub user: BareJid,
    pub h: u32,
    pub transport: Box<dyn super::transport::ClientTransport>,
    /// Whether the transport is encrypted (the resumed session keeps going
    /// over it).
    pub secure: bool,
    /// Answer: Ok when the old task took over (the new connection ends), or
    /// the transport back with the `<failed/>` to send.
    pub reply: tokio::sync::oneshot::Sender<Result<(), ResumeRefused>>,
}

/// A refused resumption: the transport comes back with the reason.
pub struct ResumeRefused {
    pub transport: Box<dyn super::transport::ClientTransport>,
    pub condition: &'static str,
    pub h: Option<u32>,
}

struct Entry {
    owner: BareJid,
    /// Present while the session lives; None for a tombstone of an expired
    /// session (kept to answer `<failed h/>`).
    tx: Option<mpsc::Sender<ResumeRequest>>,
    /// For tombstones: the inbound count when the session ended.
    final_h: u32,
    expires: Instant,
}

/// SM-ID -> the task of the resumable session.
#[derive(Default)]
pub struct SmRegistry {
    map: Mutex<HashMap<String, Entry>>,
}

/// How long a tombstone of an expired session is kept.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
const MAX_TOMBSTONES: usize = 100_000;

pub enum Lookup {
    Live(mpsc::Sender<ResumeRequest>),
    Expired(u32),
    Unknown,
}

impl SmRegistry {
    pub fn register(&self, id: &str, owner: BareJid, tx: mpsc::Sender<ResumeRequest>) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.to_owned(),
            Entry {
                owner,
                tx: Some(tx),
                final_h: 0,
                expires: Instant::now() + TOMBSTONE_TTL,
            },
        );
    }

    /// The session ended: keep a tombstone with its final inbound count.
    pub fn retire(&self, id: &str, final_h: u32) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_TOMBSTONES {
            map.retain(|_, e| e.tx.is_some() || e.expires > now);
        }
        if let Some(e) = map.get_mut(id) {
            e.tx = None;
            e.final_h = final_h;
            e.expires = now + TOMBSTONE_TTL;
        }
    }

    /// Find a session to resume; other users' ids look unknown.
    pub fn lookup(&self, id: &str, user: &BareJid) -> Lookup {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(e) if &e.owner == user => match &e.tx {
                Some(tx) => Lookup::Live(tx.clone()),
                None if e.expires > Instant::now() => Lookup::Expired(e.final_h),
                None => Lookup::Unknown,
            },
            _ => Lookup::Unknown,
        }
    }

    pub fn live_count(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.tx.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u32) -> Element {
        Element::builder("message", "jabber:client")
            .attr(crate::stanza::name("id"), i.to_string())
            .build()
    }

    #[tokio::test(start_paused = true)]
    async fn counters_queue_and_acks() {
        let s = SmSettings::default();
        let mut sm = StreamManagement::new(None, 300);
        let now = Instant::now();
        for i in 0..4 {
            sm.sent(msg(i), now);
        }
        assert_eq!(sm.outbound, 4);
        assert!(!sm.should_request(&s, now), "below the stanza threshold");
        sm.sent(msg(4), now);
        assert!(sm.should_request(&s, now));
        sm.requested(now);
        assert!(!sm.should_request(&s, now));
        sm.ack(3).unwrap();
        assert_eq!(sm.unacked.len(), 2);
        assert_eq!(sm.unacked[0].attr("id"), Some("3"));
        // Acking the same h again changes nothing.
        sm.ack(3).unwrap();
        assert_eq!(sm.unacked.len(), 2);
        assert_eq!(
            sm.ack(6),
            Err(HandledCountTooHigh {
                h: 6,
                send_count: 5
            })
        );
        sm.ack(5).unwrap();
        assert!(sm.unacked.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn counters_wrap_at_2_pow_32() {
        let mut sm = StreamManagement::new(None, 300);
        sm.outbound = u32::MAX - 1;
        sm.acked = u32::MAX - 1;
        sm.inbound = u32::MAX;
        let now = Instant::now();
        for i in 0..4 {
            sm.sent(msg(i), now);
        }
        assert_eq!(sm.outbound, 2);
        sm.ack(0).unwrap(); // covers u32::MAX and 0
        assert_eq!(sm.unacked.len(), 2);
        assert_eq!(sm.unacked[0].attr("id"), Some("2"));
        sm.ack(2).unwrap();
        assert!(sm.unacked.is_empty());
        sm.handled_inbound();
        assert_eq!(sm.inbound, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn time_based_request_and_dead_socket_detection() {
        let s = SmSettings::default();
        let mut sm = StreamManagement::new(None, 300);
        let t0 = Instant::now();
        sm.sent(msg(0), t0);
        assert!(!sm.should_request(&s, t0));
        assert_eq!(sm.next_deadline(&s), Some(t0 + s.request_after));
        tokio::time::advance(s.request_after).await;
        let t1 = Instant::now();
        assert!(sm.should_request(&s, t1));
        sm.requested(t1);
        assert!(!sm.ack_overdue(&s, t1));
        assert_eq!(sm.next_deadline(&s), Some(t1 + s.ack_timeout));
        tokio::time::advance(s.ack_timeout).await;
        assert!(sm.ack_overdue(&s, Instant::now()));
        sm.ack(1).unwrap();
        assert!(!sm.ack_overdue(&s, Instant::now()));
        assert_eq!(sm.next_deadline(&s), None);
    }

    #[tokio::test]
    async fn registry_hides_other_users_and_keeps_tombstones() {
        let r = SmRegistry::default();
        let (tx, _rx) = mpsc::channel(1);
        let alice = BareJid::new("alice@x").unwrap();
        let bob = BareJid::new("bob@x").unwrap();
        r.register("id1", alice.clone(), tx);
        assert!(matches!(r.lookup("id1", &alice), Lookup::Live(_)));
        assert!(matches!(r.lookup("id1", &bob), Lookup::Unknown));
        assert!(matches!(r.lookup("nope", &alice), Lookup::Unknown));
        r.retire("id1", 42);
        assert!(matches!(r.lookup("id1", &alice), Lookup::Expired(42)));
        assert_eq!(r.live_count(), 0);
    }
}
