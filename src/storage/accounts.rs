//! Accounts: SCRAM credentials per (domain, username).

use async_trait::async_trait;
use sqlx::Row;

use super::{Store, StoreError, StoreResult, now_micros};
use crate::auth::{ScramKeys, StoredCredentials};
use crate::with_pool;

#[async_trait]
pub trait AccountStore {
    /// Create an account; false if it exists already.
    async fn create_account(
        &self,
        domain: &str,
        username: &str,
        creds: &StoredCredentials,
    ) -> StoreResult<bool>;
    /// Replace the credentials; false if there is no such account.
    async fn set_credentials(
        &self,
        domain: &str,
        username: &str,
        creds: &StoredCredentials,
    ) -> StoreResult<bool>;
    async fn get_credentials(
        &self,
        domain: &str,
        username: &str,
    ) -> StoreResult<Option<StoredCredentials>>;
    /// Delete an account and everything stored for it; false if absent.
    async fn delete_account(&self, domain: &str, username: &str) -> StoreResult<bool>;
    async fn list_accounts(&self, domain: &str) -> StoreResult<Vec<String>>;
    async fn account_exists(&self, domain: &str, username: &str) -> StoreResult<bool>;
}

fn keys(row: &impl RowExt, prefix: &str) -> StoreResult<ScramKeys> {
    let iterations = row.int(&format!("{prefix}_iter"))?;
    Ok(ScramKeys {
        salt: row.bytes(&format!("{prefix}_salt"))?,
        iterations: u32::try_from(iterations)
            .map_err(|_| StoreError::Corrupt("iteration count".into()))?,
        stored_key: row.bytes(&format!("{prefix}_stored"))?,
        server_key: row.bytes(&format!("{prefix}_server"))?,
    })
}

/// Column access that reads the same on both backends.
pub trait RowExt {
    fn int(&self, col: &str) -> StoreResult<i64>;
    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>>;
    fn text(&self, col: &str) -> StoreResult<String>;
}

macro_rules! impl_row_ext {
    ($row:ty) => {
        impl RowExt for $row {
            fn int(&self, col: &str) -> StoreResult<i64> {
                Ok(self.try_get::<i64, _>(col)?)
            }
            fn bytes(&self, col: &str) -> StoreResult<Vec<u8>> {
                Ok(self.try_get::<Vec<u8>, _>(col)?)
            }
            fn text(&self, col: &str) -> StoreResult<String> {
                Ok(self.try_get::<String, _>(col)?)
            }
        }
    };
}
impl_row_ext!(sqlx::sqlite::SqliteRow);
impl_row_ext!(sqlx::postgres::PgRow);

