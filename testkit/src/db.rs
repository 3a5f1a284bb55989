//! A fresh PostgreSQL database per test, dropped when the test is done.
//!
//! Each [`TestDb`] is a database named `fleet_test_<unix seconds>_<random>` on the server that
//! the admin URL points at (`FLEET_TEST_DATABASE_URL`, default [`DEFAULT_ADMIN_URL`]). The
//! creation time in the name lets [`TestDb::sweep_stale`] remove databases that crashed or
//! killed test runs left behind, without needing any privileged catalogue function.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};

/// The admin connection used when `FLEET_TEST_DATABASE_URL` is not set: the machine's local
/// PostgreSQL, whose `postgres` user may connect without a password over loopback.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

const NAME_PREFIX: &str = "fleet_test_";
/// A test database this old is surely left over: no test runs for an hour.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// Bound on each admin operation (connect plus one statement), so an unreachable or stuck
/// server fails a test instead of hanging it, and a drop cannot hang the test's end.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A database that exists for one test. Dropping it drops the database (with `FORCE`, which
/// ends connections still open to it), except when the test is failing: then it is kept for
/// inspection and its name printed; [`TestDb::sweep_stale`] removes it an hour later.
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    dropped: bool,
}

impl TestDb {
    /// Creates a fresh, empty database. The first call in a process also sweeps stale test
    /// databases (best effort).
    pub async fn create() -> anyhow::Result<TestDb> {
        static SWEPT: AtomicBool = AtomicBool::new(false);
        if !SWEPT.swap(true, Ordering::SeqCst)
            && let Err(error) = Self::sweep_stale().await
        {
            tracing::warn!(error = format!("{error:#}"), "could not sweep stale test databases");
        }

        let admin_url = admin_url();
        let created = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{NAME_PREFIX}{created}_{}", &random[..12]);
        let url = database_url(&admin_url, &name)?;
        admin_execute(&admin_url, &format!("CREATE DATABASE {}", quote(&name)))
            .await
            .with_context(|| format!("cannot create test database {name}"))?;
        Ok(TestDb { name, url, admin_url, dropped: false })
    }

    /// The connection URL of this database (the admin URL with the database name replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A small connection pool to this database, for tests that look at rows directly.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ADMIN_TIMEOUT)
            .connect(&self.url)
            .await
            .with_context(|| format!("cannot connect to test database {}", self.name))
    }

    /// Drops the database now and reports failure, instead of leaving it to `Drop` (which can
    /// only print an error).
    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }

    /// Drops every `fleet_test_*` database created more than an hour ago (left behind by test
    /// runs that were killed). Best effort: a database that cannot be dropped is skipped with a
    /// warning. Returns how many were dropped.
    pub async fn sweep_stale() -> anyhow::Result<usize> {
        let admin_url = admin_url();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let names: Vec<String> = {
            let mut conn = admin_connect(&admin_url).await?;
            let names =
                sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'fleet\\_test\\_%'")
                    .fetch_all(&mut conn)
                    .await
                    .context("cannot list test databases")?;
            let _ = conn.close().await;
            names
        };
        let mut dropped = 0;
        for name in names {
            let Some(created) = created_at(&name) else { continue };
            if now.saturating_sub(created) < STALE_AFTER.as_secs() {
                continue;
            }
            match drop_database(&admin_url, &name).await {
                Ok(()) => dropped += 1,
                Err(error) => {
                    tracing::warn!(
                        database = name,
                        error = format!("{error:#}"),
                        "cannot drop stale test database"
                    );
                }
            }
        }
        Ok(dropped)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        if std::thread::panicking() {
            eprintln!("test database kept for the failed test: {}", self.url);
            return;
        }
        // Drop cannot await, and may run inside a runtime (where blocking on it would panic):
        // do the work on a thread of its own with its own small runtime, and wait for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&admin_url, &name))
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cannot drop test database {}: {error:#}", self.name),
            Err(_) => eprintln!("cannot drop test database {}: the dropping thread panicked", self.name),
        }
    }
}

