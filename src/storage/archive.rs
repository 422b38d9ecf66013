//! Message archive storage (XEP-0313): user archives (owner = a user's bare
//! JID) and MUC room archives (owner = the room's bare JID) share one table.
//!
//! Layout: the table is keyed by `(owner, id)` (SQLite `WITHOUT ROWID`, so
//! the table *is* that B-tree and one owner's messages are contiguous and in
//! archive order). Every page is a range read on that key; the `with` filter
//! reads the one secondary index `(owner, with_bare, id)`. Nothing here
//! counts or skips rows to find a page: paging is by id bounds only.
//!
//! Archive ids ([`ArchiveId`]) are a strictly increasing 63-bit sequence
//! (epoch microseconds, bumped when two messages share a microsecond) plus
//! a random 31-bit tag, so the public id is time-ordered but unpredictable
//! (XEP-0313 section 3, XEP-0359 section 8).

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::Row;

use super::{Store, StoreResult};
use crate::with_pool;

/// The id of an archived message: `seq` orders the archive (and is the
/// receive time in epoch microseconds); `tag` makes the public form
/// unguessable. Public form: 20 characters of Crockford base32, 13 for `seq`
/// then 7 for `tag`, so that public ids sort like the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArchiveId {
    pub seq: i64,
    pub tag: i32,
}

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn decode_char(c: u8) -> Option<u64> {
    let c = c.to_ascii_uppercase();
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u64)
}

impl ArchiveId {
    /// Length of the public form.
    pub const LEN: usize = 20;

    /// The receive time, microseconds since the epoch.
    pub fn micros(&self) -> i64 {
        self.seq
    }
}

impl fmt::Display for ArchiveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Self::LEN];
        let seq = self.seq as u64;
        for (i, b) in buf[..13].iter_mut().enumerate() {
            let shift = 5 * (12 - i);
            *b = ALPHABET[((seq >> shift) & 31) as usize];
        }
        let tag = self.tag as u32 as u64;
        for (i, b) in buf[13..].iter_mut().enumerate() {
            let shift = 5 * (6 - i);
            *b = ALPHABET[((tag >> shift) & 31) as usize];
        }
        // The alphabet is ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// A string that is not an archive id we could have issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an archive id")]
pub struct BadArchiveId;

impl FromStr for ArchiveId {
    type Err = BadArchiveId;
    fn from_str(s: &str) -> Result<Self, BadArchiveId> {
        let b = s.as_bytes();
        if b.len() != Self::LEN {
            return Err(BadArchiveId);
        }
        let mut seq: u128 = 0;
        for &c in &b[..13] {
            seq = (seq << 5) | decode_char(c).ok_or(BadArchiveId)? as u128;
        }
        let mut tag: u64 = 0;
        for &c in &b[13..] {
            tag = (tag << 5) | decode_char(c).ok_or(BadArchiveId)?;
        }
        if seq > i64::MAX as u128 || tag > i32::MAX as u64 {
            return Err(BadArchiveId);
        }
        Ok(ArchiveId {
            seq: seq as i64,
            tag: tag as i32,
        })
    }
}

/// A message to archive.
#[derive(Debug, Clone, PartialEq)]
pub struct NewArchived {
    /// The archive: a bare JID (user or room).
    pub owner: String,
    pub id: ArchiveId,
    /// The other party's bare JID (for rooms: whatever the room's `with`
    /// filter matches, e.g. the occupant's bare real JID).
    pub with_bare: String,
    /// The other party's resource, or empty.
    pub with_res: String,
    /// Sent by the owner (true) or received (false).
    pub outgoing: bool,
    /// The message, serialised (standalone, with its namespace).
    pub stanza: Vec<u8>,
}

/// A message read back from the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Archived {
    pub id: ArchiveId,
    pub with_bare: String,
    pub with_res: String,
    pub outgoing: bool,
    pub stanza: Vec<u8>,
}

/// The `with` filter of a query: a bare JID matches every resource; a full
/// JID matches exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WithFilter {
    pub bare: String,
    pub resource: Option<String>,
}

/// Which part of an archive to read: the rows with `after < seq < before`
/// (both exclusive, both optional) and the `with` filter, read from the
/// oldest (`reverse = false`) or from the newest (`reverse = true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveRange {
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub with: Option<WithFilter>,
    pub reverse: bool,
}

