//! Test support: fresh stores on every backend. SQLite always (a temporary
//! file); PostgreSQL when `STARLING_TEST_DATABASE_URL` is set, in a schema of
//! its own so that tests run in parallel.

use std::future::Future;
use std::path::PathBuf;

use super::Store;

/// Environment variable naming the PostgreSQL database for tests.
pub const PG_ENV: &str = "STARLING_TEST_DATABASE_URL";

/// A unique name for temporary files and schemas.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        t % 1_000_000_000,
        n
    )
}

/// A fresh temporary directory (left for the OS to clean up).
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A fresh SQLite store in a temporary file.
pub async fn sqlite_store() -> Store {
    let dir = temp_dir("starling_db");
    Store::open(&format!("sqlite://{}", dir.join("test.db").display()), 4)
        .await
        .expect("open sqlite store")
}

/// The database URL for a fresh PostgreSQL schema, if PostgreSQL is
/// configured: `(url, schema)`. The schema is created here.
pub async fn pg_schema() -> Option<(String, String)> {
    let url = std::env::var(PG_ENV).ok().filter(|u| !u.is_empty())?;
    let schema = unique_name("t").to_lowercase();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect to STARLING_TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    Some((url, schema))
}

/// A fresh PostgreSQL store, if configured.
pub async fn pg_store() -> Option<Store> {
    let (url, schema) = pg_schema().await?;
    Some(
        Store::open_with(&url, 4, Some(&schema))
            .await
            .expect("open postgres store"),
    )
}

/// Every backend available to this test run.
pub async fn stores() -> Vec<Store> {
    let mut v = vec![sqlite_store().await];
    if let Some(pg) = pg_store().await {
        v.push(pg);
    }
    v
}

/// Run `f` once per backend, each with a fresh store.
pub async fn for_each_store<F, Fut>(f: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    for store in stores().await {
        let name = store.backend_name();
        tracing::debug!(backend = name, "running storage test");
        f(store.clone()).await;
        store.close().await;
    }
}

/// A database that can be opened again (to test what survives a restart):
/// an SQLite file, or a PostgreSQL schema.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub url: String,
    pub pg_schema: Option<String>,
}

impl TestDb {
    /// A fresh SQLite file.
    pub fn sqlite() -> TestDb {
        let dir = temp_dir("starling_db");
        TestDb {
            url: format!("sqlite://{}", dir.join("test.db").display()),
            pg_schema: None,
        }
    }

    /// A fresh PostgreSQL schema, if PostgreSQL is configured.
    pub async fn postgres() -> Option<TestDb> {
        let (url, schema) = pg_schema().await?;
        Some(TestDb {
            url,
            pg_schema: Some(schema),
        })
    }

    /// Every backend available to this test run, each a fresh database.
    pub async fn all() -> Vec<TestDb> {
        let mut v = vec![TestDb::sqlite()];
        if let Some(pg) = TestDb::postgres().await {
            v.push(pg);
        }
        v
    }

    /// Open (and migrate) a store on this database; call again after
    /// closing the previous store to simulate a restart.
    pub async fn open(&self) -> Store {
        Store::open_with(&self.url, 4, self.pg_schema.as_deref())
            .await
            .expect("open test store")
    }

    pub fn backend_name(&self) -> &'static str {
        if self.pg_schema.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }
}