fn admin_url() -> String {
    std::env::var("FLEET_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// The admin URL pointing at database `name` instead.
fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut url =
        url::Url::parse(admin_url).with_context(|| format!("{} is not a URL", redact(admin_url)))?;
    url.set_path(&format!("/{name}"));
    Ok(url.into())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.into()
        }
        Err(_) => "(the admin URL)".to_string(),
    }
}

/// Reads the creation time (unix seconds) from `fleet_test_<seconds>_<random>`.
fn created_at(name: &str) -> Option<u64> {
    let (seconds, _random) = name.strip_prefix(NAME_PREFIX)?.split_once('_')?;
    seconds.parse().ok()
}

/// A double-quoted SQL identifier.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

async fn admin_connect(admin_url: &str) -> anyhow::Result<PgConnection> {
    let options = PgConnectOptions::from_str(admin_url)
        .with_context(|| format!("{} is not a PostgreSQL URL", redact(admin_url)))?
        .disable_statement_logging();
    tokio::time::timeout(ADMIN_TIMEOUT, options.connect())
        .await
        .map_err(anyhow::Error::from)
        .and_then(|connected| connected.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {} (set FLEET_TEST_DATABASE_URL to an admin URL; \
                 .ci/run starts the local server)",
                redact(admin_url)
            )
        })
}

async fn admin_execute(admin_url: &str, statement: &str) -> anyhow::Result<()> {
    let mut conn = admin_connect(admin_url).await?;
    tokio::time::timeout(ADMIN_TIMEOUT, conn.execute(statement))
        .await
        .context("statement timed out")?
        .with_context(|| format!("`{statement}` failed"))?;
    let _ = conn.close().await;
    Ok(())
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    admin_execute(admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote(name))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(name: &str) -> anyhow::Result<bool> {
        let mut conn = admin_connect(&admin_url()).await?;
        let found: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
        Ok(found)
    }

    #[test]
    fn names_carry_their_creation_time() {
        assert_eq!(created_at("fleet_test_1764180000_0123456789ab"), Some(1_764_180_000));
        assert_eq!(created_at("fleet_test_other"), None);
        assert_eq!(created_at("fleet_dev"), None);
    }

    #[test]
    fn database_url_replaces_only_the_database() {
        let url =
            database_url("postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable", "fleet_test_1_a").unwrap();
        assert_eq!(url, "postgres://u:p@127.0.0.1:5432/fleet_test_1_a?sslmode=disable");
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }

    #[tokio::test]
    async fn creates_a_usable_database_and_drops_it() -> anyhow::Result<()> {
        let db = TestDb::create().await?;
        let name = db.name().to_string();
        assert!(db.url().ends_with(&name));
        let pool = db.pool().await?;
        sqlx::query("CREATE TABLE t (id int PRIMARY KEY)").execute(&pool).await?;
        sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await?;
        assert_eq!(count, 1);
        assert!(exists(&name).await?);

        // The pool is still open: the drop must end its connections rather than fail.
        drop(db);
        assert!(!exists(&name).await?, "database {name} still exists after drop");
        pool.close().await;

        let db = TestDb::create().await?;
        let name = db.name().to_string();
        db.drop_database().await?;
        assert!(!exists(&name).await?);
        Ok(())
    }

    #[tokio::test]
    async fn sweep_drops_old_test_databases_only() -> anyhow::Result<()> {
        let old = format!("{NAME_PREFIX}1000000000_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        admin_execute(&admin_url(), &format!("CREATE DATABASE {}", quote(&old))).await?;
        let fresh = TestDb::create().await?;
        TestDb::sweep_stale().await?;
        assert!(!exists(&old).await?, "stale {old} survived the sweep");
        assert!(exists(fresh.name()).await?, "the sweep dropped a fresh database");
        Ok(())
    }
}
