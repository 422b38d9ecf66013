//! Room archives: the batching writer (group commit off the rooms' hot
//! path), discussion history on join (XEP-0045 section 7.2.13-14), and
//! XEP-0313 queries on the room JID.
//!
//! The archive sits behind [`ArchiveWriter`] and the store's `MucStore`
//! archive calls, so it can move onto a shared archive layer without the
//! rooms noticing.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use minidom::Element;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::form::{Form, FormBuilder};
use crate::server::Server;
use crate::stanza::{self, StanzaError, name};
use crate::storage::muc::{ARCHIVE_MESSAGE, ArchiveQuery, ArchiveRow};
use crate::storage::{MucStore, Store};
use crate::xml::ns;

enum ArchiveCmd {
    Insert(ArchiveRow),
    DeleteRoom(String),
    Barrier(oneshot::Sender<()>),
}

/// Sends archive writes to the writer task; cheap to clone.
#[derive(Clone)]
pub(crate) struct ArchiveWriter {
    tx: mpsc::Sender<ArchiveCmd>,
}

/// Rows written per transaction at most.
const BATCH: usize = 256;
/// Trim a room's archive after this many inserts (when a cap is set).
const TRIM_EVERY: u64 = 500;

impl ArchiveWriter {
    /// Start the writer task (stops, after writing what is queued, when the
    /// server shuts down).
    pub(crate) fn start(server: &Server, keep: u64) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let store = server.store.clone();
        let shutdown = server.shutdown.clone();
        server
            .tasks
            .spawn(async move { writer_loop(store, rx, shutdown, keep).await });
        ArchiveWriter { tx }
    }

    pub(crate) async fn insert(&self, row: ArchiveRow) {
        if self.tx.send(ArchiveCmd::Insert(row)).await.is_err() {
            tracing::warn!("archive writer stopped; message not archived");
        }
    }

    pub(crate) async fn delete_room(&self, room: &str) {
        let _ = self.tx.send(ArchiveCmd::DeleteRoom(room.to_owned())).await;
    }

    /// Wait until everything queued so far is written.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(ArchiveCmd::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn writer_loop(
    store: Store,
    mut rx: mpsc::Receiver<ArchiveCmd>,
    shutdown: CancellationToken,
    keep: u64,
) {
    let mut since_trim: HashMap<String, u64> = HashMap::new();
    let mut batch: Vec<ArchiveCmd> = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        process(&store, &mut batch, &mut since_trim, keep).await;
    }
    // Shutting down: write what is still queued.
    rx.close();
    while let Ok(m) = rx.try_recv() {
        batch.push(m);
        if batch.len() >= BATCH {
            process(&store, &mut batch, &mut since_trim, keep).await;
        }
    }
    process(&store, &mut batch, &mut since_trim, keep).await;
}

async fn process(
    store: &Store,
    batch: &mut Vec<ArchiveCmd>,
    since_trim: &mut HashMap<String, u64>,
    keep: u64,
) {
    let mut rows: Vec<ArchiveRow> = Vec::new();
    for cmd in batch.drain(..) {
        match cmd {
            ArchiveCmd::Insert(r) => rows.push(r),
            ArchiveCmd::DeleteRoom(room) => {
                write_rows(store, &mut rows, since_trim, keep).await;
                since_trim.remove(&room);
                if let Err(e) = store.archive_delete_room(&room).await {
                    tracing::error!(error = %e, %room, "cannot delete a room archive");
                }
            }
            ArchiveCmd::Barrier(done) => {
                write_rows(store, &mut rows, since_trim, keep).await;
                let _ = done.send(());
            }
        }
    }
    write_rows(store, &mut rows, since_trim, keep).await;
}

