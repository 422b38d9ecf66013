//! Private XML storage (XEP-0049): XML text per (account, namespace).

use async_trait::async_trait;

use super::accounts::RowExt;
use super::{Store, StoreResult, now_micros};
use crate::with_pool;

#[async_trait]
pub trait PrivateStore {
    async fn get_private(&self, owner: &str, namespace: &str) -> StoreResult<Option<String>>;
    /// Store (or replace) the data of each `(namespace, xml)` in one
    /// transaction, unless the owner would then hold more than
    /// `max_namespaces` namespaces: then nothing changes and false is
    /// returned.
    async fn set_private(
        &self,
        owner: &str,
        items: &[(String, String)],
        max_namespaces: i64,
    ) -> StoreResult<bool>;
    /// How many namespaces the owner has data in.
    async fn private_namespace_count(&self, owner: &str) -> StoreResult<i64>;
}

#[async_trait]
impl PrivateStore for Store {
    async fn get_private(&self, owner: &str, namespace: &str) -> StoreResult<Option<String>> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT xml FROM private_storage WHERE owner = $1 AND namespace = $2")
                .bind(owner)
                .bind(namespace)
                .fetch_optional(pool)
                .await?;
            row.map(|r| r.text("xml")).transpose()
        })
    }

    async fn set_private(
        &self,
        owner: &str,
        items: &[(String, String)],
        max_namespaces: i64,
    ) -> StoreResult<bool> {
        let upsert = "INSERT INTO private_storage (owner, namespace, xml, updated_at) \
                      VALUES ($1, $2, $3, $4) ON CONFLICT (owner, namespace) DO UPDATE \
                      SET xml = excluded.xml, updated_at = excluded.updated_at";
        let count = "SELECT COUNT(*) AS n FROM private_storage WHERE owner = $1";
        let now = now_micros();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for (ns, xml) in items {
                sqlx::query(upsert)
                    .bind(owner)
                    .bind(ns)
                    .bind(xml)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            let n = sqlx::query(count).bind(owner).fetch_one(&mut *tx).await?.int("n")?;
            if n > max_namespaces {
                tx.rollback().await?;
                return Ok(false);
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    async fn private_namespace_count(&self, owner: &str) -> StoreResult<i64> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM private_storage WHERE owner = $1")
                .bind(owner)
                .fetch_one(pool)
                .await?;
            row.int("n")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    fn item(ns: &str, xml: &str) -> (String, String) {
        (ns.to_owned(), xml.to_owned())
    }

    #[tokio::test]
    async fn private_per_namespace_with_namespace_limit_on_every_backend() {
        for_each_store(|store| async move {
            let a = "alice@x.test";
            assert_eq!(store.get_private(a, "a:ns").await.unwrap(), None);
            assert!(
                store
                    .set_private(a, &[item("a:ns", "<a/>"), item("b:ns", "<b/>")], 2)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .set_private(a, &[item("a:ns", "<a2/>")], 2)
                    .await
                    .unwrap(),
                "replacing is no new namespace"
            );
            assert!(
                !store
                    .set_private(a, &[item("a:ns", "<a3/>"), item("c:ns", "<c/>")], 2)
                    .await
                    .unwrap(),
                "a third namespace is refused"
            );
            assert_eq!(
                store.get_private(a, "a:ns").await.unwrap().as_deref(),
                Some("<a2/>"),
                "the refused set changed nothing"
            );
            assert_eq!(store.get_private(a, "c:ns").await.unwrap(), None);
            assert_eq!(store.private_namespace_count(a).await.unwrap(), 2);
            assert_eq!(
                store.get_private("bob@x.test", "a:ns").await.unwrap(),
                None,
                "per owner"
            );
        })
        .await;
    }
}
