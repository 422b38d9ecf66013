//! Multi-user chat storage: persistent rooms (configuration, subject),
//! their affiliations, and the per-service secret that makes occupant ids
//! stable (XEP-0421). Room archives live in the server's message archive
//! (`storage::archive`, owner = the room's bare JID).
//!
//! Room configuration is stored as JSON owned by the MUC module; the name and
//! the public flag are kept in columns too so the service can list rooms
//! without loading them.

use async_trait::async_trait;
use sqlx::Row;

use super::{Store, StoreResult, now_micros};
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

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
}