impl ArchiveRange {
    /// Is the range certainly empty (bounds crossed)?
    pub fn is_empty(&self) -> bool {
        matches!((self.after, self.before), (Some(a), Some(b)) if b <= a.saturating_add(1))
    }
}

/// Stored archiving preferences of one owner (XEP-0441) and its retention.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPrefs {
    /// `always`, `never` or `roster`; None = the server default.
    pub default_mode: Option<String>,
    pub always: Vec<String>,
    pub never: Vec<String>,
    /// Seconds to keep messages; None = the server default; 0 = forever.
    pub retention_secs: Option<i64>,
}

#[async_trait]
pub trait ArchiveStore {
    /// Insert a batch in one transaction (ids already taken are skipped)
    /// and raise the stored highest id.
    async fn archive_insert(&self, rows: &[NewArchived]) -> StoreResult<()>;
    /// Up to `limit` messages of `owner` in `range`, in the range's reading
    /// order (newest first when `reverse`).
    async fn archive_range(
        &self,
        owner: &str,
        range: &ArchiveRange,
        limit: usize,
    ) -> StoreResult<Vec<Archived>>;
    /// The number of messages in `range`, if it is at most `cap` (reading
    /// at most `cap + 1` index entries); None when larger.
    async fn archive_count(
        &self,
        owner: &str,
        range: &ArchiveRange,
        cap: usize,
    ) -> StoreResult<Option<u64>>;
    /// The messages with these `seq`s (any order; missing ones absent).
    async fn archive_get(&self, owner: &str, seqs: &[i64]) -> StoreResult<Vec<Archived>>;
    /// Which of these ids exist (seq and tag both match).
    async fn archive_existing(&self, owner: &str, ids: &[ArchiveId])
    -> StoreResult<Vec<ArchiveId>>;
    /// The oldest and newest ids of an archive (None if empty).
    async fn archive_bounds(&self, owner: &str) -> StoreResult<Option<(ArchiveId, ArchiveId)>>;
    /// Delete up to `limit` of the oldest messages with `seq < before`;
    /// returns how many went.
    async fn archive_expire(&self, owner: &str, before: i64, limit: usize) -> StoreResult<u64>;
    /// Delete a whole archive (e.g. a destroyed room).
    async fn archive_delete_owner(&self, owner: &str) -> StoreResult<u64>;
    /// The first archive owner after `after` in key order (an index seek per
    /// owner, so sweeping all archives never scans messages).
    async fn archive_next_owner(&self, after: &str) -> StoreResult<Option<String>>;
    /// The highest archive id ever committed (0 if none).
    async fn archive_max_seq(&self) -> StoreResult<i64>;
    async fn archive_prefs(&self, owner: &str) -> StoreResult<Option<StoredPrefs>>;
    /// Store the preferences (default mode and lists; retention unchanged).
    async fn set_archive_prefs(&self, owner: &str, prefs: &StoredPrefs) -> StoreResult<()>;
    /// Set (Some) or clear (None) the owner's retention in seconds (0 = forever).
    async fn set_archive_retention(&self, owner: &str, secs: Option<i64>) -> StoreResult<()>;
    /// Owners with their own retention setting.
    async fn archive_retention_overrides(&self) -> StoreResult<Vec<(String, i64)>>;
}

const COLS: &str = "id, tag, with_bare, with_res, outgoing, stanza";

fn row_to_archived<R>(r: &R) -> StoreResult<Archived>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i32: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Archived {
        id: ArchiveId {
            seq: r.try_get("id")?,
            tag: r.try_get("tag")?,
        },
        with_bare: r.try_get("with_bare")?,
        with_res: r.try_get("with_res")?,
        outgoing: r.try_get("outgoing")?,
        stanza: r.try_get("stanza")?,
    })
}

/// The WHERE clause of a range (after `owner = $1`), with `$n` placeholders
/// from `$2`, and the values to bind in order.
enum Bind {
    Int(i64),
    Text(String),
}