async fn write_rows(
    store: &Store,
    rows: &mut Vec<ArchiveRow>,
    since_trim: &mut HashMap<String, u64>,
    keep: u64,
) {
    if rows.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=3 {
        match store.archive_insert(rows).await {
            Ok(()) => break,
            Err(e) if attempt < 3 => {
                tracing::warn!(error = %e, attempt, "room archive write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => {
                tracing::error!(error = %e, rows = rows.len(), "room archive write failed; messages not archived");
            }
        }
    }
    if keep > 0 {
        for r in rows.iter() {
            let n = since_trim.entry(r.room.clone()).or_insert(0);
            *n += 1;
            if *n >= TRIM_EVERY {
                *n = 0;
                if let Err(e) = store.archive_trim(&r.room, keep).await {
                    tracing::warn!(error = %e, room = %r.room, "archive trim failed");
                }
            }
        }
    }
    rows.clear();
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

/// A parsed XEP-0313 query on a room archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MamQuery {
    pub queryid: Option<String>,
    pub filter: ArchiveQuery,
    /// Filter by real JID (only for those who may see real JIDs).
    pub with_real: bool,
    /// RSM `<after>`/`<before>` ids (must exist in the archive).
    pub rsm_after: Option<i64>,
    pub rsm_before: Option<i64>,
    /// Ids from the form (`after-id`, `before-id`, `ids`) that must exist.
    pub must_exist: Vec<i64>,
    pub flip: bool,
}

/// An archive id from a string; ids are decimal microsecond stamps, so
/// anything else cannot be in the archive.
fn parse_id(s: &str) -> Result<i64, StanzaError> {
    s.trim()
        .parse::<i64>()
        .map_err(|_| StanzaError::item_not_found().with_text(format!("no archived message {s}")))
}

impl MamQuery {
    /// Parse `<query xmlns='urn:xmpp:mam:2'>` sent to the room `room`.
    pub(crate) fn parse(q: &Element, room: &str, page_limit: usize) -> Result<Self, StanzaError> {
        let mut filter = ArchiveQuery {
            kinds: None,
            limit: page_limit,
            ..Default::default()
        };
        let mut must_exist = Vec::new();
        let mut with_real = false;
        if let Some(form) = Form::find(q) {
            if let Some(ft) = form.form_type()
                && ft != ns::MAM
            {
                return Err(StanzaError::bad_request().with_text("unknown FORM_TYPE"));
            }
            for var in form.vars() {
                if !matches!(
                    var,
                    "with" | "start" | "end" | "before-id" | "after-id" | "ids"
                ) {
                    return Err(StanzaError::feature_not_implemented()
                        .with_text(format!("unsupported field {var}")));
                }
            }
            if let Some(w) = form.value("with").filter(|w| !w.trim().is_empty()) {
                let j = jid::Jid::new(w.trim())
                    .map_err(|_| StanzaError::jid_malformed().with_text("invalid 'with'"))?;
                if j.to_bare().to_string() == room {
                    // The room itself means everything; an occupant JID its nick.
                    if let Some(r) = j.resource() {
                        filter.nick = Some(r.as_str().to_owned());
                    }
                } else {
                    filter.sender_bare = Some(j.to_bare().to_string());
                    with_real = true;
                }
            }
            let time = |v: &str| {
                stanza::parse_timestamp(v)
                    .ok_or_else(|| StanzaError::bad_request().with_text("invalid timestamp"))
            };
            if let Some(s) = form.value("start") {
                filter.start = Some(time(s)?);
            }
            if let Some(e) = form.value("end") {
                filter.end = Some(time(e)?);
            }
            if let Some(a) = form.value("after-id") {
                let id = parse_id(a)?;
                must_exist.push(id);
                filter.after_id = Some(id);
            }
            if let Some(b) = form.value("before-id") {
                let id = parse_id(b)?;
                must_exist.push(id);
                filter.before_id = Some(id);
            }
            if let Some(ids) = form.values("ids") {
                let mut v = Vec::new();
                for i in ids {
                    let id = parse_id(i)?;
                    must_exist.push(id);
                    v.push(id);
                }
                filter.ids = Some(v);
            }
        }
        let mut rsm_after = None;
        let mut rsm_before = None;
        if let Some(set) = q.get_child("set", ns::RSM) {
            if let Some(m) = set.get_child("max", ns::RSM) {
                let max = m
                    .text()
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| StanzaError::bad_request().with_text("invalid RSM max"))?;
                filter.limit = max.min(page_limit);
            }
            if let Some(a) = set.get_child("after", ns::RSM) {
                let id = parse_id(&a.text())?;
                rsm_after = Some(id);
                filter.after_id = Some(filter.after_id.map_or(id, |x| x.max(id)));
            }
            if let Some(b) = set.get_child("before", ns::RSM) {
                filter.from_end = true;
                let t = b.text();
                if !t.trim().is_empty() {
                    let id = parse_id(&t)?;
                    rsm_before = Some(id);
                    filter.before_id = Some(filter.before_id.map_or(id, |x| x.min(id)));
                }
            }
            if set.get_child("index", ns::RSM).is_some() {
                return Err(StanzaError::feature_not_implemented().with_text("RSM index"));
            }
        }
        Ok(MamQuery {
            queryid: q.attr("queryid").map(str::to_owned),
            filter,
            with_real,
            rsm_after,
            rsm_before,
            must_exist,
            flip: q.get_child("flip-page", ns::MAM).is_some(),
        })
    }
}

