//! One room: an actor with its own task and bounded mailbox, owning the
//! room's state (configuration, affiliations, occupants, subject, history).
//! Everything addressed to the room or to one of its occupant JIDs is
//! handled here, one stanza at a time, so no locks are needed.
//!
//! Fan-out: a room message or presence is built once, serialised once into
//! a [`SharedStanza`], and the same bytes go to every occupant's session
//! mailbox (local occupants directly, without the router; remote occupants
//! through the router). A session whose mailbox is full is more than
//! `limits.session_queue` stanzas behind: it is closed (`policy-violation`),
//! as the router does with stuck sessions, instead of stalling the room.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use hmac::{KeyInit, Mac};
use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use super::archive::{HistItem, HistoryRequest};
use super::form::Form;
use super::roomconfig::RoomConfig;
use super::service::{RoomMsg, ServiceCore, with_by};
use super::types::*;
use crate::config::RoomCreation;
use crate::server::Server;
use crate::sessions::{Session, SessionMsg, SharedStanza, shared_msg};
use crate::stanza::{self, ErrorType, Kind, StanzaError, name};
use crate::storage::muc::StoredRoom;
use crate::storage::{MucStore, StoreError, now_micros};
use crate::xml::ns;

/// Pending proxied IQs per room, at most.
const MAX_PENDING_IQS: usize = 1000;
/// How long a proxied IQ waits for its answer.
const IQ_TIMEOUT: Duration = Duration::from_secs(60);
/// Invitations in one message, at most.
const MAX_INVITES: usize = 20;
/// Minimum time between two voice requests of one occupant.
const VOICE_REQUEST_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct AffEntry {
    pub affiliation: Affiliation,
    pub nick: Option<String>,
    pub reason: Option<String>,
}

/// One client session of an occupant (several with multi-session nicks).
#[derive(Debug)]
pub(crate) struct OccSession {
    pub jid: FullJid,
    pub jid_str: String,
    /// The client's presence, without MUC elements.
    pub presence: Element,
    pub priority: i32,
    /// The local session, when the occupant is a local user.
    pub local: Option<Arc<Session>>,
    pub seq: u64,
}

/// An occupant: one nickname, one bare JID, one or more sessions.
#[derive(Debug)]
pub(crate) struct Occupant {
    pub nick: String,
    pub bare: BareJid,
    pub role: Role,
    pub occupant_id: String,
    pub sessions: Vec<OccSession>,
    pub bucket: TokenBucket,
    pub last_voice_request: Option<Instant>,
    /// The current available presence as others see it: without and with
    /// the real JID (built on demand, dropped on change).
    cached: Option<[Arc<SharedStanza>; 2]>,
}

impl Occupant {
    /// The session whose presence represents the occupant: highest
    /// priority, then the most recent.
    pub(crate) fn primary(&self) -> Option<&OccSession> {
        self.sessions.iter().max_by_key(|s| (s.priority, s.seq))
    }
}

/// What a presence about an occupant says beyond the defaults.
#[derive(Debug, Default, Clone)]
pub(crate) struct Extra {
    /// `nick` on the item (new nickname with 303).
    pub item_nick: Option<String>,
    /// `<actor nick='…'/>`.
    pub actor: Option<String>,
    pub reason: Option<String>,
    /// `<destroy/>` of a destroyed room.
    pub destroy: Option<Element>,
    /// The client's own `<status/>` of an unavailable presence.
    pub status: Vec<Element>,
    /// The `id` of the client's presence, reflected on its self-presence.
    pub self_id: Option<String>,
}