fn range_where(range: &ArchiveRange) -> (String, Vec<Bind>) {
    let mut sql = String::from("owner = $1");
    let mut binds = Vec::new();
    let mut n = 2;
    if let Some(a) = range.after {
        sql.push_str(&format!(" AND id > ${n}"));
        binds.push(Bind::Int(a));
        n += 1;
    }
    if let Some(b) = range.before {
        sql.push_str(&format!(" AND id < ${n}"));
        binds.push(Bind::Int(b));
        n += 1;
    }
    if let Some(w) = &range.with {
        sql.push_str(&format!(" AND with_bare = ${n}"));
        binds.push(Bind::Text(w.bare.clone()));
        n += 1;
        if let Some(r) = &w.resource {
            sql.push_str(&format!(" AND with_res = ${n}"));
            binds.push(Bind::Text(r.clone()));
        }
    }
    (sql, binds)
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Int(i) => q.bind(*i),
                Bind::Text(t) => q.bind(t.clone()),
            };
        }
        q
    }};
}

/// SQLite multi-row insert statements are prepared for these batch sizes
/// only (a handful of cached statements instead of one per batch length).
const SQLITE_CHUNKS: [usize; 4] = [64, 16, 4, 1];

fn sqlite_insert_sql(rows: usize) -> String {
    let mut s = String::from(
        "INSERT INTO archive (owner, id, tag, with_bare, with_res, outgoing, stanza) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        s.push_str("(?,?,?,?,?,?,?)");
    }
    s.push_str(" ON CONFLICT DO NOTHING");
    s
}

fn join_jids(v: &[String]) -> String {
    v.join("\n")
}

