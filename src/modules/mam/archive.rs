//! The archive service shared by user archives and MUC room archives:
//! archive ids, the batching writer task, and query execution.
//!
//! Writes: [`Archive::append`] takes an id and puts the row into a bounded
//! channel (senders wait only when it is full: backpressure). One writer task
//! drains the channel and commits everything it found in one transaction
//! (group commit: one WAL sync per batch on SQLite), so the delivery path
//! never waits for the database.
//!
//! Ids are taken and rows queued under one short lock, so the channel (and
//! therefore the commit order) is the id order: a reader never sees a
//! message while an older one of the same archive is still uncommitted.
//!
//! Reads: [`Archive::query`] first waits for the writer to commit what was
//! queued before it (read-your-writes: a message delivered before the query
//! was sent is in its results), then reads by id ranges only.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::query::{MamQuery, RsmBefore};
use crate::config::ArchiveConfig;
use crate::stanza::StanzaError;
use crate::storage::archive::{ArchiveId, ArchiveRange, Archived, NewArchived, WithFilter};
use crate::storage::{ArchiveStore, Store, now_micros};

/// How long a query waits for the writer before reading anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(10);
/// Delays between attempts to write a failing batch before it is dropped.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

enum WriterMsg {
    Row(NewArchived),
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
}

/// Counters for monitoring.
#[derive(Debug, Default)]
pub struct ArchiveStats {
    pub written: AtomicU64,
    pub batches: AtomicU64,
    /// Rows given up after the database kept failing.
    pub dropped: AtomicU64,
}

/// Limits applied to queries.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub max_page: usize,
    pub default_page: usize,
    pub count_limit: usize,
}

impl QueryLimits {
    pub fn from_config(c: &ArchiveConfig) -> Self {
        QueryLimits {
            max_page: c.max_page,
            default_page: c.default_page,
            count_limit: c.count_limit,
        }
    }
}

/// One page of query results, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<Archived>,
    /// The last page in the paging direction (XEP-0313 `complete`).
    pub complete: bool,
    /// The position of the first item in the result set, when known
    /// without counting (0 when the page starts the result set).
    pub first_index: Option<u64>,
    /// The size of the result set, when known cheaply.
    pub count: Option<u64>,
}

pub struct Archive {
    store: Store,
    tx: mpsc::Sender<WriterMsg>,
    rx: Mutex<Option<mpsc::Receiver<WriterMsg>>>,
    /// Held while an id is taken and its row queued.
    order: Mutex<()>,
    last_seq: AtomicI64,
    /// Rows queued and not yet committed (or given up).
    pending: Arc<AtomicUsize>,
    started: AtomicBool,
    batch_max: usize,
    pub limits: QueryLimits,
    pub stats: Arc<ArchiveStats>,
}

impl Archive {
    pub fn new(store: Store, config: &ArchiveConfig) -> Archive {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        Archive {
            store,
            tx,
            rx: Mutex::new(Some(rx)),
            order: Mutex::new(()),
            last_seq: AtomicI64::new(0),
            pending: Arc::new(AtomicUsize::new(0)),
            started: AtomicBool::new(false),
            batch_max: config.batch_max.max(1),
            limits: QueryLimits::from_config(config),
            stats: Arc::new(ArchiveStats::default()),
        }
    }

