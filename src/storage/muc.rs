//! Multi-user chat storage: persistent rooms (configuration, subject),
//! their affiliations, the per-service secret that makes occupant ids stable
//! (XEP-0421), and room archives (XEP-0313 on the room JID).
//!
//! Room configuration is stored as JSON owned by the MUC module; the name and
//! the public flag are kept in columns too so the service can list rooms
//! without loading them. Archive rows are keyed by (room, id) where the id is
//! the stanza-id: microseconds since the epoch, strictly increasing per room,
//! so time ranges and RSM paging are both ranges of the primary key.

use async_trait::async_trait;
use sqlx::Row;

use super::{Store, StoreError, StoreResult, now_micros};
use crate::with_pool;

/// The stored state of a persistent room (without its archive).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredRoom {
    pub name: String,
    pub public: bool,
    /// The room configuration, serialised by the MUC module.
    pub config: String,
    pub subject: Option<String>,
    pub subject_nick: Option<String>,
    pub subject_stamp: Option<i64>,
    pub created_at: i64,
}

/// One entry of a room's affiliation list (owner, admin, member, outcast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffiliationRow {
    /// A bare JID or a domain.
    pub jid: String,
    pub affiliation: String,
    /// The reserved nickname, if any.
    pub nick: Option<String>,
    pub reason: Option<String>,
}

/// A room as listed by the service (disco#items).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomListing {
    pub node: String,
    pub name: String,
    pub public: bool,
}

/// Kinds of archived room messages.
pub const ARCHIVE_MESSAGE: i64 = 0;
pub const ARCHIVE_SUBJECT: i64 = 1;

/// One archived room message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRow {
    /// The room's bare JID.
    pub room: String,
    /// The stanza-id: microseconds since the epoch, unique per room.
    pub id: i64,
    /// [`ARCHIVE_MESSAGE`] or [`ARCHIVE_SUBJECT`].
    pub kind: i64,
    pub nick: String,
    /// The sender's real full JID.
    pub sender: String,
    pub occupant_id: String,
    /// The message as reflected to occupants (without `to`), serialised.
    pub stanza: Vec<u8>,
}

/// A page request on a room archive. Bounds are exclusive for ids
/// (`after`/`before` of RSM) and inclusive for times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveQuery {
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub after_id: Option<i64>,
    pub before_id: Option<i64>,
    /// Only these ids (XEP-0313 `ids` filter).
    pub ids: Option<Vec<i64>>,
    /// Only messages from this nickname.
    pub nick: Option<String>,
    /// Only messages from this real bare JID.
    pub sender_bare: Option<String>,
    /// Only these kinds (None: all).
    pub kinds: Option<Vec<i64>>,
    pub limit: usize,
    /// Take the newest `limit` matches (RSM `<before/>`) instead of the oldest.
    pub from_end: bool,
}

/// A page of archive results in chronological order, and whether more
/// matches exist beyond it in the direction of the query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchivePage {
    pub rows: Vec<ArchiveRow>,
    pub more: bool,
}

#[async_trait]
pub trait MucStore {
    /// The secret of a MUC service (created at first use).
    async fn muc_secret(&self, service: &str) -> StoreResult<Vec<u8>>;
    async fn load_room(&self, service: &str, node: &str) -> StoreResult<Option<StoredRoom>>;
    /// Create or update a persistent room's row.
    async fn save_room(&self, service: &str, node: &str, room: &StoredRoom) -> StoreResult<()>;
    /// Delete a room's row and affiliations (not its archive).
    async fn delete_room(&self, service: &str, node: &str) -> StoreResult<()>;
    async fn room_affiliations(
        &self,
        service: &str,
        node: &str,
    ) -> StoreResult<Vec<AffiliationRow>>;
    /// Set one affiliation; `None` removes the entry.
    async fn set_affiliation(
        &self,
        service: &str,
        node: &str,
        jid: &str,
        row: Option<&AffiliationRow>,
    ) -> StoreResult<()>;
    /// Replace a room's whole affiliation list.
    async fn replace_affiliations(
        &self,
        service: &str,
        node: &str,
        rows: &[AffiliationRow],
    ) -> StoreResult<()>;
    async fn list_rooms(&self, service: &str) -> StoreResult<Vec<RoomListing>>;
    /// Persistent rooms of this service where `jid` is an owner.
    async fn count_owned_rooms(&self, service: &str, jid: &str) -> StoreResult<u64>;

