//! Server secrets that must survive restarts (the Server Dialback secret).

use async_trait::async_trait;

use super::accounts::RowExt;
use super::{Store, StoreResult, now_micros};
use crate::with_pool;

#[async_trait]
pub trait SecretStore {
    /// The secret called `name`; created from `fresh` the first time. Every
    /// caller (and every node sharing the database) gets the same value.
    async fn get_or_create_secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>>;
}

#[async_trait]
impl SecretStore for Store {
    async fn get_or_create_secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO server_secrets (name, value, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(fresh)
            .bind(now_micros())
            .execute(pool)
            .await?;
            let row = sqlx::query("SELECT value FROM server_secrets WHERE name = $1")
                .bind(name)
                .fetch_one(pool)
                .await?;
            row.bytes("value")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    #[tokio::test]
    async fn secrets_are_created_once_on_every_backend() {
        for_each_store(|store| async move {
            let a = store
                .get_or_create_secret("dialback", b"first")
                .await
                .unwrap();
            assert_eq!(a, b"first");
            let b = store
                .get_or_create_secret("dialback", b"second")
                .await
                .unwrap();
            assert_eq!(b, b"first");
            let c = store.get_or_create_secret("other", b"x").await.unwrap();
            assert_eq!(c, b"x");
        })
        .await;
    }
}