#[async_trait]
impl AccountStore for Store {
    async fn create_account(
        &self,
        domain: &str,
        username: &str,
        c: &StoredCredentials,
    ) -> StoreResult<bool> {
        let q = "INSERT INTO accounts (domain, username, sha1_salt, sha1_iter, sha1_stored, sha1_server, \
                 sha256_salt, sha256_iter, sha256_stored, sha256_server, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING";
        let done = with_pool!(self, pool => sqlx::query(q)
            .bind(domain)
            .bind(username)
            .bind(&c.sha1.salt)
            .bind(c.sha1.iterations as i64)
            .bind(&c.sha1.stored_key)
            .bind(&c.sha1.server_key)
            .bind(&c.sha256.salt)
            .bind(c.sha256.iterations as i64)
            .bind(&c.sha256.stored_key)
            .bind(&c.sha256.server_key)
            .bind(now_micros())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    async fn set_credentials(
        &self,
        domain: &str,
        username: &str,
        c: &StoredCredentials,
    ) -> StoreResult<bool> {
        let q = "UPDATE accounts SET sha1_salt = $3, sha1_iter = $4, sha1_stored = $5, sha1_server = $6, \
                 sha256_salt = $7, sha256_iter = $8, sha256_stored = $9, sha256_server = $10 \
                 WHERE domain = $1 AND username = $2";
        let done = with_pool!(self, pool => sqlx::query(q)
            .bind(domain)
            .bind(username)
            .bind(&c.sha1.salt)
            .bind(c.sha1.iterations as i64)
            .bind(&c.sha1.stored_key)
            .bind(&c.sha1.server_key)
            .bind(&c.sha256.salt)
            .bind(c.sha256.iterations as i64)
            .bind(&c.sha256.stored_key)
            .bind(&c.sha256.server_key)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    async fn get_credentials(
        &self,
        domain: &str,
        username: &str,
    ) -> StoreResult<Option<StoredCredentials>> {
        let q = "SELECT * FROM accounts WHERE domain = $1 AND username = $2";
        with_pool!(self, pool => {
            let row = sqlx::query(q).bind(domain).bind(username).fetch_optional(pool).await?;
            row.map(|r| Ok(StoredCredentials { sha1: keys(&r, "sha1")?, sha256: keys(&r, "sha256")? }))
                .transpose()
        })
    }

    async fn delete_account(&self, domain: &str, username: &str) -> StoreResult<bool> {
        let done = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let n = sqlx::query("DELETE FROM accounts WHERE domain = $1 AND username = $2")
                .bind(domain)
                .bind(username)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            for table in super::USER_TABLES {
                let q = format!("DELETE FROM {table} WHERE owner = $1");
                sqlx::query(sqlx::AssertSqlSafe(q)).bind(format!("{username}@{domain}")).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            n
        });
        Ok(done == 1)
    }

    async fn list_accounts(&self, domain: &str) -> StoreResult<Vec<String>> {
        let q = "SELECT username FROM accounts WHERE domain = $1 ORDER BY username";
        with_pool!(self, pool => {
            let rows = sqlx::query(q).bind(domain).fetch_all(pool).await?;
            rows.iter().map(|r| r.text("username")).collect()
        })
    }

    async fn account_exists(&self, domain: &str, username: &str) -> StoreResult<bool> {
        let q = "SELECT 1 AS one FROM accounts WHERE domain = $1 AND username = $2";
        with_pool!(self, pool => Ok(sqlx::query(q).bind(domain).bind(username).fetch_optional(pool).await?.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::testing::for_each_store;

    #[tokio::test]
    async fn account_lifecycle_on_every_backend() {
        for_each_store(|store| async move {
            let c = StoredCredentials::from_password("pw", 4096).unwrap();
            assert!(store.create_account("x.test", "alice", &c).await.unwrap());
            assert!(!store.create_account("x.test", "alice", &c).await.unwrap());
            assert!(store.create_account("y.test", "alice", &c).await.unwrap());
            assert_eq!(
                store.get_credentials("x.test", "alice").await.unwrap(),
                Some(c.clone())
            );
            assert!(
                store
                    .get_credentials("x.test", "bob")
                    .await
                    .unwrap()
                    .is_none()
            );
            let c2 = StoredCredentials::from_password("pw2", 4096).unwrap();
            assert!(store.set_credentials("x.test", "alice", &c2).await.unwrap());
            assert!(!store.set_credentials("x.test", "bob", &c2).await.unwrap());
            let got = store
                .get_credentials("x.test", "alice")
                .await
                .unwrap()
                .unwrap();
            assert!(got.verify_password("pw2"));
            assert_eq!(
                store.list_accounts("x.test").await.unwrap(),
                vec!["alice".to_string()]
            );
            assert!(store.account_exists("x.test", "alice").await.unwrap());
            assert!(store.delete_account("x.test", "alice").await.unwrap());
            assert!(!store.delete_account("x.test", "alice").await.unwrap());
            assert!(!store.account_exists("x.test", "alice").await.unwrap());
            assert!(store.account_exists("y.test", "alice").await.unwrap());
        })
        .await;
    }
}
