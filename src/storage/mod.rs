//! Storage: one trait per concern (accounts, roster, offline, archive, ...),
//! all implemented by [`Store`], which holds either an SQLite or a PostgreSQL
//! pool and dispatches once per call with [`with_pool!`]. The SQL text is
//! shared where both dialects agree (`$1` placeholders, `ON CONFLICT`,
//! `RETURNING`, BIGINT epoch-microsecond timestamps, BLOB/BYTEA as `Vec<u8>`)
//! and split with [`Store::is_sqlite`] where they do not. Schemas live in
//! `migrations/sqlite` and `migrations/postgres` and are applied at open.

pub mod accounts;
pub mod archive;
pub mod muc;
pub mod offline;
pub mod private;
pub mod secrets;
pub mod testing;
pub mod vcard;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use accounts::AccountStore;
pub use archive::ArchiveStore;
pub use muc::MucStore;
pub use offline::{OfflineMessage, OfflineStore};
pub use private::PrivateStore;
pub use secrets::SecretStore;
pub use vcard::VCardStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?} (use sqlite:// or postgres://)")]
    BadUrl(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Tables holding per-user data in an `owner` column (the bare JID); their
/// rows go when the account is deleted.
pub const USER_TABLES: &[&str] = &[
    "offline_messages",
    "vcards",
    "private_storage",
    "archive",
    "archive_prefs",
];

#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Run `$body` with `$pool` bound to the concrete pool of either backend.
/// The body is compiled once per backend, so the same query code serves both.
#[macro_export]
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.db {
            $crate::storage::Db::Sqlite($pool) => $body,
            $crate::storage::Db::Postgres($pool) => $body,
        }
    };
}

/// The store: cheap to clone (the pools are reference-counted).
#[derive(Clone, Debug)]
pub struct Store {
    pub db: Db,
}

/// Current time as microseconds since the Unix epoch (the timestamp format
/// of every table).
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open (creating an SQLite file if needed) and migrate.
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<Store> {
        Self::open_with(url, max_connections, None).await
    }

    /// Open with an optional PostgreSQL schema (used by tests to isolate).
    pub async fn open_with(
        url: &str,
        max_connections: u32,
        pg_schema: Option<&str>,
    ) -> StoreResult<Store> {
        let store = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or(path);
            if let Some(dir) = std::path::Path::new(path).parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(e.into()))?;
            }
            let opts = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(2))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Store {
                db: Db::Sqlite(pool),
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut opts = PgConnectOptions::from_str(url)?;
            if let Some(schema) = pg_schema {
                opts = opts.options([("search_path", schema)]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(2))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Store {
                db: Db::Postgres(pool),
            }
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        Ok(store)
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self.db, Db::Sqlite(_))
    }

    pub fn backend_name(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Is the database reachable? (for readiness checks)
    pub async fn ping(&self) -> bool {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.is_ok())
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}