    async fn archive_insert(&self, rows: &[ArchiveRow]) -> StoreResult<()>;
    async fn archive_last_id(&self, room: &str) -> StoreResult<Option<i64>>;
    async fn archive_query(&self, room: &str, q: &ArchiveQuery) -> StoreResult<ArchivePage>;
    /// Whether an id exists in the room archive.
    async fn archive_has_id(&self, room: &str, id: i64) -> StoreResult<bool>;
    async fn archive_delete_room(&self, room: &str) -> StoreResult<()>;
    /// Keep only the newest `keep` messages of a room.
    async fn archive_trim(&self, room: &str, keep: u64) -> StoreResult<u64>;
}

fn bool_of(v: i64) -> bool {
    v != 0
}

#[async_trait]
impl MucStore for Store {
    async fn muc_secret(&self, service: &str) -> StoreResult<Vec<u8>> {
        let fresh = crate::auth::random_bytes(32);
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO muc_secrets (service, secret) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(service)
                .bind(&fresh)
                .execute(pool)
                .await?;
            let row = sqlx::query("SELECT secret FROM muc_secrets WHERE service = $1")
                .bind(service)
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<Vec<u8>, _>("secret")?)
        })
    }

    async fn load_room(&self, service: &str, node: &str) -> StoreResult<Option<StoredRoom>> {
        let q = "SELECT name, public, config, subject, subject_nick, subject_stamp, created_at \
                 FROM muc_rooms WHERE service = $1 AND node = $2";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(service).bind(node).fetch_optional(pool).await?;
            row.map(|r| -> StoreResult<StoredRoom> {
                Ok(StoredRoom {
                    name: r.try_get("name")?,
                    public: bool_of(r.try_get::<i64, _>("public")?),
                    config: r.try_get("config")?,
                    subject: r.try_get("subject")?,
                    subject_nick: r.try_get("subject_nick")?,
                    subject_stamp: r.try_get("subject_stamp")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .transpose()
        })
    }

    async fn save_room(&self, service: &str, node: &str, room: &StoredRoom) -> StoreResult<()> {
        let q = "INSERT INTO muc_rooms (service, node, name, public, config, subject, subject_nick, \
                 subject_stamp, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (service, node) DO UPDATE SET name = excluded.name, public = excluded.public, \
                 config = excluded.config, subject = excluded.subject, subject_nick = excluded.subject_nick, \
                 subject_stamp = excluded.subject_stamp, updated_at = excluded.updated_at";
        with_pool!(self, pool => {
            sqlx::query(q)
                .bind(service)
                .bind(node)
                .bind(&room.name)
                .bind(room.public as i64)
                .bind(&room.config)
                .bind(&room.subject)
                .bind(&room.subject_nick)
                .bind(room.subject_stamp)
                .bind(room.created_at)
                .bind(now_micros())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    async fn delete_room(&self, service: &str, node: &str) -> StoreResult<()> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM muc_affiliations WHERE service = $1 AND node = $2")
                .bind(service)
                .bind(node)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM muc_rooms WHERE service = $1 AND node = $2")
                .bind(service)
                .bind(node)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    async fn room_affiliations(
        &self,
        service: &str,
        node: &str,
    ) -> StoreResult<Vec<AffiliationRow>> {
        let q = "SELECT jid, affiliation, nick, reason FROM muc_affiliations \
                 WHERE service = $1 AND node = $2 ORDER BY jid";
        with_pool!(self, pool => {
            let rows = sqlx::query(q).bind(service).bind(node).fetch_all(pool).await?;
            rows.iter()
                .map(|r| -> StoreResult<AffiliationRow> {
                    Ok(AffiliationRow {
                        jid: r.try_get("jid")?,
                        affiliation: r.try_get("affiliation")?,
                        nick: r.try_get("nick")?,
                        reason: r.try_get("reason")?,
                    })
                })
                .collect()
        })
    }

    async fn set_affiliation(
        &self,
        service: &str,
        node: &str,
        jid: &str,
        row: Option<&AffiliationRow>,
    ) -> StoreResult<()> {
        with_pool!(self, pool => {
            match row {
                None => {
                    sqlx::query("DELETE FROM muc_affiliations WHERE service = $1 AND node = $2 AND jid = $3")
                        .bind(service)
                        .bind(node)
                        .bind(jid)
                        .execute(pool)
                        .await?;
                }
                Some(r) => {
                    sqlx::query(
                        "INSERT INTO muc_affiliations (service, node, jid, affiliation, nick, reason) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (service, node, jid) DO UPDATE SET \
                         affiliation = excluded.affiliation, nick = excluded.nick, reason = excluded.reason",
                    )
                    .bind(service)
                    .bind(node)
                    .bind(jid)
                    .bind(&r.affiliation)
                    .bind(&r.nick)
                    .bind(&r.reason)
                    .execute(pool)
                    .await?;
                }
            }
        });
        Ok(())
    }

    async fn replace_affiliations(
        &self,
        service: &str,
        node: &str,
        rows: &[AffiliationRow],
    ) -> StoreResult<()> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM muc_affiliations WHERE service = $1 AND node = $2")
                .bind(service)
                .bind(node)
                .execute(&mut *tx)
                .await?;
            for r in rows {
                sqlx::query(
                    "INSERT INTO muc_affiliations (service, node, jid, affiliation, nick, reason) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(service)
                .bind(node)
                .bind(&r.jid)
                .bind(&r.affiliation)
                .bind(&r.nick)
                .bind(&r.reason)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    async fn list_rooms(&self, service: &str) -> StoreResult<Vec<RoomListing>> {
        let q = "SELECT node, name, public FROM muc_rooms WHERE service = $1 ORDER BY node";
        with_pool!(self, pool => {
            let rows = sqlx::query(q).bind(service).fetch_all(pool).await?;
            rows.iter()
                .map(|r| -> StoreResult<RoomListing> {
                    Ok(RoomListing {
                        node: r.try_get("node")?,
                        name: r.try_get("name")?,
                        public: bool_of(r.try_get::<i64, _>("public")?),
                    })
                })
                .collect()
        })
    }

    async fn count_owned_rooms(&self, service: &str, jid: &str) -> StoreResult<u64> {
        let q = "SELECT COUNT(*) AS n FROM muc_affiliations \
                 WHERE service = $1 AND jid = $2 AND affiliation = 'owner'";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(service).bind(jid).fetch_one(pool).await?;
            let n: i64 = row.try_get("n")?;
            Ok(n.max(0) as u64)
        })
    }

    async fn archive_insert(&self, rows: &[ArchiveRow]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // Multi-row inserts in chunks; `?` placeholders for SQLite (see
        // DEPENDENCIES.md 3.3), `$n` for PostgreSQL.
        for chunk in rows.chunks(100) {
            let mut q = String::from(
                "INSERT INTO muc_archive (room, id, kind, nick, sender, occupant_id, stanza) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    q.push(',');
                }
                if self.is_sqlite() {
                    q.push_str("(?, ?, ?, ?, ?, ?, ?)");
                } else {
                    let b = i * 7;
                    q.push_str(&format!(
                        "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5,
                        b + 6,
                        b + 7
                    ));
                }
            }
            q.push_str(" ON CONFLICT DO NOTHING");
            with_pool!(self, pool => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(q.clone()));
                for r in chunk {
                    query = query
                        .bind(&r.room)
                        .bind(r.id)
                        .bind(r.kind)
                        .bind(&r.nick)
                        .bind(&r.sender)
                        .bind(&r.occupant_id)
                        .bind(&r.stanza);
                }
                query.execute(pool).await?;
            });
        }
        Ok(())
    }

    async fn archive_last_id(&self, room: &str) -> StoreResult<Option<i64>> {
        let q = "SELECT MAX(id) AS id FROM muc_archive WHERE room = $1";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(room).fetch_one(pool).await?;
            Ok(row.try_get::<Option<i64>, _>("id")?)
        })
    }

    async fn archive_query(&self, room: &str, aq: &ArchiveQuery) -> StoreResult<ArchivePage> {
        let mut sql = String::from(
            "SELECT room, id, kind, nick, sender, occupant_id, stanza FROM muc_archive WHERE room = $1",
        );
        // Integer conditions are formatted into the text (they are i64s, not
        // user strings); the string filters are bound.
        if let Some(s) = aq.start {
            sql.push_str(&format!(" AND id >= {s}"));
        }
        if let Some(e) = aq.end {
            sql.push_str(&format!(" AND id <= {e}"));
        }
        if let Some(a) = aq.after_id {
            sql.push_str(&format!(" AND id > {a}"));
        }
        if let Some(b) = aq.before_id {
            sql.push_str(&format!(" AND id < {b}"));
        }
        if let Some(ids) = &aq.ids {
            if ids.is_empty() {
                return Ok(ArchivePage::default());
            }
            let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            sql.push_str(&format!(" AND id IN ({})", list.join(",")));
        }
        if let Some(kinds) = &aq.kinds {
            if kinds.is_empty() {
                return Ok(ArchivePage::default());
            }
            let list: Vec<String> = kinds.iter().map(|i| i.to_string()).collect();
            sql.push_str(&format!(" AND kind IN ({})", list.join(",")));
        }
        let mut binds: Vec<&str> = Vec::new();
        if let Some(n) = &aq.nick {
            binds.push(n);
            sql.push_str(&format!(" AND nick = ${}", binds.len() + 1));
        }
        if let Some(s) = &aq.sender_bare {
            binds.push(s);
            // The sender column holds full JIDs: match the bare part.
            sql.push_str(&format!(
                " AND (sender = ${n} OR substr(sender, 1, length(${n}) + 1) = ${n} || '/')",
                n = binds.len() + 1
            ));
        }
        let limit = aq.limit.min(100_000);
        sql.push_str(if aq.from_end {
            " ORDER BY id DESC"
        } else {
            " ORDER BY id ASC"
        });
        sql.push_str(&format!(" LIMIT {}", limit + 1));
        let mut rows: Vec<ArchiveRow> = with_pool!(self, pool => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(room);
            for b in &binds {
                query = query.bind(*b);
            }
            let rows = query.fetch_all(pool).await?;
            rows.iter()
                .map(|r| -> StoreResult<ArchiveRow> {
                    Ok(ArchiveRow {
                        room: r.try_get("room")?,
                        id: r.try_get("id")?,
                        kind: r.try_get("kind")?,
                        nick: r.try_get("nick")?,
                        sender: r.try_get("sender")?,
                        occupant_id: r.try_get("occupant_id")?,
                        stanza: r.try_get("stanza")?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?
        });
        let more = rows.len() > limit;
        rows.truncate(limit);
        if aq.from_end {
            rows.reverse();
        }
        Ok(ArchivePage { rows, more })
    }

    async fn archive_has_id(&self, room: &str, id: i64) -> StoreResult<bool> {
        let q = "SELECT 1 AS one FROM muc_archive WHERE room = $1 AND id = $2";
        with_pool!(self, pool => Ok(sqlx::query(q).bind(room).bind(id).fetch_optional(pool).await?.is_some()))
    }

    async fn archive_delete_room(&self, room: &str) -> StoreResult<()> {
        with_pool!(self, pool => {
            sqlx::query("DELETE FROM muc_archive WHERE room = $1")
                .bind(room)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    async fn archive_trim(&self, room: &str, keep: u64) -> StoreResult<u64> {
        let keep = i64::try_from(keep).map_err(|_| StoreError::Corrupt("keep".into()))?;
        let q = "SELECT id FROM muc_archive WHERE room = $1 ORDER BY id DESC LIMIT 1 OFFSET $2";
        with_pool!(self, pool => {
            let Some(row) = sqlx::query(q).bind(room).bind(keep).fetch_optional(pool).await? else {
                return Ok(0);
            };
            let cut: i64 = row.try_get("id")?;
            let n = sqlx::query("DELETE FROM muc_archive WHERE room = $1 AND id <= $2")
                .bind(room)
                .bind(cut)
                .execute(pool)
                .await?
                .rows_affected();
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    fn row(room: &str, id: i64, nick: &str, kind: i64) -> ArchiveRow {
        ArchiveRow {
            room: room.into(),
            id,
            kind,
            nick: nick.into(),
            sender: format!("{nick}@x.test/r"),
            occupant_id: format!("occ-{nick}"),
            stanza: format!("<message><body>{id}</body></message>").into_bytes(),
        }
    }

    #[tokio::test]
    async fn rooms_and_affiliations_on_every_backend() {
        for_each_store(|store| async move {
            let s = "conference.x.test";
            assert!(store.load_room(s, "r1").await.unwrap().is_none());
            let mut room = StoredRoom {
                name: "Room One".into(),
                public: true,
                config: "{}".into(),
                created_at: 42,
                ..Default::default()
            };
            store.save_room(s, "r1", &room).await.unwrap();
            room.subject = Some("hello".into());
            room.subject_nick = Some("alice".into());
            room.subject_stamp = Some(7);
            room.public = false;
            store.save_room(s, "r1", &room).await.unwrap();
            assert_eq!(store.load_room(s, "r1").await.unwrap(), Some(room.clone()));
            store
                .save_room("conference.y.test", "r2", &room)
                .await
                .unwrap();
            let listed = store.list_rooms(s).await.unwrap();
            assert_eq!(
                listed,
                vec![RoomListing {
                    node: "r1".into(),
                    name: "Room One".into(),
                    public: false
                }]
            );

            let owner = AffiliationRow {
                jid: "alice@x.test".into(),
                affiliation: "owner".into(),
                nick: Some("alice".into()),
                reason: None,
            };
            let member = AffiliationRow {
                jid: "bob@x.test".into(),
                affiliation: "member".into(),
                nick: None,
                reason: Some("welcome".into()),
            };
            store
                .set_affiliation(s, "r1", &owner.jid, Some(&owner))
                .await
                .unwrap();
            store
                .set_affiliation(s, "r1", &member.jid, Some(&member))
                .await
                .unwrap();
            let mut banned = member.clone();
            banned.affiliation = "outcast".into();
            store
                .set_affiliation(s, "r1", &banned.jid, Some(&banned))
                .await
                .unwrap();
            assert_eq!(
                store.room_affiliations(s, "r1").await.unwrap(),
                vec![owner.clone(), banned.clone()]
            );
            assert_eq!(store.count_owned_rooms(s, "alice@x.test").await.unwrap(), 1);
            store
                .set_affiliation(s, "r1", &banned.jid, None)
                .await
                .unwrap();
            assert_eq!(
                store.room_affiliations(s, "r1").await.unwrap(),
                vec![owner.clone()]
            );
            store
                .replace_affiliations(s, "r1", std::slice::from_ref(&member))
                .await
                .unwrap();
            assert_eq!(
                store.room_affiliations(s, "r1").await.unwrap(),
                vec![member.clone()]
            );
            store.delete_room(s, "r1").await.unwrap();
            assert!(store.load_room(s, "r1").await.unwrap().is_none());
            assert!(store.room_affiliations(s, "r1").await.unwrap().is_empty());

            let secret = store.muc_secret(s).await.unwrap();
            assert_eq!(secret.len(), 32);
            assert_eq!(store.muc_secret(s).await.unwrap(), secret, "stable");
            assert_ne!(store.muc_secret("other").await.unwrap(), secret);
        })
        .await;
    }

    #[tokio::test]
    async fn archive_paging_on_every_backend() {
        for_each_store(|store| async move {
            let room = "r@conference.x.test";
            assert_eq!(store.archive_last_id(room).await.unwrap(), None);
            let rows: Vec<ArchiveRow> = (1..=250)
                .map(|i| {
                    row(
                        room,
                        i * 10,
                        if i % 2 == 0 { "even" } else { "odd" },
                        if i % 50 == 0 {
                            ARCHIVE_SUBJECT
                        } else {
                            ARCHIVE_MESSAGE
                        },
                    )
                })
                .collect();
            store.archive_insert(&rows).await.unwrap();
            store
                .archive_insert(&[row("other@conference.x.test", 5, "z", 0)])
                .await
                .unwrap();
            // Inserting the same id again is ignored.
            store.archive_insert(&rows[..1]).await.unwrap();
            assert_eq!(store.archive_last_id(room).await.unwrap(), Some(2500));
            assert!(store.archive_has_id(room, 20).await.unwrap());
            assert!(!store.archive_has_id(room, 25).await.unwrap());

            let q = ArchiveQuery {
                limit: 10,
                ..Default::default()
            };
            let p = store.archive_query(room, &q).await.unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                (1..=10).map(|i| i * 10).collect::<Vec<_>>()
            );
            assert!(p.more);
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 3,
                        from_end: true,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![2480, 2490, 2500]
            );
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 3,
                        from_end: true,
                        before_id: Some(2480),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![2450, 2460, 2470]
            );
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 100,
                        after_id: Some(2450),
                        nick: Some("even".into()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![2460, 2480, 2500]
            );
            assert!(!p.more);
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 100,
                        start: Some(100),
                        end: Some(130),
                        sender_bare: Some("odd@x.test".into()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![110, 130]
            );
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 100,
                        kinds: Some(vec![ARCHIVE_SUBJECT]),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(p.rows.len(), 5);
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 100,
                        ids: Some(vec![20, 40, 45]),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(
                p.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![20, 40]
            );
            assert_eq!(p.rows[0].stanza, rows[1].stanza);

            assert_eq!(store.archive_trim(room, 200).await.unwrap(), 50);
            let p = store
                .archive_query(
                    room,
                    &ArchiveQuery {
                        limit: 1,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(p.rows[0].id, 510);
            store.archive_delete_room(room).await.unwrap();
            assert_eq!(store.archive_last_id(room).await.unwrap(), None);
            assert_eq!(
                store
                    .archive_last_id("other@conference.x.test")
                    .await
                    .unwrap(),
                Some(5)
            );
        })
        .await;
    }
}
