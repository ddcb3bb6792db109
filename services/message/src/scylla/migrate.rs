//! Versioned schema management (`messenger migrate`, `migrate_on_start`).
//!
//! Version N of the schema is the first N entries of [`versions`]: version 1
//! is `schema.cql`; a later change appends a version (ALTER / CREATE
//! statements) and never edits an applied one. The keyspace's
//! `schema_version` row records the version reached, and doubles as a lock:
//! whoever takes it (an LWT) applies the missing versions while every other
//! migrator (several pods starting at once) waits for the version to
//! arrive, since concurrent schema changes of one table can conflict on
//! Cassandra. A lock whose holder died is taken over after
//! [`LOCK_STALE`].

use std::time::{Duration, Instant};

use ::scylla::{client::session::Session, statement::unprepared::Statement};
use tracing::info;
use uuid::Uuid;

use super::{ScyllaOptions, rows::Lwt, rows::execution_error, rows::other, schema_statements};
use crate::error::{Error, Result};

/// Schema changes flush and replicate; they can take far longer than a
/// request (`request_timeout`) on a busy cluster.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);

/// A migration lock older than this belongs to a migrator that died.
const LOCK_STALE: Duration = Duration::from_secs(300);

/// How long a migrator waits for another one to finish.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(600);

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub keyspace: String,
    /// The version found, and the version the schema is at now.
    pub from: u32,
    pub to: u32,
    /// The statements this run applied (empty when another migrator did).
    pub applied: Vec<String>,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from == self.to {
            return write!(f, "keyspace {}: schema at version {}, nothing to do", self.keyspace, self.to);
        }
        write!(f, "keyspace {}: schema version {} -> {}", self.keyspace, self.from, self.to)?;
        if self.applied.is_empty() {
            write!(f, " (applied by another migrator)")?;
        }
        for statement in &self.applied {
            let first_line = statement.lines().next().unwrap_or_default();
            write!(f, "\n  applied: {first_line}")?;
        }
        Ok(())
    }
}

/// Every schema version's statements, oldest first.
pub(crate) fn versions(options: &ScyllaOptions) -> Vec<Vec<String>> {
    let keyspace = &options.keyspace;
    vec![
        schema_statements(options),
        // 2: attachments (already in version 1's CREATE TABLE for keyspaces created since).
        vec![format!("ALTER TABLE {keyspace}.messages ADD attachments text")],
    ]
}

/// CQL has no `ADD ... IF NOT EXISTS`: a column a CREATE TABLE already made
/// (or a migrator that died after adding it) is no error.
fn already_applied(statement: &str, error: &Error) -> bool {
    let text = error.to_string();
    statement.contains(" ADD ")
        && (text.contains("already exist") || text.contains("conflicts with an existing column"))
}

async fn ddl(session: &Session, text: String) -> Result<()> {
    let mut statement = Statement::new(text);
    statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
    session.query_unpaged(statement, ()).await.map(drop).map_err(execution_error)
}

async fn lwt(session: &Session, text: String, values: impl ::scylla::serialize::row::SerializeRow) -> Result<Lwt> {
    let mut statement = Statement::new(text);
    statement.set_serial_consistency(Some(::scylla::statement::SerialConsistency::Serial));
    let result = session.query_unpaged(statement, values).await.map_err(execution_error)?;
    Lwt::from_result(result)
}

/// The recorded version and the migration lock, read at SERIAL.
async fn state(session: &Session, keyspace: &str) -> Result<(u32, Option<(Uuid, i64)>)> {
    let mut statement = Statement::new(format!(
        "SELECT version, migrating, migrating_since_ms FROM {keyspace}.schema_version WHERE id = 0"
    ));
    statement.set_consistency(::scylla::statement::Consistency::Serial);
    let result = session.query_unpaged(statement, ()).await.map_err(execution_error)?;
    let rows = result.into_rows_result().map_err(|e| other("schema_version", e))?;
    let row: Option<(Option<i32>, Option<Uuid>, Option<i64>)> =
        rows.maybe_first_row().map_err(|e| other("schema_version row", e))?;
    Ok(match row {
        Some((version, holder, since)) => {
            (version.unwrap_or(0).max(0) as u32, holder.map(|holder| (holder, since.unwrap_or(0))))
        }
        None => (0, None),
    })
}

/// Brings the keyspace to the newest schema version; see the module docs.
pub(super) async fn run(session: &Session, options: &ScyllaOptions) -> Result<MigrationReport> {
    let keyspace = &options.keyspace;
    let versions = versions(options);
    let target = versions.len() as u32;
    // The keyspace and the version row come first (both idempotent).
    ddl(session, versions[0][0].clone()).await?;
    ddl(
        session,
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.schema_version (id int PRIMARY KEY, version int, \
             migrating uuid, migrating_since_ms bigint, updated_at_ms bigint)"
        ),
    )
    .await?;
    session.await_schema_agreement().await.map_err(|e| other("schema agreement", e))?;
    lwt(session, format!("INSERT INTO {keyspace}.schema_version (id, version) VALUES (0, 0) IF NOT EXISTS"), ())
        .await?;
    let token = Uuid::now_v7();
    let waiting = Instant::now();
    let (found, _) = state(session, keyspace).await?;
    loop {
        let (version, lock) = state(session, keyspace).await?;
        if version >= target {
            return Ok(MigrationReport { keyspace: keyspace.clone(), from: found, to: version, applied: Vec::new() });
        }
        let now = messenger_platform::ids::now_ms();
        let taken = match lock {
            None => {
                let take = format!(
                    "UPDATE {keyspace}.schema_version SET migrating = ?, migrating_since_ms = ? WHERE id = 0 \
                     IF migrating = null"
                );
                lwt(session, take, (token, now)).await?.applied
            }
            Some((holder, since)) if now.saturating_sub(since) > LOCK_STALE.as_millis() as i64 => {
                let take = format!(
                    "UPDATE {keyspace}.schema_version SET migrating = ?, migrating_since_ms = ? WHERE id = 0 \
                     IF migrating = ?"
                );
                lwt(session, take, (token, now, holder)).await?.applied
            }
            Some(_) => false,
        };
        if !taken {
            if waiting.elapsed() > WAIT_FOR_OTHERS {
                return Err(Error::Unavailable(format!(
                    "keyspace {keyspace}: another migrator holds the schema lock for over {WAIT_FOR_OTHERS:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut applied = Vec::new();
        for (index, statements) in versions.iter().enumerate().skip(version as usize) {
            for statement in statements {
                match ddl(session, statement.clone()).await {
                    Ok(()) => applied.push(statement.clone()),
                    Err(error) if already_applied(statement, &error) => {}
                    Err(error) => return Err(error),
                }
            }
            session.await_schema_agreement().await.map_err(|e| other("schema agreement", e))?;
            let reached = index as i32 + 1;
            let record = format!(
                "UPDATE {keyspace}.schema_version SET version = ?, updated_at_ms = ? WHERE id = 0 IF migrating = ?"
            );
            if !lwt(session, record, (reached, messenger_platform::ids::now_ms(), token)).await?.applied {
                return Err(Error::Unavailable(format!("keyspace {keyspace}: lost the schema lock while migrating")));
            }
            info!(%keyspace, version = reached, "schema version applied");
        }
        let release = format!(
            "UPDATE {keyspace}.schema_version SET migrating = null, migrating_since_ms = null WHERE id = 0 \
             IF migrating = ?"
        );
        lwt(session, release, (token,)).await?;
        return Ok(MigrationReport { keyspace: keyspace.clone(), from: version, to: target, applied });
    }
}
