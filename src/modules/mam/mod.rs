//! XEP-0313 Message Archive Management for user archives, with XEP-0359
//! stanza ids and XEP-0441 preferences.
//!
//! - Every 1:1 message worth keeping (see [`prefs::is_archivable`]) is
//!   archived twice: for a local sender in `on_user_send` (before routing)
//!   and for a local recipient in `on_receive` (before resources are
//!   chosen), each subject to that user's preferences. A message to oneself
//!   is archived once, as received.
//! - The recipient's copy gets `<stanza-id by='recipient' id=.../>` with
//!   the archive id, so every delivered copy (and the offline copy) carries
//!   it. Stanza ids a client forged with `by` set to one of our JIDs are
//!   removed (XEP-0359 section 6); `origin-id` is kept.
//! - Writes go through the batching writer of [`archive::Archive`]; the
//!   delivery path never waits for the database.
//! - Queries: `urn:xmpp:mam:2` (and `:1`) with the form filters `with`,
//!   `start`, `end`, `before-id`, `after-id`, `ids`, RSM paging and
//!   `flip-page`; form discovery; archive metadata.
//! - Retention: a server default (`archive.retention`) and per-user
//!   settings, applied by a background expiry task.
//!
//! The MUC service reuses [`archive::Archive`] (owner = the room JID,
//! `by` = the room), [`query::parse_query`], [`results`] and the stanza-id
//! helpers here.

// Stanza errors are the natural error type of query parsing; they are built
// only on the (rare) error path, so their size does not matter here.
#![allow(clippy::result_large_err)]

pub mod archive;
pub mod prefs;
pub mod query;
pub mod results;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jid::{BareJid, Jid};
use minidom::Element;

use self::prefs::{Mode, Prefs, PrefsCache};
use super::{Flow, IqReply, IqRequest, Module};
use crate::config::{Config, parse_retention};
use crate::server::Server;
use crate::sessions::Session;
use crate::stanza::{StanzaError, name};
use crate::storage::archive::{ArchiveId, NewArchived};
use crate::storage::{ArchiveStore, now_micros};
use crate::xml::ns;

/// How long cached preferences are trusted.
const PREFS_TTL: Duration = Duration::from_secs(300);
/// Messages deleted per expiry transaction.
const EXPIRE_CHUNK: usize = 2000;

/// Remove the `<stanza-id xmlns='urn:xmpp:sid:0'/>` children whose `by`
/// satisfies `forged` (XEP-0359 section 6: an entity that sets stanza ids
/// removes those carrying its own `by`). Other children, `origin-id`
/// included, stay. Returns how many were removed.
pub fn strip_stanza_ids(stanza: &mut Element, forged: impl Fn(&str) -> bool) -> usize {
    let is_forged = |c: &Element| c.is("stanza-id", ns::SID) && forged(c.attr("by").unwrap_or(""));
    if !stanza.children().any(is_forged) {
        return 0;
    }
    let mut removed = 0;
    for node in stanza.take_nodes() {
        match node {
            minidom::Node::Element(e) if is_forged(&e) => removed += 1,
            other => stanza.append_node(other),
        }
    }
    removed
}

/// Add `<stanza-id xmlns='urn:xmpp:sid:0' by=.. id=../>`.
pub fn add_stanza_id(stanza: &mut Element, by: &str, id: ArchiveId) {
    stanza.append_child(
        Element::builder("stanza-id", ns::SID)
            .attr(name("by"), by)
            .attr(name("id"), id.to_string())
            .build(),
    );
}

/// Is `by` one of this server's JIDs (a local domain or an account on it)?
fn is_local_jid(server: &Server, by: &str) -> bool {
    match Jid::new(by) {
        Ok(j) => server.config.is_local_domain(j.domain().as_str()),
        // A `by` that is not even a JID vouches for nothing; leave it.
        Err(_) => false,
    }
}

fn serialize(stanza: &Element) -> Vec<u8> {
    crate::xml::writer::serialize(stanza)
}

pub struct Mam {
    default_mode: Mode,
    /// Seconds; None = forever.
    retention: Option<u64>,
    expiry_interval: Duration,
    max_prefs_jids: usize,
    prefs: PrefsCache,
}

