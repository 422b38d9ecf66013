//! Offline messages (XEP-0160): a per-owner queue of serialised message
//! stanzas, read oldest first and deleted once handed to a session.

use async_trait::async_trait;

use super::accounts::RowExt;
use super::{Db, Store, StoreResult};
use crate::with_pool;

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    pub id: i64,
    /// When it was stored (epoch microseconds).
    pub stored_at: i64,
    /// The stanza as XML text (with its namespace declared).
    pub xml: String,
}

#[async_trait]
pub trait OfflineStore {
    /// Append a message to `owner`'s queue unless `max` messages are stored
    /// already. Returns the new row id, or None when the queue is full. The
    /// row is committed when this returns.
    async fn push_offline(
        &self,
        owner: &str,
        stored_at: i64,
        xml: &str,
        max: i64,
    ) -> StoreResult<Option<i64>>;
    /// Up to `limit` messages of `owner` with an id above `after`, oldest
    /// first.
    async fn offline_page(
        &self,
        owner: &str,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<OfflineMessage>>;
    /// Delete these messages of `owner`; returns how many went.
    async fn delete_offline(&self, owner: &str, ids: &[i64]) -> StoreResult<u64>;
    /// How many messages `owner` has stored, counting at most `cap`.
    async fn count_offline(&self, owner: &str, cap: i64) -> StoreResult<i64>;
}

#[async_trait]
impl OfflineStore for Store {
    async fn push_offline(
        &self,
        owner: &str,
        stored_at: i64,
        xml: &str,
        max: i64,
    ) -> StoreResult<Option<i64>> {
        // One statement: the count and the insert cannot be split by a
        // concurrent writer on the same connection, and the count is bounded.
        let q = "INSERT INTO offline_messages (owner, stored_at, xml) \
                 SELECT $1, $2, $3 WHERE (SELECT COUNT(*) FROM \
                 (SELECT 1 FROM offline_messages WHERE owner = $1 LIMIT $4) AS queued) < $4 \
                 RETURNING id";
        with_pool!(self, pool => {
            let row = sqlx::query(q)
                .bind(owner)
                .bind(stored_at)
                .bind(xml)
                .bind(max)
                .fetch_optional(pool)
                .await?;
            row.map(|r| r.int("id")).transpose()
        })
    }

    async fn offline_page(
        &self,
        owner: &str,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<OfflineMessage>> {
        let q = "SELECT id, stored_at, xml FROM offline_messages \
                 WHERE owner = $1 AND id > $2 ORDER BY id LIMIT $3";
        with_pool!(self, pool => {
            let rows = sqlx::query(q)
                .bind(owner)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(OfflineMessage {
                        id: r.int("id")?,
                        stored_at: r.int("stored_at")?,
                        xml: r.text("xml")?,
                    })
                })
                .collect()
        })
    }

    async fn delete_offline(&self, owner: &str, ids: &[i64]) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let n = match &self.db {
            Db::Sqlite(pool) => {
                // `?` placeholders: SQLite's `$N` lookup is quadratic in
                // long lists (DEPENDENCIES.md 3.3).
                let marks = vec!["?"; ids.len()].join(", ");
                let q = format!("DELETE FROM offline_messages WHERE owner = ? AND id IN ({marks})");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(q)).bind(owner);
                for id in ids {
                    query = query.bind(*id);
                }
                query.execute(pool).await?.rows_affected()
            }
            Db::Postgres(pool) => {
                sqlx::query("DELETE FROM offline_messages WHERE owner = $1 AND id = ANY($2)")
                    .bind(owner)
                    .bind(ids)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(n)
    }

    async fn count_offline(&self, owner: &str, cap: i64) -> StoreResult<i64> {
        let q = "SELECT COUNT(*) AS n FROM \
                 (SELECT 1 FROM offline_messages WHERE owner = $1 LIMIT $2) AS queued";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(owner).bind(cap).fetch_one(pool).await?;
            row.int("n")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::AccountStore;
    use crate::storage::testing::for_each_store;

    #[tokio::test]
    async fn queue_order_limit_and_delete_on_every_backend() {
        for_each_store(|store| async move {
            let a = "alice@x.test";
            for i in 0..3 {
                let id = store
                    .push_offline(a, 100 + i, &format!("<m{i}/>"), 3)
                    .await
                    .unwrap();
                assert!(id.is_some(), "message {i} stored");
            }
            assert_eq!(
                store.push_offline(a, 200, "<full/>", 3).await.unwrap(),
                None,
                "the fourth is refused"
            );
            assert!(
                store
                    .push_offline("bob@x.test", 1, "<b/>", 3)
                    .await
                    .unwrap()
                    .is_some()
            );
            assert_eq!(store.count_offline(a, 1000).await.unwrap(), 3);
            assert_eq!(store.count_offline(a, 2).await.unwrap(), 2, "bounded count");

            let page = store.offline_page(a, 0, 2).await.unwrap();
            assert_eq!(
                page.iter().map(|m| m.xml.as_str()).collect::<Vec<_>>(),
                vec!["<m0/>", "<m1/>"]
            );
            assert_eq!(page[0].stored_at, 100);
            let rest = store.offline_page(a, page[1].id, 10).await.unwrap();
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].xml, "<m2/>");

            // Only the named ids of that owner go.
            let bob_id = store.offline_page("bob@x.test", 0, 10).await.unwrap()[0].id;
            let n = store
                .delete_offline(a, &[page[0].id, page[1].id, bob_id])
                .await
                .unwrap();
            assert_eq!(n, 2);
            assert_eq!(store.count_offline("bob@x.test", 10).await.unwrap(), 1);
            let left = store.offline_page(a, 0, 10).await.unwrap();
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].xml, "<m2/>");
            assert_eq!(store.delete_offline(a, &[]).await.unwrap(), 0);
            // Room again after the delete.
            assert!(
                store
                    .push_offline(a, 300, "<m3/>", 3)
                    .await
                    .unwrap()
                    .is_some()
            );

            // Account deletion removes the queue.
            let c = crate::auth::StoredCredentials::from_password("pw", 4096).unwrap();
            store.create_account("x.test", "alice", &c).await.unwrap();
            store.delete_account("x.test", "alice").await.unwrap();
            assert_eq!(store.count_offline(a, 10).await.unwrap(), 0);
        })
        .await;
    }
}