/// A snapshot of an occupant for building presence about it.
#[derive(Debug, Clone)]
pub(crate) struct OccView {
    pub nick: String,
    pub occupant_id: String,
    pub role: Role,
    pub affiliation: Affiliation,
    pub jid: String,
    pub children: Vec<Element>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Subject {
    pub text: String,
    pub nick: String,
    pub stamp: i64,
    pub set: bool,
}

struct PendingIq {
    requester: String,
    original_id: String,
    from_nick: String,
    to_nick: String,
    expires: Instant,
}

pub(crate) struct Room {
    pub core: Arc<ServiceCore>,
    pub server: Server,
    pub node: String,
    pub jid: BareJid,
    pub jid_str: String,
    /// The room exists (was created, or loaded from the store).
    pub exists: bool,
    pub destroyed: bool,
    /// The room has a row in the store.
    pub persisted: bool,
    pub config: RoomConfig,
    pub affiliations: BTreeMap<BareJid, AffEntry>,
    pub occupants: HashMap<String, Occupant>,
    pub by_jid: HashMap<FullJid, String>,
    pub subject: Subject,
    /// Until this instant the room awaits its initial configuration.
    pub locked_until: Option<Instant>,
    pub history: VecDeque<HistItem>,
    last_id: i64,
    pending_iqs: HashMap<String, PendingIq>,
    pub created_at: i64,
    bucket: TokenBucket,
    pub empty_since: Option<Instant>,
    secret: Arc<[u8]>,
    /// The creator of a live temporary room (counted against its limit).
    pub temp_owner: Option<BareJid>,
    seq: u64,
    /// Stanzas for remote entities (and through the router), sent after
    /// the current stanza is handled.
    outbox: Vec<Element>,
    /// Sessions found gone while delivering.
    ghosts: Vec<FullJid>,
}

/// The actor: load, serve the mailbox, stop when the room is gone, empty
/// and temporary, or idle; re-dispatch what arrived while stopping.
pub(crate) async fn run(
    core: Arc<ServiceCore>,
    server: Server,
    node: String,
    generation: u64,
    mut rx: mpsc::Receiver<RoomMsg>,
) {
    let mut room = match Room::load(core.clone(), server.clone(), &node).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(room = %node, error = %e, "cannot load room");
            core.remove_room(&node, generation);
            rx.close();
            while let Ok(m) = rx.try_recv() {
                if let RoomMsg::Stanza(s) = m
                    && !stanza::is_error(&s)
                    && stanza::stanza_type(&s) != "unavailable"
                {
                    server
                        .bounce(&s, with_by(StanzaError::internal(), &node, &core.domain))
                        .await;
                }
            }
            return;
        }
    };
    loop {
        let deadline = room.next_deadline();
        let msg = tokio::select! {
            _ = server.shutdown.cancelled() => break,
            m = rx.recv() => m,
            _ = sleep_until_opt(deadline) => {
                room.on_timer().await;
                room.finish_step().await;
                if room.should_stop() { break }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        room.handle(msg).await;
        room.finish_step().await;
        if room.should_stop() {
            break;
        }
    }
    room.stopping();
    core.remove_room(&node, generation);
    rx.close();
    if server.shutdown.is_cancelled() {
        return;
    }
    // Whatever arrived meanwhile goes to a fresh actor.
    while let Ok(m) = rx.try_recv() {
        match m {
            RoomMsg::Stanza(s) => core.dispatch(&server, &node, s).await,
            RoomMsg::SessionGone { .. } => {}
        }
    }
}

async fn sleep_until_opt(d: Option<Instant>) {
    match d {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The XEP-0421 occupant id: stable per (room, user), unguessable,
/// different in every room.
pub(crate) fn occupant_id(secret: &[u8], room: &str, bare: &BareJid) -> String {
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(room.as_bytes());
    mac.update(&[0]);
    mac.update(bare.to_string().as_bytes());
    let out = mac.finalize().into_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&out[..18])
}

fn occupant_id_el(id: &str) -> Element {
    Element::builder("occupant-id", NS_OCCUPANT_ID)
        .attr(name("id"), id)
        .build()
}

/// Presence children a room reflects (no MUC protocol elements, no
/// client-made ids).
fn sanitize_presence(p: &Element) -> Element {
    let mut out = Element::bare("presence", ns::CLIENT);
    for c in p.children() {
        if c.is("x", ns::MUC)
            || c.is("x", ns::MUC_USER)
            || c.is("occupant-id", NS_OCCUPANT_ID)
            || c.is("stanza-id", ns::SID)
            || c.is("error", ns::CLIENT)
            || c.is("delay", ns::DELAY)
        {
            continue;
        }
        out.append_child(c.clone());
    }
    out
}

/// Does this message go into the archive?
fn archivable(m: &Element) -> bool {
    if m.has_child("no-store", ns::HINTS) || m.has_child("no-permanent-store", ns::HINTS) {
        return false;
    }
    if m.has_child("store", ns::HINTS) || m.has_child("body", ns::CLIENT) {
        return true;
    }
    m.children().any(|c| {
        let n = c.ns();
        matches!(
            n.as_str(),
            "eu.siacs.conversations.axolotl"
                | "urn:xmpp:omemo:2"
                | "urn:xmpp:reactions:0"
                | "urn:xmpp:message-retract:1"
                | "urn:xmpp:message-moderate:1"
                | "urn:xmpp:fasten:0"
                | "jabber:x:oob"
        )
    })
}

/// Error conditions that mean the recipient is gone (XEP-0045 section 17.1.5).
fn is_delivery_error(el: &Element) -> bool {
    let Some(err) = el.get_child("error", ns::CLIENT) else {
        return false;
    };
    err.children().any(|c| {
        c.ns() == ns::STANZA_ERRORS
            && matches!(
                c.name(),
                "gone"
                    | "item-not-found"
                    | "recipient-unavailable"
                    | "redirect"
                    | "remote-server-not-found"
                    | "remote-server-timeout"
                    | "service-unavailable"
            )
    })
}

fn try_mailbox(sess: &Arc<Session>, msg: SessionMsg) -> bool {
    if sess.closing.load(Ordering::Relaxed) {
        return false;
    }
    match sess.tx.try_send(msg) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            tracing::warn!(jid = %sess.jid, "session mailbox full during room fan-out; closing it");
            sess.closing.store(true, Ordering::Relaxed);
            sess.kill.cancel();
            false
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

/// Hand a shared stanza to one session; remote sessions go through the
/// router. False when the session is gone.
fn deliver(s: &OccSession, st: &Arc<SharedStanza>, remote: &mut Vec<Element>) -> bool {
    match &s.local {
        Some(sess) => try_mailbox(sess, shared_msg(st, sess)),
        None => {
            remote.push(st.element_for(&s.jid_str));
            true
        }
    }
}

impl Room {
    async fn load(core: Arc<ServiceCore>, server: Server, node: &str) -> Result<Room, StoreError> {
        let jid_str = format!("{node}@{}", core.domain);
        let jid = BareJid::new(&jid_str).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let secret = core
            .secret(&server)
            .await
            .map_err(|_| StoreError::Corrupt("no MUC secret".into()))?;
        let mut room = Room {
            config: RoomConfig::new(&core.cfg),
            bucket: TokenBucket::new(core.cfg.room_burst),
            core,
            server,
            node: node.to_owned(),
            jid,
            jid_str,
            exists: false,
            destroyed: false,
            persisted: false,
            affiliations: BTreeMap::new(),
            occupants: HashMap::new(),
            by_jid: HashMap::new(),
            subject: Subject::default(),
            locked_until: None,
            history: VecDeque::new(),
            last_id: 0,
            pending_iqs: HashMap::new(),
            created_at: now_micros(),
            empty_since: Some(Instant::now()),
            secret,
            temp_owner: None,
            seq: 0,
            outbox: Vec::new(),
            ghosts: Vec::new(),
        };
        let store = &room.server.store;
        if let Some(stored) = store.load_room(&room.core.domain, node).await? {
            room.exists = true;
            room.persisted = true;
            room.config = RoomConfig::from_json(&stored.config, &room.core.cfg);
            room.config.persistent = true;
            room.created_at = stored.created_at;
            if let Some(text) = stored.subject {
                room.subject = Subject {
                    text,
                    nick: stored.subject_nick.unwrap_or_default(),
                    stamp: stored.subject_stamp.unwrap_or(stored.created_at),
                    set: true,
                };
            }
            for a in store.room_affiliations(&room.core.domain, node).await? {
                let (Ok(j), Some(aff)) = (BareJid::new(&a.jid), Affiliation::parse(&a.affiliation))
                else {
                    tracing::warn!(room = %room.jid, jid = %a.jid, "invalid stored affiliation skipped");
                    continue;
                };
                room.affiliations.insert(
                    j,
                    AffEntry {
                        affiliation: aff,
                        nick: a.nick,
                        reason: a.reason,
                    },
                );
            }
            if room.config.archive {
                room.history = super::archive::load_history(
                    &room.server,
                    &room.jid_str,
                    room.core.cfg.max_history,
                )
                .await?;
                room.last_id = room.history.back().map(|h| h.id).unwrap_or(0);
            }
            room.publish_listing();
        }
        Ok(room)
    }

    pub(crate) fn publish_listing(&self) {
        if self.exists && !self.destroyed && self.locked_until.is_none() {
            self.core.set_listing(
                &self.node,
                Some((self.config.public, self.config.name.clone())),
            );
        } else {
            self.core.set_listing(&self.node, None);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.locked_until;
        let mut consider = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if let Some(p) = self.pending_iqs.values().map(|p| p.expires).min() {
            consider(p);
        }
        if self.occupants.is_empty()
            && let Some(e) = self.empty_since
        {
            consider(e + Duration::from_secs(self.core.cfg.idle_unload_secs.max(1)));
        }
        d
    }

    fn should_stop(&self) -> bool {
        if self.destroyed || (!self.exists && self.occupants.is_empty()) {
            return true;
        }
        if self.occupants.is_empty()
            && let Some(e) = self.empty_since
        {
            return e.elapsed() >= Duration::from_secs(self.core.cfg.idle_unload_secs.max(1));
        }
        false
    }

    /// The actor stops: a live listing goes (persistent rooms stay listed
    /// from the store), and so does its count against the creator's limit.
    fn stopping(&mut self) {
        self.core.set_listing(&self.node, None);
        if let Some(o) = self.temp_owner.take() {
            self.core.add_temp_owned(&o, -1);
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(t) = self.locked_until
            && t <= now
        {
            tracing::info!(room = %self.jid, "room not configured in time; default configuration taken");
            self.unlock().await;
        }
        let expired: Vec<String> = self
            .pending_iqs
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(p) = self.pending_iqs.remove(&k) {
                let err = stanza::build(
                    "iq",
                    Some(&self.occupant_jid(&p.to_nick)),
                    Some(&p.requester),
                    Some("error"),
                    Some(&p.original_id),
                )
                .append(StanzaError::new("recipient-unavailable").to_element())
                .build();
                self.send_direct(err);
            }
        }
    }

    /// After each stanza: remove the ghosts found and send what is queued
    /// for the router.
    async fn finish_step(&mut self) {
        while !self.ghosts.is_empty() {
            let ghosts = std::mem::take(&mut self.ghosts);
            for g in ghosts {
                if let Some(nick) = self.by_jid.get(&g).cloned() {
                    tracing::debug!(room = %self.jid, jid = %g, "occupant session gone; removing it");
                    self.remove_session(&nick, &g, &[status::TECHNICAL], Extra::default(), false)
                        .await;
                }
            }
        }
        let out = std::mem::take(&mut self.outbox);
        for el in out {
            self.server.route(el).await;
        }
    }

    pub(crate) fn occupant_jid(&self, nick: &str) -> String {
        format!("{}/{nick}", self.jid_str)
    }

    pub(crate) fn err(&self, e: StanzaError) -> StanzaError {
        with_by(e, &self.node, &self.core.domain)
    }

    /// The affiliation of a user: the entry for its bare JID, else for its
    /// domain; server administrators count as owners.
    pub(crate) fn affiliation_of(&self, bare: &BareJid) -> Affiliation {
        if self.server.is_admin(&Jid::from(bare.clone())) {
            return Affiliation::Owner;
        }
        if let Some(e) = self.affiliations.get(bare) {
            return e.affiliation;
        }
        if bare.node().is_some()
            && let Ok(d) = BareJid::new(bare.domain().as_str())
            && let Some(e) = self.affiliations.get(&d)
        {
            return e.affiliation;
        }
        Affiliation::None
    }

    /// The nickname reserved for a user, if any.
    pub(crate) fn reserved_nick(&self, bare: &BareJid) -> Option<&str> {
        self.affiliations.get(bare).and_then(|e| e.nick.as_deref())
    }

    /// Who reserved this nickname (other than `bare`)?
    fn nick_reserved_by_other(&self, nick: &str, bare: &BareJid) -> bool {
        self.affiliations.iter().any(|(j, e)| {
            j != bare && e.affiliation != Affiliation::Outcast && e.nick.as_deref() == Some(nick)
        })
    }

    pub(crate) fn owners(&self) -> Vec<String> {
        self.list_of(Affiliation::Owner)
    }

    pub(crate) fn list_of(&self, a: Affiliation) -> Vec<String> {
        self.affiliations
            .iter()
            .filter(|(_, e)| e.affiliation == a)
            .map(|(j, _)| j.to_string())
            .collect()
    }

    fn next_id(&mut self) -> i64 {
        self.last_id = now_micros().max(self.last_id + 1);
        self.last_id
    }

    pub(crate) fn view(&self, occ: &Occupant) -> OccView {
        let primary = occ.primary();
        OccView {
            nick: occ.nick.clone(),
            occupant_id: occ.occupant_id.clone(),
            role: occ.role,
            affiliation: self.affiliation_of(&occ.bare),
            jid: primary.map(|s| s.jid_str.clone()).unwrap_or_default(),
            children: primary
                .map(|s| s.presence.children().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Presence from an occupant's JID (XEP-0045 sections 7.2.3, 7.2.4).
    pub(crate) fn presence_el(
        &self,
        v: &OccView,
        unavailable: bool,
        with_jid: bool,
        codes: &[u16],
        extra: &Extra,
    ) -> Element {
        let mut b =
            Element::builder("presence", ns::CLIENT).attr(name("from"), self.occupant_jid(&v.nick));
        if unavailable {
            b = b.attr(name("type"), "unavailable");
            for s in &extra.status {
                b = b.append(s.clone());
            }
        } else {
            for c in &v.children {
                b = b.append(c.clone());
            }
        }
        let mut item = Element::builder("item", ns::MUC_USER)
            .attr(name("affiliation"), v.affiliation.as_str())
            .attr(
                name("role"),
                if unavailable { "none" } else { v.role.as_str() },
            );
        if with_jid && !v.jid.is_empty() {
            item = item.attr(name("jid"), v.jid.as_str());
        }
        if let Some(n) = &extra.item_nick {
            item = item.attr(name("nick"), n.as_str());
        }
        if let Some(a) = &extra.actor {
            item = item.append(
                Element::builder("actor", ns::MUC_USER)
                    .attr(name("nick"), a.as_str())
                    .build(),
            );
        }
        if let Some(r) = &extra.reason {
            item = item.append(
                Element::builder("reason", ns::MUC_USER)
                    .append(r.as_str())
                    .build(),
            );
        }
        let mut x = Element::builder("x", ns::MUC_USER).append(item.build());
        if let Some(d) = &extra.destroy {
            x = x.append(d.clone());
        }
        for c in codes {
            x = x.append(status_el(*c));
        }
        b.append(x.build())
            .append(occupant_id_el(&v.occupant_id))
            .build()
    }

    /// Tell every occupant about a change of occupant `v`: its own sessions
    /// get self-presence (110 and `self_codes`), moderators (or everyone
    /// in a non-anonymous room) see its real JID. `also_self` are sessions
    /// no longer in the room that must get the self-presence too (leaving,
    /// kicked). Presence of roles not broadcast goes to the occupant only.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn announce(
        &mut self,
        v: &OccView,
        unavailable: bool,
        codes: &[u16],
        self_codes: &[u16],
        extra: &Extra,
        also_self: &[(String, Option<Arc<Session>>)],
        to_others: bool,
    ) {
        let mut sc = vec![status::SELF];
        sc.extend_from_slice(self_codes);
        sc.extend_from_slice(codes);
        sc.sort_unstable();
        sc.dedup();
        let mut self_el = self.presence_el(v, unavailable, true, &sc, extra);
        if let Some(id) = &extra.self_id {
            stanza::set_attr(&mut self_el, "id", id.as_str());
        }
        let self_st = Arc::new(SharedStanza::new(self_el));
        let broadcast = to_others && self.config.broadcasts(v.role);
        let non_anon = self.config.non_anonymous;
        let mut public: Option<Arc<SharedStanza>> = None;
        let mut full: Option<Arc<SharedStanza>> = None;
        let mut remote = std::mem::take(&mut self.outbox);
        let mut gone = Vec::new();
        for occ in self.occupants.values() {
            let st = if occ.nick == v.nick {
                &self_st
            } else if !broadcast {
                continue;
            } else if non_anon || occ.role == Role::Moderator {
                full.get_or_insert_with(|| {
                    Arc::new(SharedStanza::new(self.presence_el(
                        v,
                        unavailable,
                        true,
                        codes,
                        extra,
                    )))
                })
            } else {
                public.get_or_insert_with(|| {
                    Arc::new(SharedStanza::new(self.presence_el(
                        v,
                        unavailable,
                        false,
                        codes,
                        extra,
                    )))
                })
            };
            for s in &occ.sessions {
                if !deliver(s, st, &mut remote) {
                    gone.push(s.jid.clone());
                }
            }
        }
        for (jid, local) in also_self {
            match local {
                Some(sess) => {
                    try_mailbox(sess, shared_msg(&self_st, sess));
                }
                None => remote.push(self_st.element_for(jid)),
            }
        }
        self.outbox = remote;
        self.ghosts.extend(gone);
    }

    /// The cached available presence of an occupant (public, with JID).
    fn cached_presence(&mut self, nick: &str) -> Option<[Arc<SharedStanza>; 2]> {
        let occ = self.occupants.get(nick)?;
        if let Some(c) = &occ.cached {
            return Some(c.clone());
        }
        let v = self.view(occ);
        let e = Extra::default();
        let pair = [
            Arc::new(SharedStanza::new(self.presence_el(
                &v,
                false,
                false,
                &[],
                &e,
            ))),
            Arc::new(SharedStanza::new(self.presence_el(
                &v,
                false,
                true,
                &[],
                &e,
            ))),
        ];
        if let Some(o) = self.occupants.get_mut(nick) {
            o.cached = Some(pair.clone());
        }
        Some(pair)
    }

    pub(crate) fn invalidate(&mut self, nick: &str) {
        if let Some(o) = self.occupants.get_mut(nick) {
            o.cached = None;
        }
    }

    /// Send an element (with `to` set) to one occupant session.
    fn send_to_session(&mut self, s_jid: &str, local: &Option<Arc<Session>>, el: Element) {
        match local {
            Some(sess) => {
                if !try_mailbox(sess, SessionMsg::Stanza(el))
                    && let Ok(j) = FullJid::new(s_jid)
                {
                    self.ghosts.push(j);
                }
            }
            None => self.outbox.push(el),
        }
    }

    /// Send an element (with `to`) to whoever it is for: straight into a
    /// local session's mailbox when there is one (keeps the order with
    /// fan-out), else through the router.
    pub(crate) fn send_direct(&mut self, el: Element) {
        if let Ok(Some(to)) = stanza::jid_attr(&el, "to")
            && let Ok(full) = to.try_into_full()
            && self.server.config.is_local_domain(full.domain().as_str())
            && let Some(sess) = self.server.sessions.get(&full)
        {
            if let Err(TrySendError::Full(SessionMsg::Stanza(el))) =
                sess.tx.try_send(SessionMsg::Stanza(el))
            {
                self.outbox.push(el);
            }
            return;
        }
        self.outbox.push(el);
    }

    /// An error reply from the room (`by` set).
    pub(crate) fn reply_error(&mut self, original: &Element, e: StanzaError) {
        let e = self.err(e);
        let reply = if original.name() == "presence" {
            // Presence errors carry only the muc <x/> (never a password back).
            let mut p = stanza::build(
                "presence",
                original.attr("to"),
                original.attr("from"),
                Some("error"),
                original.attr("id"),
            );
            if original.has_child("x", ns::MUC) {
                p = p.append(Element::bare("x", ns::MUC));
            }
            Some(p.append(e.to_element()).build())
        } else {
            stanza::error_reply(original, &e)
        };
        if let Some(r) = reply {
            self.send_direct(r);
        }
    }

    pub(crate) fn reply_result(&mut self, iq: &Element, payload: Option<Element>) {
        let r = stanza::iq_result(iq, payload);
        self.send_direct(r);
    }

    async fn handle(&mut self, msg: RoomMsg) {
        match msg {
            RoomMsg::SessionGone { jid, session_id } => {
                let Some(nick) = self.by_jid.get(&jid).cloned() else {
                    return;
                };
                let same = self
                    .occupants
                    .get(&nick)
                    .and_then(|o| o.sessions.iter().find(|s| s.jid == jid))
                    .and_then(|s| s.local.as_ref())
                    .is_none_or(|l| l.id == session_id);
                if same {
                    self.remove_session(&nick, &jid, &[], Extra::default(), false)
                        .await;
                }
            }
            RoomMsg::Stanza(el) => {
                let (Ok(Some(from)), Ok(Some(to))) =
                    (stanza::jid_attr(&el, "from"), stanza::jid_attr(&el, "to"))
                else {
                    return;
                };
                let nick = to.resource().map(|r| r.as_str().to_owned());
                match stanza::kind(&el) {
                    Some(Kind::Presence) => self.on_presence(el, from, nick).await,
                    Some(Kind::Message) => self.on_message(el, from, nick).await,
                    Some(Kind::Iq) => self.on_iq(el, from, nick).await,
                    None => {}
                }
            }
        }
    }

    // ----- presence -------------------------------------------------------

    async fn on_presence(&mut self, p: Element, from: Jid, nick: Option<String>) {
        let typ = p.attr("type");
        if typ == Some("error") {
            if let Ok(full) = from.try_as_full()
                && let Some(n) = self.by_jid.get(full).cloned()
                && is_delivery_error(&p)
            {
                self.remove_session(&n, full, &[status::TECHNICAL], Extra::default(), false)
                    .await;
            }
            return;
        }
        let full = match from.try_as_full() {
            Ok(f) => f.clone(),
            Err(_) => {
                if typ.is_none() {
                    self.reply_error(
                        &p,
                        StanzaError::bad_request().with_text("joining needs a full JID"),
                    );
                }
                return;
            }
        };
        match typ {
            None => match nick {
                None => self.reply_error(
                    &p,
                    StanzaError::jid_malformed().with_text("no nickname given"),
                ),
                Some(n) => self.on_available(p, full, n).await,
            },
            Some("unavailable") => {
                if let Some(n) = self.by_jid.get(&full).cloned() {
                    let status: Vec<Element> = p
                        .children()
                        .filter(|c| c.is("status", ns::CLIENT))
                        .take(1)
                        .cloned()
                        .collect();
                    let extra = Extra {
                        status,
                        ..Default::default()
                    };
                    self.remove_session(&n, &full, &[], extra, false).await;
                }
            }
            // Probes, subscriptions: nothing to do for a room.
            _ => {}
        }
    }

    async fn on_available(&mut self, p: Element, from: FullJid, nick: String) {
        if !valid_nick(&nick, self.core.cfg.max_nick_chars) {
            self.reply_error(
                &p,
                StanzaError::not_acceptable().with_text("this nickname is not allowed"),
            );
            return;
        }
        let muc_x = p.get_child("x", ns::MUC).cloned();
        match self.by_jid.get(&from).cloned() {
            Some(cur) if cur == nick => {
                if let Some(x) = &muc_x {
                    // A join from a joined session: it lost track; send
                    // everything again (XEP-0045 section 7.2.1).
                    self.update_session_presence(&nick, &from, &p);
                    self.send_join_state(&nick, &from, &[], Some(x), p.attr("id"));
                } else {
                    self.update_session_presence(&nick, &from, &p);
                }
            }
            Some(cur) => self.change_nick(p, from, cur, nick).await,
            None => self.join(p, from, nick, muc_x).await,
        }
    }

    /// A presence update of a session: re-broadcast if what others see
    /// changed.
    fn update_session_presence(&mut self, nick: &str, from: &FullJid, p: &Element) {
        let clean = sanitize_presence(p);
        let prio = crate::c2s::session::presence_priority(p);
        let Some(occ) = self.occupants.get_mut(nick) else {
            return;
        };
        let before = occ.primary().map(|s| (s.jid.clone(), s.presence.clone()));
        if let Some(s) = occ.sessions.iter_mut().find(|s| &s.jid == from) {
            if s.presence == clean && s.priority == prio {
                return;
            }
            s.presence = clean;
            s.priority = prio;
        }
        let after = occ.primary().map(|s| (s.jid.clone(), s.presence.clone()));
        if before != after {
            occ.cached = None;
            let v = self.view(&self.occupants[nick]);
            self.announce(&v, false, &[], &[], &Extra::default(), &[], true);
        }
    }

    async fn join(&mut self, p: Element, from: FullJid, nick: String, muc_x: Option<Element>) {
        let bare = from.to_bare();
        let mut created = false;
        if !self.exists {
            match self.may_create(&from).await {
                Ok(()) => created = true,
                Err(e) => {
                    self.reply_error(&p, e);
                    return;
                }
            }
        }
        let aff = if created {
            Affiliation::Owner
        } else {
            self.affiliation_of(&bare)
        };
        let existing_same_user = self
            .occupants
            .get(&nick)
            .map(|o| o.bare == bare)
            .unwrap_or(false);
        if !created {
            if self.locked_until.is_some() && aff != Affiliation::Owner {
                self.reply_error(
                    &p,
                    StanzaError::item_not_found().with_text("the room is not configured yet"),
                );
                return;
            }
            if aff == Affiliation::Outcast {
                self.reply_error(
                    &p,
                    StanzaError::forbidden().with_text("you are banned from this room"),
                );
                return;
            }
            if let Some(o) = self.occupants.get(&nick)
                && o.bare != bare
            {
                self.reply_error(
                    &p,
                    StanzaError::conflict().with_text("this nickname is in use"),
                );
                return;
            }
            if self.nick_reserved_by_other(&nick, &bare) {
                self.reply_error(
                    &p,
                    StanzaError::conflict().with_text("this nickname is reserved"),
                );
                return;
            }
            if self.config.members_only && aff < Affiliation::Member {
                self.reply_error(
                    &p,
                    StanzaError::new("registration-required")
                        .with_text("this room is for members only"),
                );
                return;
            }
            if self.config.password_protected && !existing_same_user {
                let given = muc_x
                    .as_ref()
                    .and_then(|x| x.get_child("password", ns::MUC))
                    .map(|p| p.text());
                if given.as_deref() != Some(self.config.password.as_str()) {
                    self.reply_error(
                        &p,
                        StanzaError::new("not-authorized")
                            .with_text("a password is required to enter this room"),
                    );
                    return;
                }
            }
            if !existing_same_user {
                let limit = self.config.occupant_limit(&self.core.cfg);
                let slack = if aff >= Affiliation::Admin {
                    limit / 10 + 5
                } else {
                    0
                };
                if self.occupants.len() >= limit + slack {
                    self.reply_error(
                        &p,
                        StanzaError::service_unavailable()
                            .with_type(ErrorType::Wait)
                            .with_text("the room is full"),
                    );
                    return;
                }
            }
        }
        if !self.by_jid.keys().any(|j| j.to_bare() == bare)
            && self.core.joined_count(&bare) >= self.core.cfg.max_joined_rooms_per_user
        {
            self.reply_error(
                &p,
                StanzaError::resource_constraint()
                    .with_text("you are in too many rooms of this service"),
            );
            return;
        }
        if created {
            self.create(&bare).await;
        }
        // Enter.
        let local = if self.server.config.is_local_domain(from.domain().as_str()) {
            self.server.sessions.get(&from)
        } else {
            None
        };
        self.seq += 1;
        let session = OccSession {
            jid: from.clone(),
            jid_str: from.to_string(),
            presence: sanitize_presence(&p),
            priority: crate::c2s::session::presence_priority(&p),
            local,
            seq: self.seq,
        };
        self.by_jid.insert(from.clone(), nick.clone());
        self.core.index_join(&from, &self.node);
        self.empty_since = None;
        let mut self_codes = vec![];
        if self.config.non_anonymous {
            self_codes.push(status::NON_ANONYMOUS);
        }
        if self.config.archive {
            self_codes.push(status::LOGGING_ON);
        }
        if created {
            self_codes.push(status::CREATED);
        }
        if existing_same_user {
            // Another session under the same nickname (multi-session nick).
            let occ = self.occupants.get_mut(&nick).expect("checked above");
            let before = occ.primary().map(|s| s.jid.clone());
            occ.sessions.push(session);
            let after = occ.primary().map(|s| s.jid.clone());
            occ.cached = None;
            let v = self.view(&self.occupants[&nick]);
            if before != after {
                self.announce(&v, false, &[], &[], &Extra::default(), &[], true);
            }
            self.send_join_state(&nick, &from, &self_codes, muc_x.as_ref(), p.attr("id"));
            return;
        }
        let role = default_role(aff, self.config.moderated);
        let occ = Occupant {
            nick: nick.clone(),
            bare: bare.clone(),
            role,
            occupant_id: occupant_id(&self.secret, &self.jid_str, &bare),
            sessions: vec![session],
            bucket: TokenBucket::new(self.core.cfg.occupant_burst),
            last_voice_request: None,
            cached: None,
        };
        self.occupants.insert(nick.clone(), occ);
        // Others see the newcomer; the newcomer first gets the room roster.
        self.send_roster(&nick, &from);
        let v = self.view(&self.occupants[&nick]);
        self.announce_join(&v, p.attr("id"), &self_codes);
        self.send_history_and_subject(&from, muc_x.as_ref());
        tracing::debug!(room = %self.jid, %nick, jid = %from, "occupant joined");
    }

    /// The new occupant's presence to everyone; its own sessions other than
    /// `joiner` get the plain self-presence, the joiner the one with codes.
    fn announce_join(&mut self, v: &OccView, id: Option<&str>, self_codes: &[u16]) {
        // Others, and the occupant's only session: the joiner (with the id
        // of its join presence).
        let extra = Extra {
            self_id: id.map(str::to_owned),
            ..Default::default()
        };
        self.announce(v, false, &[], self_codes, &extra, &[], true);
    }

    /// Room roster, self-presence, history and subject for one session
    /// (a second session of a nick, or a re-join).
    fn send_join_state(
        &mut self,
        nick: &str,
        to: &FullJid,
        self_codes: &[u16],
        x: Option<&Element>,
        id: Option<&str>,
    ) {
        self.send_roster(nick, to);
        let Some(occ) = self.occupants.get(nick) else {
            return;
        };
        let v = self.view(occ);
        let mut codes = vec![status::SELF];
        codes.extend_from_slice(self_codes);
        let mut el = self.presence_el(&v, false, true, &codes, &Extra::default());
        stanza::set_attr(&mut el, "to", to.to_string());
        if let Some(id) = id {
            stanza::set_attr(&mut el, "id", id);
        }
        let local = self.session_of(to);
        self.send_to_session(&to.to_string(), &local, el);
        self.send_history_and_subject(to, x);
    }

    fn session_of(&self, jid: &FullJid) -> Option<Arc<Session>> {
        let nick = self.by_jid.get(jid)?;
        self.occupants
            .get(nick)?
            .sessions
            .iter()
            .find(|s| &s.jid == jid)?
            .local
            .clone()
    }

    /// Presence of every other occupant to one session.
    pub(crate) fn send_roster(&mut self, nick: &str, to: &FullJid) {
        let sees_jids = self.config.non_anonymous
            || self
                .occupants
                .get(nick)
                .map(|o| o.role == Role::Moderator)
                .unwrap_or(false);
        let local = self.session_of(to);
        let to_str = to.to_string();
        let others: Vec<String> = self
            .occupants
            .values()
            .filter(|o| o.nick != nick && self.config.broadcasts(o.role))
            .map(|o| o.nick.clone())
            .collect();
        for other in others {
            let Some(pair) = self.cached_presence(&other) else {
                continue;
            };
            let st = &pair[sees_jids as usize];
            match &local {
                Some(sess) => {
                    if !try_mailbox(sess, shared_msg(st, sess)) {
                        self.ghosts.push(to.clone());
                        return;
                    }
                }
                None => self.outbox.push(st.element_for(&to_str)),
            }
        }
    }

    fn send_history_and_subject(&mut self, to: &FullJid, x: Option<&Element>) {
        let local = self.session_of(to);
        let to_str = to.to_string();
        // Without the MUC <x/> (groupchat 1.0 or a client that lost track)
        // no history is sent.
        if let Some(x) = x {
            let req = HistoryRequest::parse(x);
            let max = (self.config.max_history_fetch as usize).min(self.core.cfg.max_history);
            let default = self.core.cfg.default_history.min(max);
            let items: Vec<Element> = req
                .select(&self.history, default, max, now_micros())
                .into_iter()
                .map(|h| {
                    let mut el = h.stanza.clone();
                    el.append_child(stanza::delay(&self.jid_str, h.id));
                    stanza::set_attr(&mut el, "to", to_str.as_str());
                    el
                })
                .collect();
            for el in items {
                self.send_to_session(&to_str, &local, el);
            }
        }
        let from = if self.subject.nick.is_empty() {
            self.jid_str.clone()
        } else {
            self.occupant_jid(&self.subject.nick)
        };
        let mut b = stanza::build(
            "message",
            Some(&from),
            Some(&to_str),
            Some("groupchat"),
            Some(&stanza::new_id()),
        )
        .append(
            Element::builder("subject", ns::CLIENT)
                .append(self.subject.text.as_str())
                .build(),
        );
        if self.subject.set {
            b = b.append(stanza::delay(&self.jid_str, self.subject.stamp));
        }
        self.send_to_session(&to_str, &local, b.build());
    }

    /// May `from` create this room? (service policy and per-user limit)
    async fn may_create(&self, from: &FullJid) -> Result<(), StanzaError> {
        let cfg = &self.core.cfg;
        let local = self.server.config.is_local_domain(from.domain().as_str());
        let allowed = match cfg.room_creation {
            RoomCreation::Anyone => true,
            RoomCreation::Local => local,
            RoomCreation::Admins => self.server.is_admin(&Jid::from(from.clone())),
        };
        if !allowed {
            return Err(StanzaError::not_allowed().with_text("room creation is restricted"));
        }
        let bare = from.to_bare();
        if self.server.is_admin(&Jid::from(bare.clone())) {
            return Ok(());
        }
        let owned = match self
            .server
            .store
            .count_owned_rooms(&self.core.domain, &bare.to_string())
            .await
        {
            Ok(n) => n as usize,
            Err(e) => {
                tracing::error!(error = %e, "cannot count owned rooms");
                return Err(StanzaError::internal());
            }
        } + self.core.temp_owned(&bare);
        if owned >= cfg.max_rooms_per_user {
            return Err(
                StanzaError::not_allowed().with_text("you own too many rooms on this service")
            );
        }
        Ok(())
    }

    async fn create(&mut self, creator: &BareJid) {
        self.exists = true;
        self.config = RoomConfig::new(&self.core.cfg);
        self.created_at = now_micros();
        self.affiliations.clear();
        self.affiliations.insert(
            creator.clone(),
            AffEntry {
                affiliation: Affiliation::Owner,
                nick: None,
                reason: None,
            },
        );
        self.subject = Subject::default();
        self.history.clear();
        self.core.add_temp_owned(creator, 1);
        self.temp_owner = Some(creator.clone());
        if self.core.cfg.lock_new_rooms {
            self.locked_until =
                Some(Instant::now() + Duration::from_secs(self.core.cfg.lock_timeout_secs.max(1)));
            self.publish_listing();
        } else {
            self.unlock().await;
        }
        tracing::info!(room = %self.jid, owner = %creator, "room created");
    }

    /// The room takes its configuration: it becomes visible and, if
    /// persistent, stored.
    pub(crate) async fn unlock(&mut self) {
        self.locked_until = None;
        if self.config.persistent {
            self.persist_all().await;
        }
        self.publish_listing();
    }

    // ----- leaving --------------------------------------------------------

    /// One session leaves (unavailable presence, session end, ghost).
    pub(crate) async fn remove_session(
        &mut self,
        nick: &str,
        jid: &FullJid,
        codes: &[u16],
        extra: Extra,
        _quiet: bool,
    ) {
        let Some(occ) = self.occupants.get_mut(nick) else {
            return;
        };
        let Some(pos) = occ.sessions.iter().position(|s| &s.jid == jid) else {
            return;
        };
        let before = occ.primary().map(|s| s.jid.clone());
        let leaving = occ.sessions.remove(pos);
        self.by_jid.remove(jid);
        self.core.index_leave(jid, &self.node);
        let remaining = self
            .occupants
            .get(nick)
            .map(|o| o.sessions.len())
            .unwrap_or(0);
        if remaining > 0 {
            // Multi-session nick: only this session leaves.
            let occ = &self.occupants[nick];
            let mut v = self.view(occ);
            v.jid = leaving.jid_str.clone();
            let mut sc = vec![status::SELF];
            sc.extend_from_slice(codes);
            let mut el = self.presence_el(&v, true, true, &sc, &extra);
            stanza::set_attr(&mut el, "to", leaving.jid_str.as_str());
            self.send_to_session(&leaving.jid_str, &leaving.local, el);
            let after = self.occupants[nick].primary().map(|s| s.jid.clone());
            if before != after {
                self.invalidate(nick);
                let v = self.view(&self.occupants[nick]);
                self.announce(&v, false, &[], &[], &Extra::default(), &[], true);
            }
            return;
        }
        let Some(occ) = self.occupants.remove(nick) else {
            return;
        };
        let mut v = self.view(&occ);
        v.jid = leaving.jid_str.clone();
        self.announce(
            &v,
            true,
            codes,
            &[],
            &extra,
            &[(leaving.jid_str.clone(), leaving.local.clone())],
            true,
        );
        tracing::debug!(room = %self.jid, %nick, "occupant left");
        self.after_departure().await;
    }

    /// Remove an occupant with all its sessions (kick, ban, membership
    /// loss, ...), telling everyone why.
    pub(crate) async fn remove_occupant(&mut self, nick: &str, codes: &[u16], extra: Extra) {
        let Some(occ) = self.occupants.remove(nick) else {
            return;
        };
        let mut leaving = Vec::new();
        for s in &occ.sessions {
            self.by_jid.remove(&s.jid);
            self.core.index_leave(&s.jid, &self.node);
            leaving.push((s.jid_str.clone(), s.local.clone()));
        }
        let v = self.view(&occ);
        self.announce(&v, true, codes, &[], &extra, &leaving, true);
        self.after_departure().await;
    }

    /// Someone left: a locked room whose owner left is destroyed; an empty
    /// temporary room vanishes.
    async fn after_departure(&mut self) {
        if self.locked_until.is_some()
            && !self
                .occupants
                .values()
                .any(|o| self.affiliation_of(&o.bare) == Affiliation::Owner)
        {
            tracing::info!(room = %self.jid, "owner left before configuring the room; destroyed");
            self.destroy(None, None, None).await;
            return;
        }
        if self.occupants.is_empty() {
            self.empty_since = Some(Instant::now());
            if !self.config.persistent && self.exists {
                tracing::info!(room = %self.jid, "last occupant left; temporary room destroyed");
                self.destroy(None, None, None).await;
            }
        }
    }

    /// Destroy the room: everyone out (with the alternate venue and reason),
    /// everything stored removed.
    pub(crate) async fn destroy(
        &mut self,
        alternate: Option<&str>,
        reason: Option<&str>,
        password: Option<&str>,
    ) {
        let mut d = Element::builder("destroy", ns::MUC_USER);
        if let Some(a) = alternate {
            d = d.attr(name("jid"), a);
        }
        if let Some(r) = reason {
            d = d.append(Element::builder("reason", ns::MUC_USER).append(r).build());
        }
        if let Some(p) = password {
            d = d.append(Element::builder("password", ns::MUC_USER).append(p).build());
        }
        let extra = Extra {
            destroy: Some(d.build()),
            ..Default::default()
        };
        let nicks: Vec<String> = self.occupants.keys().cloned().collect();
        for nick in nicks {
            let Some(occ) = self.occupants.remove(&nick) else {
                continue;
            };
            let v = self.view(&occ);
            let el = self.presence_el(&v, true, true, &[status::SELF], &extra);
            let st = Arc::new(SharedStanza::new(el));
            for s in &occ.sessions {
                self.by_jid.remove(&s.jid);
                self.core.index_leave(&s.jid, &self.node);
                let mut remote = Vec::new();
                deliver(s, &st, &mut remote);
                self.outbox.extend(remote);
            }
        }
        if self.persisted {
            if let Err(e) = self
                .server
                .store
                .delete_room(&self.core.domain, &self.node)
                .await
            {
                tracing::error!(room = %self.jid, error = %e, "cannot delete the stored room");
            }
            self.persisted = false;
        }
        super::archive::delete(&self.server, &self.jid_str).await;
        self.destroyed = true;
        self.exists = false;
        self.history.clear();
        self.publish_listing();
        tracing::info!(room = %self.jid, "room destroyed");
    }

    // ----- nickname change ------------------------------------------------

    async fn change_nick(&mut self, p: Element, from: FullJid, old: String, new: String) {
        let bare = from.to_bare();
        if self.occupants.contains_key(&new) {
            self.reply_error(
                &p,
                StanzaError::conflict().with_text("this nickname is in use"),
            );
            return;
        }
        if self.nick_reserved_by_other(&new, &bare) {
            self.reply_error(
                &p,
                StanzaError::conflict().with_text("this nickname is reserved"),
            );
            return;
        }
        let Some(occ) = self.occupants.get(&old) else {
            return;
        };
        let v = self.view(occ);
        let extra = Extra {
            item_nick: Some(new.clone()),
            ..Default::default()
        };
        self.announce(&v, true, &[status::NICK_CHANGED], &[], &extra, &[], true);
        let Some(mut occ) = self.occupants.remove(&old) else {
            return;
        };
        occ.nick = new.clone();
        occ.cached = None;
        for s in &occ.sessions {
            self.by_jid.insert(s.jid.clone(), new.clone());
        }
        if let Some(s) = occ.sessions.iter_mut().find(|s| s.jid == from) {
            s.presence = sanitize_presence(&p);
            s.priority = crate::c2s::session::presence_priority(&p);
        }
        self.occupants.insert(new.clone(), occ);
        if self.subject.nick == old {
            // The subject stays attributed to the same person.
            self.subject.nick = new.clone();
        }
        let v = self.view(&self.occupants[&new]);
        self.announce(&v, false, &[], &[], &Extra::default(), &[], true);
        tracing::debug!(room = %self.jid, %old, %new, "nickname changed");
    }

    // ----- messages -------------------------------------------------------

    async fn on_message(&mut self, m: Element, from: Jid, nick: Option<String>) {
        let typ = stanza::stanza_type(&m).to_owned();
        let full = from.try_as_full().ok().cloned();
        let sender = full.as_ref().and_then(|f| self.by_jid.get(f).cloned());
        if typ == "error" {
            if let (Some(f), Some(n)) = (&full, &sender)
                && is_delivery_error(&m)
            {
                self.remove_session(n, f, &[status::TECHNICAL], Extra::default(), false)
                    .await;
            }
            // An error about a private message goes back to that occupant.
            if let (Some(target), Some(s)) = (nick, sender)
                && self.occupants.contains_key(&target)
            {
                self.forward_private(&m, &s, &target);
            }
            return;
        }
        if !self.exists || self.locked_until.is_some() && sender.is_none() {
            self.reply_error(&m, StanzaError::item_not_found().with_text("no such room"));
            return;
        }
        if let Some(target) = nick {
            return self.on_private(m, sender, target, &typ);
        }
        if typ == "groupchat" {
            match (full, sender) {
                (Some(f), Some(s)) => self.on_groupchat(m, f, s).await,
                _ => self.reply_error(
                    &m,
                    StanzaError::not_acceptable().with_text("you are not in this room"),
                ),
            }
            return;
        }
        if let Some(x) = m.get_child("x", ns::MUC_USER).cloned() {
            if x.has_child("invite", ns::MUC_USER) {
                return self.on_invite(m, from, sender, &x).await;
            }
            if let Some(d) = x.get_child("decline", ns::MUC_USER) {
                return self.on_decline(&m, &from, d);
            }
        }
        if let Some(form) = Form::find(&m)
            && form.form_type() == Some(NS_MUC_REQUEST)
        {
            return match (full, sender) {
                (Some(f), Some(s)) => self.on_voice_form(m, f, s, form).await,
                _ => self.reply_error(
                    &m,
                    StanzaError::not_acceptable().with_text("you are not in this room"),
                ),
            };
        }
        self.reply_error(
            &m,
            StanzaError::bad_request().with_text("messages to the room must be of type groupchat"),
        );
    }

    fn take_tokens(&mut self, nick: &str) -> Result<(), StanzaError> {
        let cfg = &self.core.cfg;
        let (rate, burst) = (cfg.occupant_rate, cfg.occupant_burst);
        if let Some(o) = self.occupants.get_mut(nick)
            && !o.bucket.take(rate, burst)
        {
            return Err(StanzaError::policy_violation()
                .with_type(ErrorType::Wait)
                .with_text("you are sending too fast to this room; wait a moment"));
        }
        Ok(())
    }

    async fn on_groupchat(&mut self, m: Element, from: FullJid, nick: String) {
        let role = self.occupants[&nick].role;
        let is_subject = super::archive::is_subject_change(&m);
        if is_subject {
            let allowed = role == Role::Moderator
                || (self.config.change_subject && role >= Role::Participant);
            if !allowed {
                self.reply_error(
                    &m,
                    StanzaError::forbidden().with_text("you may not change the subject"),
                );
                return;
            }
        } else if role < Role::Participant {
            self.reply_error(
                &m,
                StanzaError::forbidden().with_text("you need voice to speak in this room"),
            );
            return;
        }
        if let Err(e) = self.take_tokens(&nick) {
            self.reply_error(&m, e);
            return;
        }
        let (rate, burst) = (self.core.cfg.room_rate, self.core.cfg.room_burst);
        if !self.bucket.take(rate, burst) {
            self.reply_error(
                &m,
                StanzaError::resource_constraint()
                    .with_text("this room receives too many messages; try again shortly"),
            );
            return;
        }
        if is_subject {
            let text = m
                .get_child("subject", ns::CLIENT)
                .map(|s| s.text())
                .unwrap_or_default();
            if text.chars().count() > self.core.cfg.max_subject_chars {
                self.reply_error(
                    &m,
                    StanzaError::not_acceptable().with_text("the subject is too long"),
                );
                return;
            }
        }
        let occ_id = self.occupants[&nick].occupant_id.clone();
        let mut out = stanza::build(
            "message",
            Some(&self.occupant_jid(&nick)),
            None,
            Some("groupchat"),
            Some(m.attr("id").unwrap_or(&stanza::new_id())),
        )
        .build();
        if let Some(lang) = m.attr_ns(ns::XML, "lang") {
            out.attrs_mut().insert(
                rxml::Namespace::from(ns::XML),
                name("lang"),
                lang.to_owned(),
            );
        }
        for c in m.children() {
            if c.is("stanza-id", ns::SID)
                || c.is("occupant-id", NS_OCCUPANT_ID)
                || c.is("x", ns::MUC_USER)
                || c.is("error", ns::CLIENT)
            {
                continue;
            }
            out.append_child(c.clone());
        }
        out.append_child(occupant_id_el(&occ_id));
        let mut id = self.next_id();
        if self.config.archive
            && (is_subject || archivable(&out))
            && let Some(aid) =
                super::archive::append(&self.server, &self.jid_str, &nick, &from, &mut out).await
        {
            id = aid.micros();
            self.last_id = self.last_id.max(id);
        }
        if is_subject {
            self.subject = Subject {
                text: out
                    .get_child("subject", ns::CLIENT)
                    .map(|s| s.text())
                    .unwrap_or_default(),
                nick: nick.clone(),
                stamp: id,
                set: true,
            };
            if self.persisted {
                self.persist_room().await;
            }
        } else if archivable(&out) {
            self.history.push_back(HistItem::new(id, out.clone()));
            while self.history.len() > self.core.cfg.max_history {
                self.history.pop_front();
            }
        }
        // Chat states and the like are reflected, not kept.
        let st = Arc::new(SharedStanza::new(out));
        self.fanout(&st);
    }

    /// The same bytes to every session of every occupant.
    pub(crate) fn fanout(&mut self, st: &Arc<SharedStanza>) {
        let mut remote = std::mem::take(&mut self.outbox);
        let mut gone = Vec::new();
        for occ in self.occupants.values() {
            for s in &occ.sessions {
                if !deliver(s, st, &mut remote) {
                    gone.push(s.jid.clone());
                }
            }
        }
        self.outbox = remote;
        self.ghosts.extend(gone);
    }

    /// A message from the room itself (status codes, forms) to everyone.
    pub(crate) fn room_notice(&mut self, codes: &[u16]) {
        let mut x = Element::builder("x", ns::MUC_USER);
        for c in codes {
            x = x.append(status_el(*c));
        }
        let el = stanza::build(
            "message",
            Some(&self.jid_str),
            None,
            Some("groupchat"),
            Some(&stanza::new_id()),
        )
        .append(x.build())
        .build();
        let st = Arc::new(SharedStanza::new(el));
        self.fanout(&st);
    }

    fn on_private(&mut self, m: Element, sender: Option<String>, target: String, typ: &str) {
        if typ == "groupchat" {
            self.reply_error(
                &m,
                StanzaError::bad_request()
                    .with_text("private messages cannot be of type groupchat"),
            );
            return;
        }
        let Some(s) = sender else {
            self.reply_error(
                &m,
                StanzaError::not_acceptable().with_text("you are not in this room"),
            );
            return;
        };
        if !self.occupants.contains_key(&target) {
            self.reply_error(
                &m,
                StanzaError::item_not_found().with_text("no such occupant"),
            );
            return;
        }
        let role = self.occupants[&s].role;
        if !self.config.allow_pm.allows(role) {
            self.reply_error(
                &m,
                StanzaError::forbidden().with_text("private messages are not allowed here"),
            );
            return;
        }
        if let Err(e) = self.take_tokens(&s) {
            self.reply_error(&m, e);
            return;
        }
        self.forward_private(&m, &s, &target);
    }

    /// A private message (or its error) from occupant `from_nick` to every
    /// session of `to_nick`, through the router (so the recipient's server
    /// rules apply: carbons, archive).
    fn forward_private(&mut self, m: &Element, from_nick: &str, to_nick: &str) {
        let Some(occ_id) = self.occupants.get(from_nick).map(|o| o.occupant_id.clone()) else {
            return;
        };
        let mut base = Element::builder(m.name(), ns::CLIENT)
            .attr(name("from"), self.occupant_jid(from_nick))
            .build();
        for (k, v) in [("type", m.attr("type")), ("id", m.attr("id"))] {
            if let Some(v) = v {
                stanza::set_attr(&mut base, k, v);
            }
        }
        for c in m.children() {
            if c.is("x", ns::MUC_USER) || c.is("occupant-id", NS_OCCUPANT_ID) {
                continue;
            }
            base.append_child(c.clone());
        }
        base.append_child(Element::bare("x", ns::MUC_USER));
        base.append_child(occupant_id_el(&occ_id));
        let targets: Vec<String> = self.occupants[to_nick]
            .sessions
            .iter()
            .map(|s| s.jid_str.clone())
            .collect();
        for t in targets {
            let mut el = base.clone();
            stanza::set_attr(&mut el, "to", t);
            self.outbox.push(el);
        }
    }

    async fn on_invite(&mut self, m: Element, from: Jid, sender: Option<String>, x: &Element) {
        let Some(nick) = sender else {
            self.reply_error(
                &m,
                StanzaError::not_acceptable().with_text("only occupants may invite"),
            );
            return;
        };
        let inviter = from.to_bare();
        let aff = self.affiliation_of(&inviter);
        if self.config.members_only && aff < Affiliation::Admin && !self.config.allow_invites {
            self.reply_error(
                &m,
                StanzaError::forbidden().with_text("only admins may invite to this room"),
            );
            return;
        }
        if let Err(e) = self.take_tokens(&nick) {
            self.reply_error(&m, e);
            return;
        }
        let invites: Vec<Element> = x
            .children()
            .filter(|c| c.is("invite", ns::MUC_USER))
            .take(MAX_INVITES)
            .cloned()
            .collect();
        for inv in invites {
            let Some(Ok(invitee)) = inv.attr("to").map(Jid::new) else {
                self.reply_error(
                    &m,
                    StanzaError::jid_malformed().with_text("invalid invitee"),
                );
                return;
            };
            let ib = invitee.to_bare();
            if self.server.config.is_local_domain(ib.domain().as_str())
                && (ib.node().is_none() || !self.server.user_exists(&ib).await)
            {
                self.reply_error(&m, StanzaError::item_not_found().with_text("no such user"));
                continue;
            }
            if self.config.members_only && self.affiliation_of(&ib) == Affiliation::None {
                // Inviting into a members-only room makes the invitee a member.
                self.affiliations.insert(
                    ib.clone(),
                    AffEntry {
                        affiliation: Affiliation::Member,
                        nick: None,
                        reason: None,
                    },
                );
                self.persist_affiliation(&ib).await;
            }
            let reason = inv.get_child("reason", ns::MUC_USER).map(|r| r.text());
            let mut invite =
                Element::builder("invite", ns::MUC_USER).attr(name("from"), inviter.to_string());
            if let Some(r) = &reason {
                invite = invite.append(
                    Element::builder("reason", ns::MUC_USER)
                        .append(r.as_str())
                        .build(),
                );
            }
            if let Some(c) = inv.get_child("continue", ns::MUC_USER) {
                invite = invite.append(c.clone());
            }
            let mut ux = Element::builder("x", ns::MUC_USER).append(invite.build());
            if self.config.password_protected {
                ux = ux.append(
                    Element::builder("password", ns::MUC_USER)
                        .append(self.config.password.as_str())
                        .build(),
                );
            }
            let body = match &reason {
                Some(r) if !r.is_empty() => {
                    format!("{inviter} invites you to the room {}: {r}", self.jid_str)
                }
                _ => format!("{inviter} invites you to the room {}", self.jid_str),
            };
            let msg = stanza::build(
                "message",
                Some(&self.jid_str),
                Some(&invitee.to_string()),
                None,
                Some(&stanza::new_id()),
            )
            .append(ux.build())
            .append(Element::builder("body", ns::CLIENT).append(body).build())
            .build();
            self.outbox.push(msg);
        }
    }

    fn on_decline(&mut self, m: &Element, from: &Jid, d: &Element) {
        let Some(Ok(to)) = d.attr("to").map(Jid::new) else {
            self.reply_error(
                m,
                StanzaError::jid_malformed().with_text("decline without a valid 'to'"),
            );
            return;
        };
        let mut decline = Element::builder("decline", ns::MUC_USER)
            .attr(name("from"), from.to_bare().to_string());
        if let Some(r) = d.get_child("reason", ns::MUC_USER) {
            decline = decline.append(r.clone());
        }
        let msg = stanza::build(
            "message",
            Some(&self.jid_str),
            Some(&to.to_string()),
            None,
            Some(&stanza::new_id()),
        )
        .append(
            Element::builder("x", ns::MUC_USER)
                .append(decline.build())
                .build(),
        )
        .build();
        self.outbox.push(msg);
    }

    async fn on_voice_form(&mut self, m: Element, from: FullJid, nick: String, form: Form) {
        let role = self.occupants[&nick].role;
        if form.has("muc#request_allow") {
            // A moderator's answer to a voice request.
            if role != Role::Moderator {
                self.reply_error(
                    &m,
                    StanzaError::forbidden().with_text("only moderators approve voice requests"),
                );
                return;
            }
            if form.bool("muc#request_allow") != Ok(Some(true)) {
                return;
            }
            let Some(target) = form.value("muc#roomnick").map(str::to_owned) else {
                self.reply_error(&m, StanzaError::bad_request().with_text("no muc#roomnick"));
                return;
            };
            let is_visitor = self
                .occupants
                .get(&target)
                .map(|o| o.role == Role::Visitor)
                .unwrap_or(false);
            if is_visitor {
                self.set_role(&target, Role::Participant, Some(nick), None);
            }
            return;
        }
        if !self.config.voice_requests {
            self.reply_error(
                &m,
                StanzaError::not_allowed().with_text("voice requests are disabled in this room"),
            );
            return;
        }
        if role != Role::Visitor {
            self.reply_error(
                &m,
                StanzaError::not_acceptable().with_text("you have voice already"),
            );
            return;
        }
        if let Some(o) = self.occupants.get_mut(&nick) {
            if o.last_voice_request
                .is_some_and(|t| t.elapsed() < VOICE_REQUEST_INTERVAL)
            {
                let e = StanzaError::policy_violation()
                    .with_type(ErrorType::Wait)
                    .with_text("you asked for voice a moment ago; please wait");
                self.reply_error(&m, e);
                return;
            }
            o.last_voice_request = Some(Instant::now());
        }
        let approval = super::form::FormBuilder::new("form", NS_MUC_REQUEST)
            .title("Voice request")
            .instructions("To approve this request for voice, select the \"Grant voice to this person?\" checkbox and click OK.")
            .list("muc#role", "list-single", "Requested role", &["participant"], &[("participant", "Participant")])
            .field("muc#jid", Some("jid-single"), "User ID", &[&from.to_string()])
            .field("muc#roomnick", Some("text-single"), "Room Nickname", &[&nick])
            .boolean("muc#request_allow", "Grant voice to this person?", false)
            .build();
        let el = stanza::build(
            "message",
            Some(&self.jid_str),
            None,
            None,
            Some(&stanza::new_id()),
        )
        .append(approval)
        .build();
        let st = Arc::new(SharedStanza::new(el));
        let mut remote = std::mem::take(&mut self.outbox);
        for occ in self
            .occupants
            .values()
            .filter(|o| o.role == Role::Moderator)
        {
            for s in &occ.sessions {
                deliver(s, &st, &mut remote);
            }
        }
        self.outbox = remote;
    }

    /// Change an occupant's role and tell everyone.
    pub(crate) fn set_role(
        &mut self,
        nick: &str,
        role: Role,
        actor: Option<String>,
        reason: Option<String>,
    ) {
        let Some(occ) = self.occupants.get_mut(nick) else {
            return;
        };
        if occ.role == role {
            return;
        }
        occ.role = role;
        occ.cached = None;
        let v = self.view(&self.occupants[nick]);
        let extra = Extra {
            actor,
            reason,
            ..Default::default()
        };
        // A new moderator of a semi-anonymous room learns the real JIDs.
        let newly_moderator = role == Role::Moderator && !self.config.non_anonymous;
        self.announce(&v, false, &[], &[], &extra, &[], true);
        if newly_moderator {
            let sessions: Vec<FullJid> = self.occupants[nick]
                .sessions
                .iter()
                .map(|s| s.jid.clone())
                .collect();
            for s in sessions {
                self.send_roster(nick, &s);
            }
        }
    }

    // ----- IQs ------------------------------------------------------------

    async fn on_iq(&mut self, iq: Element, from: Jid, nick: Option<String>) {
        let typ = stanza::stanza_type(&iq).to_owned();
        if typ == "result" || typ == "error" {
            return self.on_iq_response(iq, from, nick).await;
        }
        if typ != "get" && typ != "set" {
            return;
        }
        let mut children = iq.children();
        let (Some(payload), None) = (children.next(), children.next()) else {
            self.reply_error(&iq, StanzaError::bad_request());
            return;
        };
        let payload = payload.clone();
        if let Some(target) = nick {
            return self.iq_to_occupant(iq, from, target, &payload);
        }
        if !self.exists {
            self.reply_error(&iq, StanzaError::item_not_found().with_text("no such room"));
            return;
        }
        let is_set = typ == "set";
        let pns = payload.ns();
        let result: Result<Option<Element>, StanzaError> = match (pns.as_str(), is_set) {
            (ns::DISCO_INFO, false) => self.disco_info(&from, &payload),
            (ns::DISCO_ITEMS, false) => Ok(Some(self.disco_items(&from, &payload))),
            (ns::PING, false) => Ok(None),
            (ns::MUC_ADMIN, _) => self.admin_iq(&from, &payload, is_set).await,
            (ns::MUC_OWNER, _) => self.owner_iq(&from, &payload, is_set).await,
            (NS_REGISTER, _) => self.register_iq(&from, &payload, is_set).await,
            (ns::MAM | ns::MAM1, _) => match self.mam_iq(&iq, &from, &payload, is_set) {
                Ok(Some(form)) => Ok(Some(form)),
                Ok(None) => return, // answered by the query task
                Err(e) => Err(e),
            },
            _ => Err(StanzaError::service_unavailable()),
        };
        match result {
            Ok(p) => self.reply_result(&iq, p),
            Err(e) => self.reply_error(&iq, e),
        }
    }

    /// IQs to an occupant JID: self-ping is answered by the room
    /// (XEP-0410); others are passed to the occupant, vCard requests to its
    /// bare JID (avatars), with the sender's identity hidden behind its
    /// occupant JID.
    fn iq_to_occupant(&mut self, iq: Element, from: Jid, target: String, payload: &Element) {
        let sender = from
            .try_as_full()
            .ok()
            .and_then(|f| self.by_jid.get(f).cloned());
        let Some(sender) = sender else {
            self.reply_error(
                &iq,
                StanzaError::not_acceptable().with_text("you are not in this room"),
            );
            return;
        };
        if payload.is("ping", ns::PING) && sender == target {
            self.reply_result(&iq, None);
            return;
        }
        let Some(occ) = self.occupants.get(&target) else {
            self.reply_error(
                &iq,
                StanzaError::item_not_found().with_text("no such occupant"),
            );
            return;
        };
        if self.pending_iqs.len() >= MAX_PENDING_IQS {
            self.reply_error(
                &iq,
                StanzaError::resource_constraint().with_text("too many requests in flight"),
            );
            return;
        }
        let to = if payload.is("vCard", NS_VCARD) {
            occ.bare.to_string()
        } else {
            match occ.primary() {
                Some(p) => p.jid_str.clone(),
                None => return,
            }
        };
        let new_id = format!("muc-{}", stanza::new_id());
        self.pending_iqs.insert(
            new_id.clone(),
            PendingIq {
                requester: from.to_string(),
                original_id: iq.attr("id").unwrap_or_default().to_owned(),
                from_nick: sender.clone(),
                to_nick: target.clone(),
                expires: Instant::now() + IQ_TIMEOUT,
            },
        );
        let mut fwd = stanza::build(
            "iq",
            Some(&self.occupant_jid(&sender)),
            Some(&to),
            iq.attr("type"),
            Some(&new_id),
        )
        .build();
        fwd.append_child(payload.clone());
        self.outbox.push(fwd);
    }

    async fn on_iq_response(&mut self, iq: Element, from: Jid, _nick: Option<String>) {
        let id = iq.attr("id").unwrap_or_default().to_owned();
        if let Some(p) = self.pending_iqs.remove(&id) {
            let mut back = stanza::build(
                "iq",
                Some(&self.occupant_jid(&p.to_nick)),
                Some(&p.requester),
                iq.attr("type"),
                Some(&p.original_id),
            )
            .build();
            for c in iq.children() {
                back.append_child(c.clone());
            }
            let _ = p.from_nick;
            self.send_direct(back);
            return;
        }
        if stanza::is_error(&iq)
            && is_delivery_error(&iq)
            && let Ok(full) = from.try_as_full()
            && let Some(n) = self.by_jid.get(full).cloned()
        {
            self.remove_session(&n, full, &[status::TECHNICAL], Extra::default(), false)
                .await;
        }
    }

    // ----- persistence ----------------------------------------------------

    pub(crate) fn stored(&self) -> StoredRoom {
        StoredRoom {
            name: self.config.name.clone(),
            public: self.config.public,
            config: self.config.to_json(),
            subject: self.subject.set.then(|| self.subject.text.clone()),
            subject_nick: self.subject.set.then(|| self.subject.nick.clone()),
            subject_stamp: self.subject.set.then_some(self.subject.stamp),
            created_at: self.created_at,
        }
    }

    /// Save the room row (configuration, subject).
    pub(crate) async fn persist_room(&mut self) {
        let stored = self.stored();
        if let Err(e) = self
            .server
            .store
            .save_room(&self.core.domain, &self.node, &stored)
            .await
        {
            tracing::error!(room = %self.jid, error = %e, "cannot save room");
        }
    }

    /// Save the room row and its whole affiliation list.
    pub(crate) async fn persist_all(&mut self) {
        self.persist_room().await;
        let rows: Vec<_> = self
            .affiliations
            .iter()
            .map(|(j, e)| crate::storage::muc::AffiliationRow {
                jid: j.to_string(),
                affiliation: e.affiliation.as_str().to_owned(),
                nick: e.nick.clone(),
                reason: e.reason.clone(),
            })
            .collect();
        if let Err(e) = self
            .server
            .store
            .replace_affiliations(&self.core.domain, &self.node, &rows)
            .await
        {
            tracing::error!(room = %self.jid, error = %e, "cannot save affiliations");
        }
        self.persisted = true;
        if let Some(o) = self.temp_owner.take() {
            self.core.add_temp_owned(&o, -1);
        }
    }

    /// Save one affiliation (if the room is stored).
    pub(crate) async fn persist_affiliation(&mut self, jid: &BareJid) {
        if !self.persisted {
            return;
        }
        let row = self
            .affiliations
            .get(jid)
            .map(|e| crate::storage::muc::AffiliationRow {
                jid: jid.to_string(),
                affiliation: e.affiliation.as_str().to_owned(),
                nick: e.nick.clone(),
                reason: e.reason.clone(),
            });
        if let Err(e) = self
            .server
            .store
            .set_affiliation(
                &self.core.domain,
                &self.node,
                &jid.to_string(),
                row.as_ref(),
            )
            .await
        {
            tracing::error!(room = %self.jid, error = %e, "cannot save affiliation");
        }
    }

    /// The room stops being persistent: its row goes (it lives on until
    /// the last occupant leaves).
    pub(crate) async fn unpersist(&mut self) {
        if !self.persisted {
            return;
        }
        if let Err(e) = self
            .server
            .store
            .delete_room(&self.core.domain, &self.node)
            .await
        {
            tracing::error!(room = %self.jid, error = %e, "cannot delete stored room");
        }
        self.persisted = false;
        if let Some((owner, _)) = self
            .affiliations
            .iter()
            .find(|(_, e)| e.affiliation == Affiliation::Owner)
        {
            let owner = owner.clone();
            self.core.add_temp_owned(&owner, 1);
            self.temp_owner = Some(owner);
        }
    }

    pub(crate) fn is_occupant(&self, from: &Jid) -> Option<&Occupant> {
        let full = from.try_as_full().ok()?;
        self.occupants.get(self.by_jid.get(full)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupant_ids_are_stable_and_per_room() {
        let a = BareJid::new("alice@x").unwrap();
        let b = BareJid::new("bob@x").unwrap();
        let s = b"secret-secret-secret-secret-1234";
        let id = occupant_id(s, "r@c.x", &a);
        assert_eq!(id, occupant_id(s, "r@c.x", &a));
        assert_ne!(id, occupant_id(s, "r@c.x", &b));
        assert_ne!(id, occupant_id(s, "q@c.x", &a));
        assert_ne!(
            id,
            occupant_id(b"another-secret-another-secret-12", "r@c.x", &a)
        );
        assert_eq!(id.len(), 24);
    }

    #[test]
    fn presence_is_sanitised() {
        let p: Element = "<presence xmlns='jabber:client'><show>away</show>\
            <x xmlns='http://jabber.org/protocol/muc'><password>s</password></x>\
            <x xmlns='http://jabber.org/protocol/muc#user'><item role='moderator'/></x>\
            <occupant-id xmlns='urn:xmpp:occupant-id:0' id='fake'/>\
            <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>"
            .parse()
            .unwrap();
        let s = sanitize_presence(&p);
        let names: Vec<&str> = s.children().map(|c| c.name()).collect();
        assert_eq!(names, vec!["show", "c"]);
    }

    #[test]
    fn archive_rules() {
        let m = |x: &str| -> Element { x.parse().unwrap() };
        assert!(archivable(&m(
            "<message xmlns='jabber:client'><body>x</body></message>"
        )));
        assert!(!archivable(&m(
            "<message xmlns='jabber:client'><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        )));
        assert!(!archivable(&m(
            "<message xmlns='jabber:client'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>"
        )));
        assert!(archivable(&m(
            "<message xmlns='jabber:client'><reactions xmlns='urn:xmpp:reactions:0' id='1'/></message>"
        )));
        assert!(is_delivery_error(&m(
            "<message xmlns='jabber:client' type='error'><error type='cancel'>\
             <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        )));
        assert!(!is_delivery_error(&m(
            "<message xmlns='jabber:client' type='error'><error type='auth'>\
             <forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        )));
    }
}