/// The query form (`<iq type='get'><query xmlns='urn:xmpp:mam:2'/></iq>`).
pub(crate) fn query_form() -> Element {
    Element::builder("query", ns::MAM)
        .append(
            FormBuilder::new("form", ns::MAM)
                .field("with", Some("jid-single"), "", &[])
                .field("start", Some("text-single"), "", &[])
                .field("end", Some("text-single"), "", &[])
                .field("before-id", Some("text-single"), "", &[])
                .field("after-id", Some("text-single"), "", &[])
                .field("ids", Some("list-multi"), "", &[])
                .build(),
        )
        .build()
}

/// Run a room archive query and send the results and the final IQ result
/// to the requester (in a task of its own, off the room's actor).
pub(crate) async fn run_query(
    server: Server,
    writer: super::archive::ArchiveWriter,
    room: String,
    iq: Element,
    q: MamQuery,
    show_jids: bool,
) {
    writer.flush().await;
    let store = &server.store;
    let reply = async {
        for id in q
            .must_exist
            .iter()
            .chain(q.rsm_after.iter())
            .chain(q.rsm_before.iter())
        {
            if q.filter.ids.as_ref().is_some_and(|v| v.contains(id)) {
                continue;
            }
            match store.archive_has_id(&room, *id).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(StanzaError::item_not_found()
                        .with_text(format!("no archived message {id}")));
                }
                Err(e) => {
                    tracing::error!(error = %e, "archive lookup failed");
                    return Err(StanzaError::internal());
                }
            }
        }
        if let Some(ids) = &q.filter.ids {
            for id in ids {
                match store.archive_has_id(&room, *id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(StanzaError::item_not_found()
                            .with_text(format!("no archived message {id}")));
                    }
                    Err(_) => return Err(StanzaError::internal()),
                }
            }
        }
        store.archive_query(&room, &q.filter).await.map_err(|e| {
            tracing::error!(error = %e, "archive query failed");
            StanzaError::internal()
        })
    }
    .await;
    let page = match reply {
        Ok(p) => p,
        Err(e) => {
            if let Some(r) = stanza::error_reply(&iq, &e) {
                server.route(r).await;
            }
            return;
        }
    };
    let requester = iq.attr("from").unwrap_or_default().to_owned();
    let mut order: Vec<&ArchiveRow> = page.rows.iter().collect();
    if q.flip {
        order.reverse();
    }
    for row in order {
        let Some(msg) = result_message(&room, &requester, q.queryid.as_deref(), row, show_jids)
        else {
            continue;
        };
        server.route(msg).await;
    }
    let mut set = Element::builder("set", ns::RSM);
    if let (Some(first), Some(last)) = (page.rows.first(), page.rows.last()) {
        set = set
            .append(
                Element::builder("first", ns::RSM)
                    .append(first.id.to_string())
                    .build(),
            )
            .append(
                Element::builder("last", ns::RSM)
                    .append(last.id.to_string())
                    .build(),
            );
    }
    let mut fin = Element::builder("fin", ns::MAM).append(set.build());
    if !page.more {
        fin = fin.attr(name("complete"), "true");
    }
    server
        .route(stanza::iq_result(&iq, Some(fin.build())))
        .await;
}

fn result_message(
    room: &str,
    to: &str,
    queryid: Option<&str>,
    row: &ArchiveRow,
    show_jids: bool,
) -> Option<Element> {
    let text = std::str::from_utf8(&row.stanza).ok()?;
    let mut msg: Element = match text.parse() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, room, id = row.id, "archived stanza does not parse");
            return None;
        }
    };
    if show_jids {
        let _ = msg.remove_child("x", ns::MUC_USER);
        msg.append_child(
            Element::builder("x", ns::MUC_USER)
                .append(
                    Element::builder("item", ns::MUC_USER)
                        .attr(name("jid"), row.sender.as_str())
                        .build(),
                )
                .build(),
        );
    }
    let mut result = Element::builder("result", ns::MAM).attr(name("id"), row.id.to_string());
    if let Some(q) = queryid {
        result = result.attr(name("queryid"), q);
    }
    let forwarded = Element::builder("forwarded", ns::FORWARD)
        .append(
            Element::builder("delay", ns::DELAY)
                .attr(name("stamp"), stanza::format_timestamp(row.id))
                .build(),
        )
        .append(msg)
        .build();
    Some(
        stanza::build(
            "message",
            Some(room),
            Some(to),
            None,
            Some(&stanza::new_id()),
        )
        .append(result.append(forwarded).build())
        .build(),
    )
}

