//! Room archives on the server's message archive (src/modules/mam): a
//! room's messages are archived with the room's bare JID as the owner, the
//! archive id is the `<stanza-id by=room>`, the occupant's nick is the
//! `with` resource (so `with=room@service/nick` filters by occupant, as in
//! Prosody), and the sender's real JID is kept in the stored copy and shown
//! only to those allowed to see real JIDs. Also: discussion history on join
//! (XEP-0045 7.2.13-14), filled from the archive when a room loads, and the
//! XEP-0313 query, metadata and form answers on the room JID.

use std::collections::VecDeque;

use jid::FullJid;
use minidom::Element;

use crate::modules::mam::query::MamQuery;
use crate::modules::mam::{add_stanza_id, results};
use crate::server::Server;
use crate::stanza::{self, StanzaError, name};
use crate::storage::ArchiveStore;
use crate::storage::archive::{ArchiveId, ArchiveRange, NewArchived};
use crate::xml::ns;

/// Archive a room message (`out`, as reflected, without `to`): its
/// `<stanza-id by=room>` is added to `out`. None when it could not be
/// archived (the archive is shut down).
pub(crate) async fn append(
    server: &Server,
    room: &str,
    nick: &str,
    sender: &FullJid,
    out: &mut Element,
) -> Option<ArchiveId> {
    let id = server
        .archive
        .append(|id| {
            add_stanza_id(out, room, id);
            let mut stored = out.clone();
            stored.append_child(
                Element::builder("x", ns::MUC_USER)
                    .append(
                        Element::builder("item", ns::MUC_USER)
                            .attr(name("jid"), sender.to_string())
                            .build(),
                    )
                    .build(),
            );
            NewArchived {
                owner: room.to_owned(),
                id,
                with_bare: room.to_owned(),
                with_res: nick.to_owned(),
                outgoing: false,
                stanza: crate::xml::writer::serialize(&stored),
            }
        })
        .await;
    if id.is_none() {
        // Not archived after all: no stanza-id pointing nowhere.
        let _ = crate::modules::mam::strip_stanza_ids(out, |by| by == room);
    }
    id
}

/// The newest messages of a room's archive for the history ring (subject
/// changes excluded), oldest first.
pub(crate) async fn load_history(
    server: &Server,
    room: &str,
    max: usize,
) -> Result<VecDeque<HistItem>, crate::storage::StoreError> {
    server.archive.flush().await;
    let range = ArchiveRange {
        reverse: true,
        ..Default::default()
    };
    let rows = server
        .store
        .archive_range(room, &range, max.saturating_mul(2).max(1))
        .await?;
    let mut out = VecDeque::new();
    for row in &rows {
        if out.len() >= max {
            break;
        }
        let Some(mut el) = results::stored_message(row) else {
            continue;
        };
        if is_subject_change(&el) {
            continue;
        }
        let _ = el.remove_child("x", ns::MUC_USER);
        out.push_front(HistItem::new(row.id.micros(), el));
    }
    Ok(out)
}

/// A message with a subject and neither body nor thread (XEP-0045 8.1).
pub(crate) fn is_subject_change(m: &Element) -> bool {
    m.has_child("subject", ns::CLIENT)
        && !m.has_child("body", ns::CLIENT)
        && !m.has_child("thread", ns::CLIENT)
}

/// Delete a room's archive (after what is queued for it is written).
pub(crate) async fn delete(server: &Server, room: &str) {
    server.archive.flush().await;
    if let Err(e) = server.store.archive_delete_owner(room).await {
        tracing::error!(error = %e, room, "cannot delete a room archive");
    }
}

/// A message kept for discussion history on join.
#[derive(Debug, Clone)]
pub(crate) struct HistItem {
    pub id: i64,
    /// The message as reflected (without `to`).
    pub stanza: Element,
    /// Its size in characters, for `maxchars`.
    pub chars: usize,
}

impl HistItem {
    pub(crate) fn new(id: i64, stanza: Element) -> Self {
        // The delay element adds about 100 characters on the wire.
        let chars = crate::xml::writer::to_string(&stanza).chars().count() + 100;
        HistItem { id, stanza, chars }
    }
}

/// The `<history/>` of a join (XEP-0045 section 7.2.14).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HistoryRequest {
    pub maxstanzas: Option<usize>,
    pub maxchars: Option<usize>,
    pub seconds: Option<u64>,
    pub since: Option<i64>,
}

impl HistoryRequest {
    pub(crate) fn parse(x: &Element) -> Self {
        let Some(h) = x.get_child("history", ns::MUC) else {
            return HistoryRequest::default();
        };
        let num = |a: &str| h.attr(a).and_then(|v| v.trim().parse::<u64>().ok());
        HistoryRequest {
            maxstanzas: num("maxstanzas").map(|v| v as usize),
            maxchars: num("maxchars").map(|v| v as usize),
            seconds: num("seconds"),
            since: h.attr("since").and_then(stanza::parse_timestamp),
        }
    }

