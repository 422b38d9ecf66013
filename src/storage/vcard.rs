//! vCard-temp (XEP-0054): one vCard per account, as XML text.

use async_trait::async_trait;

use super::accounts::RowExt;
use super::{Store, StoreResult, now_micros};
use crate::with_pool;

#[async_trait]
pub trait VCardStore {
    async fn get_vcard(&self, owner: &str) -> StoreResult<Option<String>>;
    /// Store (or replace) the owner's vCard.
    async fn set_vcard(&self, owner: &str, xml: &str) -> StoreResult<()>;
    /// Remove the owner's vCard; false if there was none.
    async fn delete_vcard(&self, owner: &str) -> StoreResult<bool>;
}

#[async_trait]
impl VCardStore for Store {
    async fn get_vcard(&self, owner: &str) -> StoreResult<Option<String>> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT xml FROM vcards WHERE owner = $1")
                .bind(owner)
                .fetch_optional(pool)
                .await?;
            row.map(|r| r.text("xml")).transpose()
        })
    }

    async fn set_vcard(&self, owner: &str, xml: &str) -> StoreResult<()> {
        let q = "INSERT INTO vcards (owner, xml, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (owner) DO UPDATE SET xml = excluded.xml, updated_at = excluded.updated_at";
        with_pool!(self, pool => {
            sqlx::query(q).bind(owner).bind(xml).bind(now_micros()).execute(pool).await?;
        });
        Ok(())
    }

    async fn delete_vcard(&self, owner: &str) -> StoreResult<bool> {
        let n = with_pool!(self, pool => sqlx::query("DELETE FROM vcards WHERE owner = $1")
            .bind(owner)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    #[tokio::test]
    async fn vcard_set_get_replace_delete_on_every_backend() {
        for_each_store(|store| async move {
            let a = "alice@x.test";
            assert_eq!(store.get_vcard(a).await.unwrap(), None);
            store
                .set_vcard(a, "<vCard xmlns='vcard-temp'><FN>A</FN></vCard>")
                .await
                .unwrap();
            store
                .set_vcard("bob@x.test", "<vCard xmlns='vcard-temp'/>")
                .await
                .unwrap();
            store
                .set_vcard(a, "<vCard xmlns='vcard-temp'><FN>A2</FN></vCard>")
                .await
                .unwrap();
            assert_eq!(
                store.get_vcard(a).await.unwrap().as_deref(),
                Some("<vCard xmlns='vcard-temp'><FN>A2</FN></vCard>")
            );
            assert!(store.delete_vcard(a).await.unwrap());
            assert!(!store.delete_vcard(a).await.unwrap());
            assert_eq!(store.get_vcard(a).await.unwrap(), None);
            assert!(store.get_vcard("bob@x.test").await.unwrap().is_some());
        })
        .await;
    }
}