/// XEP-0313 archive metadata: the first and last archived messages.
pub(crate) async fn run_metadata(server: Server, writer: ArchiveWriter, room: String, iq: Element) {
    writer.flush().await;
    let store = &server.store;
    let q = |from_end: bool| ArchiveQuery {
        limit: 1,
        from_end,
        kinds: Some(vec![ARCHIVE_MESSAGE, crate::storage::muc::ARCHIVE_SUBJECT]),
        ..Default::default()
    };
    let (first, last) = match (
        store.archive_query(&room, &q(false)).await,
        store.archive_query(&room, &q(true)).await,
    ) {
        (Ok(a), Ok(b)) => (a.rows.into_iter().next(), b.rows.into_iter().next()),
        _ => {
            if let Some(r) = stanza::error_reply(&iq, &StanzaError::internal()) {
                server.route(r).await;
            }
            return;
        }
    };
    let mut md = Element::builder("metadata", ns::MAM);
    if let (Some(f), Some(l)) = (first, last) {
        for (tag, row) in [("start", f), ("end", l)] {
            md = md.append(
                Element::builder(tag, ns::MAM)
                    .attr(name("id"), row.id.to_string())
                    .attr(name("timestamp"), stanza::format_timestamp(row.id))
                    .build(),
            );
        }
    }
    server.route(stanza::iq_result(&iq, Some(md.build()))).await;
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

    #[test]
    fn mam_query_parsing() {
        let room = "r@c.x";
        let q: Element = "<query xmlns='urn:xmpp:mam:2' queryid='q1'>\
            <x xmlns='jabber:x:data' type='submit'>\
              <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
              <field var='with'><value>r@c.x/alice</value></field>\
              <field var='start'><value>1970-01-01T00:00:01Z</value></field>\
            </x>\
            <set xmlns='http://jabber.org/protocol/rsm'><max>500</max><before/></set>\
            <flip-page/></query>"
            .parse()
            .unwrap();
        let m = MamQuery::parse(&q, room, 100).unwrap();
        assert_eq!(m.queryid.as_deref(), Some("q1"));
        assert_eq!(m.filter.nick.as_deref(), Some("alice"));
        assert_eq!(m.filter.start, Some(1_000_000));
        assert_eq!(m.filter.limit, 100);
        assert!(m.filter.from_end && m.flip && !m.with_real);
        let q: Element = "<query xmlns='urn:xmpp:mam:2'>\
            <x xmlns='jabber:x:data' type='submit'>\
              <field var='with'><value>bob@x/res</value></field>\
              <field var='after-id'><value>17</value></field>\
            </x><set xmlns='http://jabber.org/protocol/rsm'><after>20</after></set></query>"
            .parse()
            .unwrap();
        let m = MamQuery::parse(&q, room, 100).unwrap();
        assert_eq!(m.filter.sender_bare.as_deref(), Some("bob@x"));
        assert!(m.with_real);
        assert_eq!(m.filter.after_id, Some(20));
        assert_eq!(m.must_exist, vec![17]);
        assert_eq!(m.rsm_after, Some(20));
        let bad: Element = "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
            <field var='fulltext'><value>x</value></field></x></query>"
            .parse()
            .unwrap();
        assert_eq!(
            MamQuery::parse(&bad, room, 100).unwrap_err().condition,
            "feature-not-implemented"
        );
        let bad: Element =
            "<query xmlns='urn:xmpp:mam:2'><set xmlns='http://jabber.org/protocol/rsm'>\
            <after>not-an-id</after></set></query>"
                .parse()
                .unwrap();
        assert_eq!(
            MamQuery::parse(&bad, room, 100).unwrap_err().condition,
            "item-not-found"
        );
    }
}
