//! The MUC service of one domain (e.g. `conference.example.org`): answers
//! what is addressed to the service itself (disco), and hands everything
//! addressed to a room or an occupant to that room's actor, starting the
//! actor (and loading a persistent room) on first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::room;
use super::types::{NS_MUC_STABLE_ID, NS_OCCUPANT_ID};
use crate::config::MucConfig;
use crate::router::Service;
use crate::server::Server;
use crate::stanza::{self, Kind, StanzaError, name};
use crate::storage::MucStore;
use crate::xml::ns;

/// What a room actor receives.
#[derive(Debug)]
pub(crate) enum RoomMsg {
    /// A stanza addressed to the room or one of its occupant JIDs.
    Stanza(Element),
    /// A local session ended: its occupant sessions leave.
    SessionGone { jid: FullJid, session_id: u64 },
}

struct RoomHandle {
    tx: mpsc::Sender<RoomMsg>,
    generation: u64,
}

/// State shared by the service and its room actors.
pub struct ServiceCore {
    /// The service domain (`conference.example.org`).
    pub domain: String,
    pub cfg: MucConfig,
    rooms: Mutex<HashMap<String, RoomHandle>>,
    /// Where each local or remote user is joined: bare JID -> room node ->
    /// the full JIDs joined there.
    joined: Mutex<HashMap<BareJid, HashMap<String, Vec<FullJid>>>>,
    /// Live temporary rooms per creator (for `max_rooms_per_user`).
    temp_owned: Mutex<HashMap<BareJid, usize>>,
    /// Live rooms as listed in disco#items: node -> (public, name).
    listing: Mutex<HashMap<String, (bool, String)>>,
    secret: tokio::sync::OnceCell<Arc<[u8]>>,
    generation: AtomicU64,
}

impl ServiceCore {
    pub(crate) fn new(domain: String, cfg: MucConfig) -> Arc<Self> {
        Arc::new(ServiceCore {
            domain,
            cfg,
            rooms: Mutex::new(HashMap::new()),
            joined: Mutex::new(HashMap::new()),
            temp_owned: Mutex::new(HashMap::new()),
            listing: Mutex::new(HashMap::new()),
            secret: tokio::sync::OnceCell::new(),
            generation: AtomicU64::new(0),
        })
    }