impl Mam {
    pub fn new(config: &Config) -> Mam {
        let a = &config.archive;
        Mam {
            default_mode: Mode::parse(&a.default_mode).unwrap_or(Mode::Always),
            // Validated at load; a bad value here means forever.
            retention: parse_retention(&a.retention).ok().flatten(),
            expiry_interval: Duration::from_secs(a.expiry_interval_secs.max(1)),
            max_prefs_jids: a.max_prefs_jids,
            prefs: PrefsCache::new(a.prefs_cache, PREFS_TTL),
        }
    }

    /// The effective preferences of `owner` (cached).
    async fn prefs_of(&self, server: &Server, owner: &str) -> Arc<Prefs> {
        if let Some(p) = self.prefs.get(owner) {
            return p;
        }
        let stored = match server.store.archive_prefs(owner).await {
            Ok(s) => s,
            Err(e) => {
                // Archive by the server default rather than lose history.
                tracing::error!(error = %e, owner, "reading archive preferences failed");
                None
            }
        };
        let p = Arc::new(Prefs::from_stored(stored.as_ref(), self.default_mode));
        self.prefs.put(owner, p.clone());
        p
    }

    async fn handle_query(&self, server: &Server, req: &IqRequest<'_>) -> IqReply {
        let qns = query::mam_ns(req.payload).unwrap_or(ns::MAM);
        if !req.is_set {
            return IqReply::Result(Some(query::query_form(qns, true)));
        }
        let q = match query::parse_query(req.payload) {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(error = ?e.text, "bad archive query");
                return IqReply::Error(e);
            }
        };
        let owner = req.to.to_bare().to_string();
        let page = match server.archive.query(&owner, &q).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(owner, condition = e.condition, text = ?e.text, "archive query refused");
                return IqReply::Error(e);
            }
        };
        let to = req.from.to_string();
        let msgs =
            results::result_messages(&to, &owner, q.ns, q.queryid.as_deref(), &page, q.flip_page);
        for m in msgs {
            match req.session {
                Some(s) => {
                    if let crate::router::MailboxResult::Failed(_) =
                        server.send_to_session(s, m).await
                    {
                        tracing::debug!(jid = %s.jid, "session gone while sending archive results");
                        return IqReply::Handled;
                    }
                }
                None => server.route(m).await,
            }
        }
        IqReply::Result(Some(results::fin(q.ns, q.queryid.as_deref(), &page)))
    }

    async fn handle_prefs(&self, server: &Server, req: &IqRequest<'_>) -> IqReply {
        let qns = query::mam_ns(req.payload).unwrap_or(ns::MAM);
        let owner = req.to.to_bare().to_string();
        if !req.is_set {
            return IqReply::Result(Some(self.prefs_of(server, &owner).await.to_element(qns)));
        }
        let prefs = match prefs::parse_prefs(req.payload, self.max_prefs_jids) {
            Ok(p) => p,
            Err(e) => return IqReply::Error(e),
        };
        if let Err(e) = server
            .store
            .set_archive_prefs(&owner, &prefs.to_stored())
            .await
        {
            tracing::error!(error = %e, owner, "storing archive preferences failed");
            return IqReply::Error(StanzaError::internal());
        }
        self.prefs.invalidate(&owner);
        IqReply::Result(Some(prefs.to_element(qns)))
    }
}

/// One pass of archive expiry: delete what is older than each archive's
/// retention (its own setting, else `default_retention` seconds; None =
/// forever). Stops early when `cancel` fires. Returns how many messages were
/// deleted.
pub async fn expire(
    store: &crate::storage::Store,
    default_retention: Option<u64>,
    cancel: Option<&tokio_util::sync::CancellationToken>,
) -> u64 {
    let overrides = match store.archive_retention_overrides().await {
        Ok(v) => v.into_iter().collect::<std::collections::HashMap<_, _>>(),
        Err(e) => {
            tracing::error!(error = %e, "archive expiry: reading retention settings failed");
            return 0;
        }
    };
    let now = now_micros();
    let mut deleted = 0;
    let mut expire_owner = async |owner: &str, secs: i64| {
        if secs <= 0 {
            return; // forever
        }
        let cutoff = now.saturating_sub(secs.saturating_mul(1_000_000));
        loop {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return;
            }
            match store.archive_expire(owner, cutoff, EXPIRE_CHUNK).await {
                Ok(n) => {
                    deleted += n;
                    if (n as usize) < EXPIRE_CHUNK {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, owner, "archive expiry failed");
                    return;
                }
            }
        }
    };
    match default_retention {
        // Every archive has a retention: walk the owners by index seeks.
        Some(default) => {
            let mut after = String::new();
            loop {
                let next = match store.archive_next_owner(&after).await {
                    Ok(Some(o)) => o,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "archive expiry: listing archives failed");
                        break;
                    }
                };
                let secs = overrides.get(&next).copied().unwrap_or(default as i64);
                expire_owner(&next, secs).await;
                after = next;
            }
        }
        // Only archives with their own setting expire.
        None => {
            for (owner, secs) in &overrides {
                expire_owner(owner, *secs).await;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "archive expiry removed old messages");
    }
    deleted
}