fn split_jids(s: &str) -> Vec<String> {
    s.split('\n')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Store {
    async fn archive_insert_sqlite(
        pool: &sqlx::SqlitePool,
        rows: &[NewArchived],
        max_seq: i64,
    ) -> StoreResult<()> {
        let mut tx = pool.begin().await?;
        let mut rest = rows;
        while !rest.is_empty() {
            let n = SQLITE_CHUNKS
                .iter()
                .copied()
                .find(|&c| c <= rest.len())
                .unwrap_or(1);
            let (chunk, tail) = rest.split_at(n);
            let sql = sqlite_insert_sql(n);
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(r.owner.as_str())
                    .bind(r.id.seq)
                    .bind(r.id.tag)
                    .bind(r.with_bare.as_str())
                    .bind(r.with_res.as_str())
                    .bind(r.outgoing)
                    .bind(r.stanza.as_slice());
            }
            q.execute(&mut *tx).await?;
            rest = tail;
        }
        sqlx::query("UPDATE archive_meta SET value = ? WHERE name = 'max_id' AND value < ?")
            .bind(max_seq)
            .bind(max_seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn archive_insert_pg(
        pool: &sqlx::PgPool,
        rows: &[NewArchived],
        max_seq: i64,
    ) -> StoreResult<()> {
        let mut owners = Vec::with_capacity(rows.len());
        let mut seqs = Vec::with_capacity(rows.len());
        let mut tags = Vec::with_capacity(rows.len());
        let mut withs = Vec::with_capacity(rows.len());
        let mut ress = Vec::with_capacity(rows.len());
        let mut outs = Vec::with_capacity(rows.len());
        let mut stanzas = Vec::with_capacity(rows.len());
        for r in rows {
            owners.push(r.owner.as_str());
            seqs.push(r.id.seq);
            tags.push(r.id.tag);
            withs.push(r.with_bare.as_str());
            ress.push(r.with_res.as_str());
            outs.push(r.outgoing);
            stanzas.push(r.stanza.as_slice());
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO archive (owner, id, tag, with_bare, with_res, outgoing, stanza) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::int[], $4::text[], $5::text[], \
             $6::bool[], $7::bytea[]) ON CONFLICT DO NOTHING",
        )
        .bind(&owners)
        .bind(&seqs)
        .bind(&tags)
        .bind(&withs)
        .bind(&ress)
        .bind(&outs)
        .bind(&stanzas)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE archive_meta SET value = $1 WHERE name = 'max_id' AND value < $1")
            .bind(max_seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl ArchiveStore for Store {
    async fn archive_insert(&self, rows: &[NewArchived]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let max_seq = rows.iter().map(|r| r.id.seq).max().unwrap_or(0);
        match &self.db {
            super::Db::Sqlite(pool) => Self::archive_insert_sqlite(pool, rows, max_seq).await,
            super::Db::Postgres(pool) => Self::archive_insert_pg(pool, rows, max_seq).await,
        }
    }

    async fn archive_range(
        &self,
        owner: &str,
        range: &ArchiveRange,
        limit: usize,
    ) -> StoreResult<Vec<Archived>> {
        if limit == 0 || range.is_empty() {
            return Ok(Vec::new());
        }
        let (cond, binds) = range_where(range);
        let order = if range.reverse { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT {COLS} FROM archive WHERE {cond} ORDER BY id {order} LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        with_pool!(self, pool => {
            let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner), &binds);
            let rows = q.fetch_all(pool).await?;
            rows.iter().map(row_to_archived).collect()
        })
    }

    async fn archive_count(
        &self,
        owner: &str,
        range: &ArchiveRange,
        cap: usize,
    ) -> StoreResult<Option<u64>> {
        if range.is_empty() {
            return Ok(Some(0));
        }
        let (cond, binds) = range_where(range);
        let sql = format!(
            "SELECT COUNT(*) AS n FROM (SELECT 1 AS one FROM archive WHERE {cond} LIMIT {}) AS t",
            cap.saturating_add(1).min(i64::MAX as usize)
        );
        let n: i64 = with_pool!(self, pool => {
            let q = bind_all!(sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner), &binds);
            q.fetch_one(pool).await?.try_get("n")?
        });
        let n = n.max(0) as u64;
        Ok((n <= cap as u64).then_some(n))
    }

    async fn archive_get(&self, owner: &str, seqs: &[i64]) -> StoreResult<Vec<Archived>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        match &self.db {
            super::Db::Sqlite(pool) => {
                let marks = vec!["?"; seqs.len()].join(",");
                let sql = format!("SELECT {COLS} FROM archive WHERE owner = ? AND id IN ({marks})");
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner);
                for s in seqs {
                    q = q.bind(*s);
                }
                let rows = q.fetch_all(pool).await?;
                rows.iter().map(row_to_archived).collect()
            }
            super::Db::Postgres(pool) => {
                let sql = format!("SELECT {COLS} FROM archive WHERE owner = $1 AND id = ANY($2)");
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(owner)
                    .bind(seqs)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(row_to_archived).collect()
            }
        }
    }

    async fn archive_existing(
        &self,
        owner: &str,
        ids: &[ArchiveId],
    ) -> StoreResult<Vec<ArchiveId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = ids.iter().map(|i| i.seq).collect();
        let found: Vec<ArchiveId> = match &self.db {
            super::Db::Sqlite(pool) => {
                let marks = vec!["?"; seqs.len()].join(",");
                let sql =
                    format!("SELECT id, tag FROM archive WHERE owner = ? AND id IN ({marks})");
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner);
                for s in &seqs {
                    q = q.bind(*s);
                }
                let rows = q.fetch_all(pool).await?;
                rows.iter()
                    .map(|r| {
                        Ok(ArchiveId {
                            seq: r.try_get("id")?,
                            tag: r.try_get("tag")?,
                        })
                    })
                    .collect::<StoreResult<_>>()?
            }
            super::Db::Postgres(pool) => {
                let rows =
                    sqlx::query("SELECT id, tag FROM archive WHERE owner = $1 AND id = ANY($2)")
                        .bind(owner)
                        .bind(&seqs)
                        .fetch_all(pool)
                        .await?;
                rows.iter()
                    .map(|r| {
                        Ok(ArchiveId {
                            seq: r.try_get("id")?,
                            tag: r.try_get("tag")?,
                        })
                    })
                    .collect::<StoreResult<_>>()?
            }
        };
        Ok(ids.iter().filter(|i| found.contains(i)).copied().collect())
    }

    async fn archive_bounds(&self, owner: &str) -> StoreResult<Option<(ArchiveId, ArchiveId)>> {
        let first = "SELECT id, tag FROM archive WHERE owner = $1 ORDER BY id ASC LIMIT 1";
        let last = "SELECT id, tag FROM archive WHERE owner = $1 ORDER BY id DESC LIMIT 1";
        with_pool!(self, pool => {
            let a = sqlx::query(first).bind(owner).fetch_optional(pool).await?;
            let b = sqlx::query(last).bind(owner).fetch_optional(pool).await?;
            match (a, b) {
                (Some(a), Some(b)) => Ok(Some((
                    ArchiveId { seq: a.try_get("id")?, tag: a.try_get("tag")? },
                    ArchiveId { seq: b.try_get("id")?, tag: b.try_get("tag")? },
                ))),
                _ => Ok(None),
            }
        })
    }

    async fn archive_expire(&self, owner: &str, before: i64, limit: usize) -> StoreResult<u64> {
        // The (limit+1)-th oldest expired id bounds this round, so that one
        // transaction never deletes more than `limit` rows.
        let bound_q =
            "SELECT id FROM archive WHERE owner = $1 AND id < $2 ORDER BY id LIMIT 1 OFFSET $3";
        let del = "DELETE FROM archive WHERE owner = $1 AND id < $2";
        with_pool!(self, pool => {
            let bound: Option<i64> = sqlx::query(bound_q)
                .bind(owner)
                .bind(before)
                .bind(limit as i64)
                .fetch_optional(pool)
                .await?
                .map(|r| r.try_get("id"))
                .transpose()?;
            let upto = bound.map(|b| b.min(before)).unwrap_or(before);
            Ok(sqlx::query(del).bind(owner).bind(upto).execute(pool).await?.rows_affected())
        })
    }

    async fn archive_delete_owner(&self, owner: &str) -> StoreResult<u64> {
        with_pool!(self, pool => Ok(sqlx::query("DELETE FROM archive WHERE owner = $1")
            .bind(owner)
            .execute(pool)
            .await?
            .rows_affected()))
    }

    async fn archive_next_owner(&self, after: &str) -> StoreResult<Option<String>> {
        let q = "SELECT owner FROM archive WHERE owner > $1 ORDER BY owner LIMIT 1";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(after).fetch_optional(pool).await?;
            row.map(|r| r.try_get::<String, _>("owner")).transpose().map_err(Into::into)
        })
    }

    async fn archive_max_seq(&self) -> StoreResult<i64> {
        let q = "SELECT value FROM archive_meta WHERE name = 'max_id'";
        with_pool!(self, pool => {
            let row = sqlx::query(q).fetch_optional(pool).await?;
            Ok(row.map(|r| r.try_get::<i64, _>("value")).transpose()?.unwrap_or(0))
        })
    }

    async fn archive_prefs(&self, owner: &str) -> StoreResult<Option<StoredPrefs>> {
        let q = "SELECT default_mode, always_jids, never_jids, retention_secs FROM archive_prefs WHERE owner = $1";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(owner).fetch_optional(pool).await?;
            row.map(|r| -> StoreResult<StoredPrefs> {
                Ok(StoredPrefs {
                    default_mode: r.try_get("default_mode")?,
                    always: split_jids(&r.try_get::<String, _>("always_jids")?),
                    never: split_jids(&r.try_get::<String, _>("never_jids")?),
                    retention_secs: r.try_get("retention_secs")?,
                })
            })
            .transpose()
        })
    }

    async fn set_archive_prefs(&self, owner: &str, p: &StoredPrefs) -> StoreResult<()> {
        let q = "INSERT INTO archive_prefs (owner, default_mode, always_jids, never_jids) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (owner) DO UPDATE SET \
                 default_mode = excluded.default_mode, always_jids = excluded.always_jids, \
                 never_jids = excluded.never_jids";
        with_pool!(self, pool => {
            sqlx::query(q)
                .bind(owner)
                .bind(p.default_mode.as_deref())
                .bind(join_jids(&p.always))
                .bind(join_jids(&p.never))
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    async fn set_archive_retention(&self, owner: &str, secs: Option<i64>) -> StoreResult<()> {
        let q = "INSERT INTO archive_prefs (owner, retention_secs) VALUES ($1, $2) \
                 ON CONFLICT (owner) DO UPDATE SET retention_secs = excluded.retention_secs";
        with_pool!(self, pool => {
            sqlx::query(q).bind(owner).bind(secs).execute(pool).await?;
            Ok(())
        })
    }

    async fn archive_retention_overrides(&self) -> StoreResult<Vec<(String, i64)>> {
        let q = "SELECT owner, retention_secs FROM archive_prefs WHERE retention_secs IS NOT NULL";
        with_pool!(self, pool => {
            let rows = sqlx::query(q).fetch_all(pool).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<String, _>("owner")?, r.try_get::<i64, _>("retention_secs")?)))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    #[test]
    fn ids_roundtrip_and_sort_like_the_archive() {
        let ids = [
            ArchiveId { seq: 0, tag: 0 },
            ArchiveId { seq: 1, tag: 7 },
            ArchiveId {
                seq: 1_700_000_000_000_000,
                tag: 12345,
            },
            ArchiveId {
                seq: 1_700_000_000_000_001,
                tag: 0,
            },
            ArchiveId {
                seq: i64::MAX,
                tag: i32::MAX,
            },
        ];
        let mut prev = String::new();
        for id in ids {
            let s = id.to_string();
            assert_eq!(s.len(), ArchiveId::LEN);
            assert_eq!(s.parse::<ArchiveId>().unwrap(), id);
            assert_eq!(s.to_lowercase().parse::<ArchiveId>().unwrap(), id);
            assert!(s > prev, "{s} sorts after {prev}");
            prev = s;
        }
        for bad in [
            "",
            "short",
            "0000000000000000000U",       // U is not in the alphabet
            "G000000000000000000",        // 19 chars
            "G0000000000000000000",       // seq beyond i64
            "00000000000000000000000000", // a ULID is longer
            "0000000000000400000000000",
            "000000000000020000000", // 21 chars
            "00000000000002000000",  // tag beyond i32
        ] {
            assert!(bad.parse::<ArchiveId>().is_err(), "{bad}");
        }
    }

    fn row(owner: &str, seq: i64, with: &str, res: &str) -> NewArchived {
        NewArchived {
            owner: owner.into(),
            id: ArchiveId {
                seq,
                tag: (seq % 1000) as i32,
            },
            with_bare: with.into(),
            with_res: res.into(),
            outgoing: seq % 2 == 0,
            stanza: format!("<message xmlns='jabber:client'><body>{seq}</body></message>")
                .into_bytes(),
        }
    }

    #[tokio::test]
    async fn ranges_filters_and_expiry_on_every_backend() {
        for_each_store(|store| async move {
            let mut rows = Vec::new();
            for seq in 1..=100 {
                let with = if seq % 3 == 0 { "bob@x" } else { "carol@x" };
                let res = if seq % 2 == 0 { "phone" } else { "" };
                rows.push(row("alice@x", seq, with, res));
            }
            rows.push(row("zed@x", 5, "alice@x", ""));
            // A batch larger than any prepared chunk, and a duplicate.
            store.archive_insert(&rows).await.unwrap();
            store.archive_insert(&rows[..1]).await.unwrap();
            assert_eq!(store.archive_max_seq().await.unwrap(), 100);

            let all = ArchiveRange::default();
            let page = store.archive_range("alice@x", &all, 10).await.unwrap();
            let seqs: Vec<i64> = page.iter().map(|a| a.id.seq).collect();
            assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
            assert!(page[1].outgoing);
            assert_eq!(page[1].with_res, "phone");
            assert!(String::from_utf8_lossy(&page[1].stanza).contains("<body>2</body>"));

            let last = ArchiveRange {
                reverse: true,
                ..Default::default()
            };
            let page = store.archive_range("alice@x", &last, 3).await.unwrap();
            let seqs: Vec<i64> = page.iter().map(|a| a.id.seq).collect();
            assert_eq!(seqs, vec![100, 99, 98]);

            let mid = ArchiveRange {
                after: Some(40),
                before: Some(45),
                ..Default::default()
            };
            let seqs: Vec<i64> = store
                .archive_range("alice@x", &mid, 100)
                .await
                .unwrap()
                .iter()
                .map(|a| a.id.seq)
                .collect();
            assert_eq!(seqs, vec![41, 42, 43, 44]);

            let bob = ArchiveRange {
                with: Some(WithFilter {
                    bare: "bob@x".into(),
                    resource: None,
                }),
                after: Some(10),
                ..Default::default()
            };
            let seqs: Vec<i64> = store
                .archive_range("alice@x", &bob, 4)
                .await
                .unwrap()
                .iter()
                .map(|a| a.id.seq)
                .collect();
            assert_eq!(seqs, vec![12, 15, 18, 21]);
            let bob_phone = ArchiveRange {
                with: Some(WithFilter {
                    bare: "bob@x".into(),
                    resource: Some("phone".into()),
                }),
                ..Default::default()
            };
            let seqs: Vec<i64> = store
                .archive_range("alice@x", &bob_phone, 4)
                .await
                .unwrap()
                .iter()
                .map(|a| a.id.seq)
                .collect();
            assert_eq!(seqs, vec![6, 12, 18, 24]);

            assert_eq!(
                store.archive_count("alice@x", &all, 1000).await.unwrap(),
                Some(100)
            );
            assert_eq!(
                store.archive_count("alice@x", &all, 99).await.unwrap(),
                None
            );
            assert_eq!(
                store.archive_count("alice@x", &bob, 1000).await.unwrap(),
                Some(30)
            );
            let crossed = ArchiveRange {
                after: Some(5),
                before: Some(6),
                ..Default::default()
            };
            assert_eq!(
                store.archive_count("alice@x", &crossed, 10).await.unwrap(),
                Some(0)
            );

            let got = store.archive_get("alice@x", &[3, 7, 1000]).await.unwrap();
            assert_eq!(got.len(), 2);
            let id3 = ArchiveId { seq: 3, tag: 3 };
            let forged = ArchiveId { seq: 7, tag: 8 };
            assert_eq!(
                store
                    .archive_existing("alice@x", &[id3, forged])
                    .await
                    .unwrap(),
                vec![id3]
            );
            let (first, last) = store.archive_bounds("alice@x").await.unwrap().unwrap();
            assert_eq!((first.seq, last.seq), (1, 100));
            assert!(store.archive_bounds("nobody@x").await.unwrap().is_none());

            assert_eq!(
                store.archive_next_owner("").await.unwrap().as_deref(),
                Some("alice@x")
            );
            assert_eq!(
                store
                    .archive_next_owner("alice@x")
                    .await
                    .unwrap()
                    .as_deref(),
                Some("zed@x")
            );
            assert_eq!(store.archive_next_owner("zed@x").await.unwrap(), None);

            // Expiry removes the oldest, in bounded rounds.
            assert_eq!(store.archive_expire("alice@x", 31, 20).await.unwrap(), 20);
            assert_eq!(store.archive_expire("alice@x", 31, 20).await.unwrap(), 10);
            assert_eq!(store.archive_expire("alice@x", 31, 20).await.unwrap(), 0);
            let (first, _) = store.archive_bounds("alice@x").await.unwrap().unwrap();
            assert_eq!(first.seq, 31);
            assert_eq!(store.archive_delete_owner("zed@x").await.unwrap(), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn prefs_and_retention_on_every_backend() {
        for_each_store(|store| async move {
            assert_eq!(store.archive_prefs("alice@x").await.unwrap(), None);
            store
                .set_archive_retention("alice@x", Some(3600))
                .await
                .unwrap();
            let p = store.archive_prefs("alice@x").await.unwrap().unwrap();
            assert_eq!(p.default_mode, None);
            assert_eq!(p.retention_secs, Some(3600));
            let prefs = StoredPrefs {
                default_mode: Some("roster".into()),
                always: vec!["bob@x".into(), "carol@x/r".into()],
                never: vec!["eve@x".into()],
                retention_secs: None,
            };
            store.set_archive_prefs("alice@x", &prefs).await.unwrap();
            let p = store.archive_prefs("alice@x").await.unwrap().unwrap();
            assert_eq!(p.default_mode.as_deref(), Some("roster"));
            assert_eq!(p.always, prefs.always);
            assert_eq!(p.never, prefs.never);
            assert_eq!(p.retention_secs, Some(3600), "prefs keep the retention");
            store.set_archive_prefs("bob@x", &prefs).await.unwrap();
            assert_eq!(
                store.archive_retention_overrides().await.unwrap(),
                vec![("alice@x".to_string(), 3600)]
            );
            store.set_archive_retention("alice@x", None).await.unwrap();
            assert!(
                store
                    .archive_retention_overrides()
                    .await
                    .unwrap()
                    .is_empty()
            );
        })
        .await;
    }
}