    /// The history items to send, oldest first: at most `max` (the room's
    /// limit); `default` when the client set no limit of its own.
    pub(crate) fn select<'a>(
        &self,
        items: &'a VecDeque<HistItem>,
        default: usize,
        max: usize,
        now: i64,
    ) -> Vec<&'a HistItem> {
        let unlimited = self.maxstanzas.is_none()
            && self.maxchars.is_none()
            && self.seconds.is_none()
            && self.since.is_none();
        let mut n = self
            .maxstanzas
            .unwrap_or(if unlimited { default } else { max })
            .min(max);
        let mut oldest = i64::MIN;
        if let Some(s) = self.seconds {
            oldest = oldest.max(now.saturating_sub((s as i64).saturating_mul(1_000_000)));
        }
        if let Some(s) = self.since {
            oldest = oldest.max(s);
        }
        let mut out: Vec<&HistItem> = Vec::new();
        let mut chars = 0usize;
        for item in items.iter().rev() {
            if n == 0 || item.id < oldest {
                break;
            }
            if let Some(mc) = self.maxchars {
                if chars + item.chars > mc {
                    break;
                }
                chars += item.chars;
            }
            out.push(item);
            n -= 1;
        }
        out.reverse();
        out
    }
}

/// Run an archive query on a room and send the results and the final IQ
/// result to the requester (in a task of its own, off the room's actor).
/// Real JIDs are shown only when `show_jids`.
pub(crate) async fn run_query(
    server: Server,
    room: String,
    iq: Element,
    q: MamQuery,
    show_jids: bool,
) {
    let page = match server.archive.query(&room, &q).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%room, condition = e.condition, "room archive query refused");
            if let Some(r) = stanza::error_reply(&iq, &e) {
                server.route(r).await;
            }
            return;
        }
    };
    let to = iq.attr("from").unwrap_or_default().to_owned();
    let items: Vec<_> = if q.flip_page {
        page.items.iter().rev().collect()
    } else {
        page.items.iter().collect()
    };
    for item in items {
        let Some(mut m) = results::stored_message(item) else {
            continue;
        };
        if !show_jids {
            let _ = m.remove_child("x", ns::MUC_USER);
        }
        let msg = results::result_message(&to, &room, q.ns, q.queryid.as_deref(), item.id, m);
        server.route(msg).await;
    }
    let fin = results::fin(q.ns, q.queryid.as_deref(), &page);
    server.route(stanza::iq_result(&iq, Some(fin))).await;
}

/// XEP-0313 archive metadata of a room: its first and last messages.
pub(crate) async fn run_metadata(server: Server, room: String, iq: Element) {
    server.archive.flush().await;
    let reply = match server.store.archive_bounds(&room).await {
        Ok(b) => stanza::iq_result(&iq, Some(results::metadata(b))),
        Err(e) => {
            tracing::error!(error = %e, %room, "room archive metadata failed");
            match stanza::error_reply(&iq, &StanzaError::internal()) {
                Some(r) => r,
                None => return,
            }
        }
    };
    server.route(reply).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: i64) -> VecDeque<HistItem> {
        (1..=n)
            .map(|i| HistItem {
                id: i * 1_000_000,
                stanza: Element::bare("message", ns::CLIENT),
                chars: 100,
            })
            .collect()
    }

    fn req(xml: &str) -> HistoryRequest {
        HistoryRequest::parse(&xml.parse::<Element>().unwrap())
    }

    #[test]
    fn history_limits() {
        let h = items(30);
        let ids = |v: Vec<&HistItem>| v.iter().map(|i| i.id / 1_000_000).collect::<Vec<_>>();
        let none = req("<x xmlns='http://jabber.org/protocol/muc'/>");
        assert_eq!(none, HistoryRequest::default());
        assert_eq!(none.select(&h, 20, 50, 0).len(), 20);
        assert_eq!(ids(none.select(&h, 20, 50, 0))[0], 11);
        let r = req("<x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='5'/></x>");
        assert_eq!(ids(r.select(&h, 20, 50, 0)), vec![26, 27, 28, 29, 30]);
        let r = req("<x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='500'/></x>");
        assert_eq!(r.select(&h, 20, 25, 0).len(), 25, "capped by the room");
        let r = req("<x xmlns='http://jabber.org/protocol/muc'><history maxchars='0'/></x>");
        assert!(r.select(&h, 20, 50, 0).is_empty());
        let r = req("<x xmlns='http://jabber.org/protocol/muc'><history maxchars='350'/></x>");
        assert_eq!(ids(r.select(&h, 20, 50, 0)), vec![28, 29, 30]);
        let r = req("<x xmlns='http://jabber.org/protocol/muc'><history seconds='3'/></x>");
        assert_eq!(ids(r.select(&h, 20, 50, 30_000_000)), vec![27, 28, 29, 30]);
        let r = req(
            "<x xmlns='http://jabber.org/protocol/muc'><history since='1970-01-01T00:00:28Z'/></x>",
        );
        assert_eq!(ids(r.select(&h, 20, 50, 0)), vec![28, 29, 30]);
        let r = req(
            "<x xmlns='http://jabber.org/protocol/muc'><history since='1970-01-01T00:00:00Z' maxstanzas='2'/></x>",
        );
        assert_eq!(ids(r.select(&h, 20, 50, 0)), vec![29, 30]);
    }
}