#[async_trait]
impl Module for Mam {
    fn name(&self) -> &'static str {
        "mam"
    }

    fn account_features(&self) -> Vec<&'static str> {
        vec![
            ns::MAM,
            ns::MAM_EXTENDED,
            ns::MAM_GROUPCHAT_FIELD,
            ns::MAM1,
            ns::SID,
        ]
    }

    fn iq_namespaces(&self) -> Vec<&'static str> {
        vec![ns::MAM, ns::MAM1]
    }

    async fn handle_iq(&self, server: &Server, req: IqRequest<'_>) -> IqReply {
        if req.to_server() {
            return IqReply::Error(
                StanzaError::service_unavailable()
                    .with_text("archives are on accounts (query your bare JID)"),
            );
        }
        if !req.is_own_account() {
            return IqReply::Error(StanzaError::forbidden());
        }
        let qns = query::mam_ns(req.payload).unwrap_or(ns::MAM);
        match req.payload.name() {
            "query" => self.handle_query(server, &req).await,
            "prefs" => self.handle_prefs(server, &req).await,
            "metadata" if qns == ns::MAM && !req.is_set => {
                server.archive.flush().await;
                let owner = req.to.to_bare().to_string();
                match server.store.archive_bounds(&owner).await {
                    Ok(b) => IqReply::Result(Some(results::metadata(b))),
                    Err(e) => {
                        tracing::error!(error = %e, "archive metadata failed");
                        IqReply::Error(StanzaError::internal())
                    }
                }
            }
            _ => IqReply::Error(StanzaError::feature_not_implemented()),
        }
    }

    async fn on_user_send(
        &self,
        server: &Server,
        session: &Arc<Session>,
        stanza: &mut Element,
    ) -> Flow {
        if stanza.name() != "message" {
            return Flow::Continue;
        }
        // Only the server sets stanza ids for its users and itself.
        let stripped = strip_stanza_ids(stanza, |by| is_local_jid(server, by));
        if stripped > 0 {
            tracing::debug!(jid = %session.jid, stripped, "removed client-supplied stanza-ids");
        }
        if !prefs::is_archivable(stanza) {
            return Flow::Continue;
        }
        let owner = session.jid.to_bare();
        let to = match stanza.attr("to").map(Jid::new) {
            Some(Ok(t)) => t,
            // No `to`: a message to one's own account, archived on receipt.
            _ => return Flow::Continue,
        };
        if to.to_bare() == owner
            || (to.node().is_none() && server.config.is_local_domain(to.domain().as_str()))
        {
            // To oneself (archived once, on receipt) or to the server.
            return Flow::Continue;
        }
        let owner = owner.to_string();
        if !self.prefs_of(server, &owner).await.allows(&to) {
            return Flow::Continue;
        }
        let bytes = serialize(stanza);
        let with_bare = to.to_bare().to_string();
        let with_res = to.resource().map(|r| r.to_string()).unwrap_or_default();
        server
            .archive
            .append(|id| NewArchived {
                owner,
                id,
                with_bare,
                with_res,
                outgoing: true,
                stanza: bytes,
            })
            .await;
        Flow::Continue
    }

    async fn on_receive(&self, server: &Server, to: &BareJid, stanza: &mut Element) -> Flow {
        if stanza.name() != "message" || to.node().is_none() {
            return Flow::Continue;
        }
        let owner = to.to_string();
        let stripped = strip_stanza_ids(stanza, |by| by == owner || is_local_jid(server, by));
        if stripped > 0 {
            tracing::debug!(to = %owner, stripped, "removed forged stanza-ids");
        }
        if !prefs::is_archivable(stanza) {
            return Flow::Continue;
        }
        let from = match stanza.attr("from").map(Jid::new) {
            Some(Ok(f)) => f,
            _ => return Flow::Continue,
        };
        if !self.prefs_of(server, &owner).await.allows(&from) {
            return Flow::Continue;
        }
        let bytes = serialize(stanza);
        let with_bare = from.to_bare().to_string();
        let with_res = from.resource().map(|r| r.to_string()).unwrap_or_default();
        let row_owner = owner.clone();
        let id = server
            .archive
            .append(|id| NewArchived {
                owner: row_owner,
                id,
                with_bare,
                with_res,
                outgoing: false,
                stanza: bytes,
            })
            .await;
        if let Some(id) = id {
            add_stanza_id(stanza, &owner, id);
        }
        Flow::Continue
    }

    fn start(&self, server: &Server) {
        let server = server.clone();
        let retention = self.retention;
        let interval = self.expiry_interval;
        server.tasks.clone().spawn(async move {
            loop {
                tokio::select! {
                    _ = server.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
                expire(&server.store, retention, Some(&server.shutdown)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    #[tokio::test]
    async fn expiry_follows_default_and_per_owner_retention() {
        for_each_store(|store| async move {
            let now = now_micros();
            let hour = 3_600_000_000i64;
            let mut rows = Vec::new();
            for owner in ["a@x", "b@x", "room@muc.x"] {
                for (i, age) in [3 * hour, 2 * hour, 0].into_iter().enumerate() {
                    rows.push(NewArchived {
                        owner: owner.into(),
                        id: ArchiveId {
                            seq: now - age + i as i64,
                            tag: 1,
                        },
                        with_bare: "z@x".into(),
                        with_res: String::new(),
                        outgoing: false,
                        stanza: b"<message xmlns='jabber:client'/>".to_vec(),
                    });
                }
            }
            store.archive_insert(&rows).await.unwrap();
            // Forever by default: only archives with their own setting go.
            store
                .set_archive_retention("a@x", Some(90 * 60))
                .await
                .unwrap();
            assert_eq!(expire(&store, None, None).await, 2);
            // 150 minutes by default, b@x forever.
            store.set_archive_retention("b@x", Some(0)).await.unwrap();
            assert_eq!(expire(&store, Some(150 * 60), None).await, 1);
            let left = |o: &'static str| {
                let store = store.clone();
                async move {
                    store
                        .archive_range(o, &Default::default(), 10)
                        .await
                        .unwrap()
                        .len()
                }
            };
            assert_eq!(left("a@x").await, 1);
            assert_eq!(left("b@x").await, 3);
            assert_eq!(left("room@muc.x").await, 2);
        })
        .await;
    }

    #[test]
    fn strip_keeps_origin_id_and_foreign_ids() {
        let mut m: Element = "<message xmlns='jabber:client'><body>x</body>\
            <stanza-id xmlns='urn:xmpp:sid:0' by='bob@x' id='forged'/>\
            <stanza-id xmlns='urn:xmpp:sid:0' by='room@muc.y' id='ok'/>\
            <origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>"
            .parse()
            .unwrap();
        assert_eq!(strip_stanza_ids(&mut m, |by| by == "bob@x"), 1);
        let ids: Vec<_> = m
            .children()
            .filter(|c| c.ns() == ns::SID)
            .map(|c| (c.name().to_owned(), c.attr("id").unwrap().to_owned()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("stanza-id".to_string(), "ok".to_string()),
                ("origin-id".to_string(), "o1".to_string())
            ]
        );
        assert!(m.has_child("body", ns::CLIENT));
        assert_eq!(strip_stanza_ids(&mut m, |by| by == "bob@x"), 0);
        let id = ArchiveId { seq: 5, tag: 6 };
        add_stanza_id(&mut m, "bob@x", id);
        let sid = m
            .children()
            .find(|c| c.is("stanza-id", ns::SID) && c.attr("by") == Some("bob@x"))
            .unwrap();
        assert_eq!(sid.attr("id"), Some(id.to_string().as_str()));
    }
}