    /// Load the highest committed id (ids stay increasing across restarts
    /// even if the clock went back) and start the writer task, which stops
    /// after committing what is queued when the server shuts down.
    pub async fn start(
        &self,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<(), crate::storage::StoreError> {
        let floor = self.store.archive_max_seq().await?;
        self.last_seq.fetch_max(floor, Ordering::SeqCst);
        let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(()); // already started
        };
        let writer = Writer {
            store: self.store.clone(),
            rx,
            pending: self.pending.clone(),
            stats: self.stats.clone(),
            batch_max: self.batch_max,
            shutdown,
        };
        tasks.spawn(writer.run());
        self.started.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// A new id, strictly greater than every id this process issued and
    /// every id committed before it started.
    fn next_id(&self) -> ArchiveId {
        let now = now_micros();
        let mut cur = self.last_seq.load(Ordering::Relaxed);
        loop {
            let next = if now > cur { now } else { cur + 1 };
            match self.last_seq.compare_exchange_weak(
                cur,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return ArchiveId {
                        seq: next,
                        tag: (rand::random::<u32>() & i32::MAX as u32) as i32,
                    };
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Archive a message: `build` gets the new id and returns the row. The
    /// row is queued for the writer (waiting only while the queue is full)
    /// and the id returned at once, before the row is committed. None if the
    /// archive is shut down or the row could not be written.
    pub async fn append(&self, build: impl FnOnce(ArchiveId) -> NewArchived) -> Option<ArchiveId> {
        if !self.started.load(Ordering::SeqCst) {
            // No writer (tools that do not run the server): write directly.
            let _g = self.order.lock().unwrap_or_else(|p| p.into_inner());
            let id = self.next_id();
            drop(_g);
            let row = build(id);
            return match self.store.archive_insert(std::slice::from_ref(&row)).await {
                Ok(()) => Some(id),
                Err(e) => {
                    tracing::error!(error = %e, "archive write failed");
                    None
                }
            };
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let permit = match self.tx.reserve().await {
            Ok(p) => p,
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("archive writer stopped; message not archived");
                return None;
            }
        };
        let _g = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_id();
        permit.send(WriterMsg::Row(build(id)));
        Some(id)
    }

    /// Wait until everything queued so far is committed.
    pub async fn flush(&self) {
        if self.pending.load(Ordering::SeqCst) == 0 || !self.started.load(Ordering::SeqCst) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(WriterMsg::Flush(tx)).await.is_ok()
            && tokio::time::timeout(FLUSH_WAIT, rx).await.is_err()
        {
            tracing::warn!("archive writer did not catch up within {FLUSH_WAIT:?}");
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Run a parsed query against `owner`'s archive. Errors are the stanza
    /// errors of XEP-0313: `item-not-found` for ids not in the archive,
    /// `bad-request` for too many ids, `internal-server-error` for storage
    /// failures.
    pub async fn query(&self, owner: &str, q: &MamQuery) -> Result<Page, StanzaError> {
        self.flush().await;
        let lim = self.limits;
        let max = q.max.unwrap_or(lim.default_page).min(lim.max_page);
        let parse = |s: &str| {
            s.parse::<ArchiveId>().map_err(|_| {
                StanzaError::item_not_found().with_text(format!("no message with id {s}"))
            })
        };
        let after_id = q.after_id.as_deref().map(parse).transpose()?;
        let before_id = q.before_id.as_deref().map(parse).transpose()?;
        let rsm_after = q.after.as_deref().map(parse).transpose()?;
        let rsm_before = match &q.before {
            Some(RsmBefore::Id(s)) => Some(parse(s)?),
            _ => None,
        };
        let ids = match &q.ids {
            Some(v) if v.len() > lim.max_page => {
                return Err(StanzaError::policy_violation()
                    .with_text(format!("at most {} ids per query", lim.max_page)));
            }
            Some(v) => Some(v.iter().map(|s| parse(s)).collect::<Result<Vec<_>, _>>()?),
            None => None,
        };
        let mut refs: Vec<ArchiveId> = [after_id, before_id, rsm_after, rsm_before]
            .into_iter()
            .flatten()
            .collect();
        if let Some(ids) = &ids {
            refs.extend(ids.iter().copied());
        }
        refs.sort_unstable();
        refs.dedup();
        if !refs.is_empty() {
            let found = self
                .store
                .archive_existing(owner, &refs)
                .await
                .map_err(internal)?;
            if let Some(missing) = refs.iter().find(|r| !found.contains(r)) {
                return Err(StanzaError::item_not_found()
                    .with_text(format!("no message with id {missing}")));
            }
        }

        // Every bound as an exclusive id bound. Timestamps compare at the
        // millisecond precision of the delay stamps clients see.
        let mut lower: Option<i64> = None;
        let mut upper: Option<i64> = None;
        let mut raise = |v: i64| lower = Some(lower.map_or(v, |l| l.max(v)));
        if let Some(s) = q.start {
            raise(s.div_euclid(1000) * 1000 - 1);
        }
        for id in [after_id, rsm_after].into_iter().flatten() {
            raise(id.seq);
        }
        let mut cap = |v: i64| upper = Some(upper.map_or(v, |u| u.min(v)));
        if let Some(e) = q.end {
            cap(e.div_euclid(1000) * 1000 + 1000);
        }
        for id in [before_id, rsm_before].into_iter().flatten() {
            cap(id.seq);
        }
        let with = q.with.as_ref().map(|j| WithFilter {
            bare: j.to_bare().to_string(),
            resource: j.resource().map(|r| r.to_string()),
        });
        let backwards = q.before.is_some();
        let at_end = !backwards || matches!(q.before, Some(RsmBefore::Last));

        if let Some(ids) = ids {
            // Fetch by id, then apply the other filters and the page.
            let seqs: Vec<i64> = ids.iter().map(|i| i.seq).collect();
            let mut rows = self
                .store
                .archive_get(owner, &seqs)
                .await
                .map_err(internal)?;
            rows.retain(|r| {
                lower.is_none_or(|l| r.id.seq > l)
                    && upper.is_none_or(|u| r.id.seq < u)
                    && with.as_ref().is_none_or(|w| {
                        r.with_bare == w.bare
                            && w.resource.as_ref().is_none_or(|res| &r.with_res == res)
                    })
            });
            rows.sort_by_key(|r| r.id);
            let total = rows.len();
            let complete = total <= max;
            let items: Vec<Archived> = if backwards {
                rows.split_off(total.saturating_sub(max))
            } else {
                rows.truncate(max);
                rows
            };
            let at_start = if backwards {
                complete && rsm_after.is_none()
            } else {
                rsm_after.is_none()
            };
            return Ok(Page {
                first_index: (at_start && !items.is_empty()).then_some(0),
                count: (at_start && at_end).then_some(total as u64),
                items,
                complete,
            });
        }

        let range = ArchiveRange {
            after: lower,
            before: upper,
            with,
            reverse: backwards,
        };
        if max == 0 {
            // RSM item count: answered when cheap (bounded count).
            let count = self
                .store
                .archive_count(owner, &range, lim.count_limit)
                .await
                .map_err(internal)?;
            return Ok(Page {
                items: Vec::new(),
                complete: count == Some(0),
                first_index: None,
                count,
            });
        }
        let mut items = self
            .store
            .archive_range(owner, &range, max + 1)
            .await
            .map_err(internal)?;
        let complete = items.len() <= max;
        items.truncate(max);
        if backwards {
            items.reverse();
        }
        let at_start = if backwards {
            complete && rsm_after.is_none()
        } else {
            rsm_after.is_none()
        };
        let at_end = if backwards { at_end } else { complete };
        Ok(Page {
            first_index: (at_start && !items.is_empty()).then_some(0),
            count: (at_start && at_end).then_some(items.len() as u64),
            items,
            complete,
        })
    }
}

fn internal(e: crate::storage::StoreError) -> StanzaError {
    tracing::error!(error = %e, "archive query failed");
    StanzaError::internal()
}

struct Writer {
    store: Store,
    rx: mpsc::Receiver<WriterMsg>,
    pending: Arc<AtomicUsize>,
    stats: Arc<ArchiveStats>,
    batch_max: usize,
    shutdown: CancellationToken,
}

impl Writer {
    async fn run(mut self) {
        let mut rows: Vec<NewArchived> = Vec::with_capacity(self.batch_max);
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let msg = tokio::select! {
                biased;
                m = self.rx.recv() => m,
                _ = self.shutdown.cancelled() => None,
            };
            let Some(msg) = msg else { break };
            self.take(msg, &mut rows, &mut waiters);
            // Group commit: everything that queued up meanwhile goes into
            // the same transaction.
            while rows.len() < self.batch_max {
                match self.rx.try_recv() {
                    Ok(m) => self.take(m, &mut rows, &mut waiters),
                    Err(_) => break,
                }
            }
            self.commit(&mut rows).await;
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
        // Shutting down: commit what is queued, then stop.
        self.rx.close();
        while let Ok(m) = self.rx.try_recv() {
            self.take(m, &mut rows, &mut waiters);
            if rows.len() >= self.batch_max {
                self.commit(&mut rows).await;
            }
        }
        self.commit(&mut rows).await;
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        tracing::debug!("archive writer stopped");
    }

    fn take(
        &self,
        msg: WriterMsg,
        rows: &mut Vec<NewArchived>,
        waiters: &mut Vec<oneshot::Sender<()>>,
    ) {
        match msg {
            WriterMsg::Row(r) => rows.push(r),
            WriterMsg::Flush(w) => waiters.push(w),
        }
    }

    async fn commit(&self, rows: &mut Vec<NewArchived>) {
        if rows.is_empty() {
            return;
        }
        let n = rows.len();
        let mut attempt = 0;
        loop {
            match self.store.archive_insert(rows).await {
                Ok(()) => {
                    self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if attempt < RETRY_DELAYS.len() => {
                    tracing::warn!(error = %e, rows = n, attempt, "archive batch failed; retrying");
                    tokio::time::sleep(RETRY_DELAYS[attempt]).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, rows = n, "archive batch failed; messages not archived");
                    self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    break;
                }
            }
        }
        rows.clear();
        self.pending.fetch_sub(n, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    fn row(id: ArchiveId, n: usize) -> NewArchived {
        NewArchived {
            owner: "alice@x".into(),
            id,
            with_bare: "bob@x".into(),
            with_res: String::new(),
            outgoing: false,
            stanza: format!("<message xmlns='jabber:client'><body>{n}</body></message>")
                .into_bytes(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_commit_in_id_order_and_shutdown_drains() {
        for_each_store(|store| async move {
            let config = ArchiveConfig {
                queue: 64,
                batch_max: 50,
                ..Default::default()
            };
            // Without a writer, rows are written directly.
            let direct = Archive::new(store.clone(), &config);
            let first = direct.append(|id| row(id, 0)).await.unwrap();

            let archive = Arc::new(Archive::new(store.clone(), &config));
            let tasks = TaskTracker::new();
            let shutdown = CancellationToken::new();
            archive.start(&tasks, shutdown.clone()).await.unwrap();
            let mut handles = Vec::new();
            for t in 0..4 {
                let a = archive.clone();
                handles.push(tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for i in 0..300 {
                        ids.push(a.append(|id| row(id, t * 1000 + i)).await.unwrap());
                    }
                    ids
                }));
            }
            let mut ids = vec![first];
            for h in handles {
                ids.extend(h.await.unwrap());
            }
            archive.flush().await;
            let page = archive
                .store()
                .archive_range("alice@x", &ArchiveRange::default(), 2000)
                .await
                .unwrap();
            let stored: Vec<ArchiveId> = page.iter().map(|r| r.id).collect();
            ids.sort();
            assert_eq!(stored, ids, "every id committed once, ids unique");
            assert!(stored[0] == first && stored[1].seq > first.seq);
            assert!(archive.stats.batches.load(Ordering::Relaxed) >= 1200 / 50);

            // Rows queued before shutdown are committed by the writer on its
            // way out; afterwards appends are refused.
            for i in 0..100 {
                archive.append(|id| row(id, 5000 + i)).await.unwrap();
            }
            shutdown.cancel();
            tasks.close();
            tasks.wait().await;
            let n = archive
                .store()
                .archive_count("alice@x", &ArchiveRange::default(), 10_000)
                .await
                .unwrap();
            assert_eq!(n, Some(1301));
            assert!(archive.append(|id| row(id, 0)).await.is_none());
            // A restarted archive continues above every committed id, even
            // one from a clock that ran ahead.
            let future = ArchiveId {
                seq: now_micros() + 3_600_000_000,
                tag: 9,
            };
            store.archive_insert(&[row(future, 9)]).await.unwrap();
            let again = Archive::new(store.clone(), &config);
            let t2 = TaskTracker::new();
            again.start(&t2, CancellationToken::new()).await.unwrap();
            assert_eq!(again.next_id().seq, future.seq + 1);
        })
        .await;
    }
}