    /// The service secret (for occupant ids), loaded once from the store.
    pub(crate) async fn secret(&self, server: &Server) -> Result<Arc<[u8]>, StanzaError> {
        self.secret
            .get_or_try_init(|| async {
                server
                    .store
                    .muc_secret(&self.domain)
                    .await
                    .map(|v| Arc::from(v.into_boxed_slice()))
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot load the MUC secret");
                        StanzaError::internal()
                    })
            })
            .await
            .cloned()
    }

    /// Number of rooms with a running actor.
    pub fn live_rooms(&self) -> usize {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Hand a stanza for a room (or an occupant) to its actor.
    pub(crate) async fn dispatch(self: &Arc<Self>, server: &Server, node: &str, stanza: Element) {
        let mut msg = RoomMsg::Stanza(stanza);
        for _ in 0..4 {
            let tx = self.room_sender(server, node);
            match tx.try_send(msg) {
                Ok(()) => return,
                Err(TrySendError::Full(RoomMsg::Stanza(s))) => {
                    tracing::debug!(room = node, "room queue full");
                    if !stanza::is_error(&s) {
                        let err = StanzaError::resource_constraint()
                            .with_text("the room is too busy; try again shortly");
                        server.bounce(&s, with_by(err, node, &self.domain)).await;
                    }
                    return;
                }
                Err(TrySendError::Full(other)) => {
                    // Internal notices must not be lost: wait for space.
                    let _ = tx.send(other).await;
                    return;
                }
                // The actor is stopping: look again (a new one starts).
                Err(TrySendError::Closed(m)) => msg = m,
            }
        }
        tracing::warn!(room = node, "room actor kept stopping; stanza dropped");
    }

    /// Tell a room that a session ended (waits for queue space).
    pub(crate) async fn notify(self: &Arc<Self>, server: &Server, node: &str, msg: RoomMsg) {
        let tx = {
            let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            rooms.get(node).map(|h| h.tx.clone())
        };
        let _ = server;
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    fn room_sender(self: &Arc<Self>, server: &Server, node: &str) -> mpsc::Sender<RoomMsg> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = rooms.get(node)
            && !h.tx.is_closed()
        {
            return h.tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.cfg.room_queue);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        rooms.insert(
            node.to_owned(),
            RoomHandle {
                tx: tx.clone(),
                generation,
            },
        );
        let core = self.clone();
        let server2 = server.clone();
        let node = node.to_owned();
        server
            .tasks
            .spawn(async move { room::run(core, server2, node, generation, rx).await });
        tx
    }

    /// An actor stops: forget it (if it is still the registered one).
    pub(crate) fn remove_room(&self, node: &str, generation: u64) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if rooms.get(node).map(|h| h.generation) == Some(generation) {
            rooms.remove(node);
        }
    }

    /// A live room publishes how it is listed (None: not listed at all,
    /// e.g. it does not exist or was destroyed).
    pub(crate) fn set_listing(&self, node: &str, listing: Option<(bool, String)>) {
        let mut l = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        match listing {
            Some(v) => {
                l.insert(node.to_owned(), v);
            }
            None => {
                l.remove(node);
            }
        }
    }

    fn live_listing(&self) -> Vec<(String, bool, String)> {
        let l = self.listing.lock().unwrap_or_else(|p| p.into_inner());
        l.iter()
            .map(|(n, (p, name))| (n.clone(), *p, name.clone()))
            .collect()
    }

    pub(crate) fn index_join(&self, full: &FullJid, node: &str) {
        let mut j = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        let list = j
            .entry(full.to_bare())
            .or_default()
            .entry(node.to_owned())
            .or_default();
        if !list.contains(full) {
            list.push(full.clone());
        }
    }

    pub(crate) fn index_leave(&self, full: &FullJid, node: &str) {
        let mut j = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        let bare = full.to_bare();
        if let Some(rooms) = j.get_mut(&bare) {
            if let Some(list) = rooms.get_mut(node) {
                list.retain(|f| f != full);
                if list.is_empty() {
                    rooms.remove(node);
                }
            }
            if rooms.is_empty() {
                j.remove(&bare);
            }
        }
    }

    /// Rooms a user is joined to (any resource), for the per-user limit.
    pub(crate) fn joined_count(&self, bare: &BareJid) -> usize {
        let j = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        j.get(bare).map(|r| r.len()).unwrap_or(0)
    }

    /// Rooms where this full JID is joined.
    pub(crate) fn rooms_of(&self, full: &FullJid) -> Vec<String> {
        let j = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        j.get(&full.to_bare())
            .map(|rooms| {
                rooms
                    .iter()
                    .filter(|(_, l)| l.contains(full))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn temp_owned(&self, bare: &BareJid) -> usize {
        let m = self.temp_owned.lock().unwrap_or_else(|p| p.into_inner());
        m.get(bare).copied().unwrap_or(0)
    }

    pub(crate) fn add_temp_owned(&self, bare: &BareJid, delta: isize) {
        let mut m = self.temp_owned.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(bare.clone()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(bare);
        }
    }

    /// A local session ended: the rooms it is in let it leave.
    pub(crate) async fn session_closed(self: &Arc<Self>, server: &Server, full: &FullJid, id: u64) {
        for node in self.rooms_of(full) {
            self.notify(
                server,
                &node,
                RoomMsg::SessionGone {
                    jid: full.clone(),
                    session_id: id,
                },
            )
            .await;
        }
    }

    /// Stanzas addressed to the service domain itself.
    async fn handle_service(&self, server: &Server, stanza: Element) {
        match stanza::kind(&stanza) {
            Some(Kind::Iq) => {}
            Some(Kind::Message) => {
                if !stanza::is_error(&stanza) {
                    server
                        .bounce(&stanza, StanzaError::service_unavailable())
                        .await;
                }
                return;
            }
            _ => return,
        }
        let typ = stanza::stanza_type(&stanza);
        if typ != "get" && typ != "set" {
            return;
        }
        let mut children = stanza.children();
        let (Some(payload), None) = (children.next(), children.next()) else {
            server.bounce(&stanza, StanzaError::bad_request()).await;
            return;
        };
        let reply = if typ == "get" && payload.is("query", ns::DISCO_INFO) {
            if payload.attr("node").is_some() {
                Err(StanzaError::item_not_found())
            } else {
                Ok(Some(self.service_info()))
            }
        } else if typ == "get" && payload.is("query", ns::DISCO_ITEMS) {
            if payload.attr("node").is_some() {
                Err(StanzaError::item_not_found())
            } else {
                self.service_items(server, payload).await.map(Some)
            }
        } else if typ == "get" && payload.is("ping", ns::PING) {
            Ok(None)
        } else {
            Err(StanzaError::service_unavailable())
        };
        let out = match reply {
            Ok(p) => Some(stanza::iq_result(&stanza, p)),
            Err(e) => stanza::error_reply(&stanza, &e),
        };
        if let Some(o) = out {
            server.route(o).await;
        }
    }

    fn service_info(&self) -> Element {
        let mut q = Element::builder("query", ns::DISCO_INFO).append(
            Element::builder("identity", ns::DISCO_INFO)
                .attr(name("category"), "conference")
                .attr(name("type"), "text")
                .attr(name("name"), self.cfg.name.as_str())
                .build(),
        );
        for f in [
            ns::DISCO_INFO,
            ns::DISCO_ITEMS,
            ns::MUC,
            NS_MUC_STABLE_ID,
            NS_OCCUPANT_ID,
            ns::PING,
        ] {
            q = q.append(
                Element::builder("feature", ns::DISCO_INFO)
                    .attr(name("var"), f)
                    .build(),
            );
        }
        q.build()
    }

    /// Public rooms: the persistent ones from the store and the live ones,
    /// sorted by JID, paged with RSM (XEP-0059) `max` / `after` / `before`.
    async fn service_items(
        &self,
        server: &Server,
        query: &Element,
    ) -> Result<Element, StanzaError> {
        let mut rooms: std::collections::BTreeMap<String, String> = Default::default();
        match server.store.list_rooms(&self.domain).await {
            Ok(list) => {
                for r in list.into_iter().filter(|r| r.public) {
                    rooms.insert(r.node, r.name);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list rooms");
                return Err(StanzaError::internal());
            }
        }
        for (node, public, name) in self.live_listing() {
            if public {
                rooms.insert(node, name);
            } else {
                rooms.remove(&node);
            }
        }
        let all: Vec<(String, String)> = rooms
            .into_iter()
            .map(|(n, name)| (format!("{n}@{}", self.domain), name))
            .collect();
        let rsm = query.get_child("set", ns::RSM);
        let limit = rsm
            .and_then(|s| s.get_child("max", ns::RSM))
            .and_then(|m| m.text().trim().parse::<usize>().ok())
            .unwrap_or(self.cfg.max_listed_rooms)
            .min(self.cfg.max_listed_rooms);
        let after = rsm
            .and_then(|s| s.get_child("after", ns::RSM))
            .map(|a| a.text());
        let before = rsm
            .and_then(|s| s.get_child("before", ns::RSM))
            .map(|a| a.text());
        let (start, end) = match (&after, &before) {
            (Some(a), _) => {
                let i = all
                    .iter()
                    .position(|(j, _)| j == a)
                    .ok_or_else(StanzaError::item_not_found)?;
                (i + 1, (i + 1 + limit).min(all.len()))
            }
            (None, Some(b)) if !b.is_empty() => {
                let i = all
                    .iter()
                    .position(|(j, _)| j == b)
                    .ok_or_else(StanzaError::item_not_found)?;
                (i.saturating_sub(limit), i)
            }
            (None, Some(_)) => (all.len().saturating_sub(limit), all.len()),
            (None, None) => (0, limit.min(all.len())),
        };
        let mut q = Element::builder("query", ns::DISCO_ITEMS);
        for (jid, label) in &all[start..end] {
            let mut item =
                Element::builder("item", ns::DISCO_ITEMS).attr(name("jid"), jid.as_str());
            if !label.is_empty() {
                item = item.attr(name("name"), label.as_str());
            }
            q = q.append(item.build());
        }
        if rsm.is_some() || all.len() > end - start {
            let mut set = Element::builder("set", ns::RSM);
            if end > start {
                set = set
                    .append(
                        Element::builder("first", ns::RSM)
                            .attr(name("index"), start.to_string())
                            .append(all[start].0.as_str())
                            .build(),
                    )
                    .append(
                        Element::builder("last", ns::RSM)
                            .append(all[end - 1].0.as_str())
                            .build(),
                    );
            }
            set = set.append(
                Element::builder("count", ns::RSM)
                    .append(all.len().to_string())
                    .build(),
            );
            q = q.append(set.build());
        }
        Ok(q.build())
    }
}

/// Mark an error as generated by a room (XEP-0045 errors carry `by`).
pub(crate) fn with_by(mut err: StanzaError, node: &str, domain: &str) -> StanzaError {
    err.by = Some(format!("{node}@{domain}"));
    err
}

/// The service of one domain, registered with the router.
pub struct MucService {
    pub core: Arc<ServiceCore>,
}

#[async_trait]
impl Service for MucService {
    fn label(&self) -> String {
        self.core.cfg.name.clone()
    }

    async fn handle(&self, server: &Server, stanza: Element) {
        let to = match stanza::jid_attr(&stanza, "to") {
            Ok(Some(j)) => j,
            _ => return,
        };
        // Every stanza from outside must carry a valid `from`.
        if !matches!(stanza::jid_attr(&stanza, "from"), Ok(Some(_))) {
            tracing::debug!("stanza to the MUC service without a valid from; dropped");
            return;
        }
        match to.node() {
            None => self.core.handle_service(server, stanza).await,
            Some(node) => {
                let node = node.as_str().to_owned();
                self.core.dispatch(server, &node, stanza).await
            }
        }
    }
}
