//! What the CQL stores (messages, media) share: cluster settings and the
//! session built from them, the mapping of driver errors, the answers of
//! lightweight transactions, and versioned schema management.
//!
//! Each store keeps its own statements and tables; all live in the keyspace
//! `[scylla]` names, so an operator configures one cluster once.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use scylla::{
    client::{execution_profile::ExecutionProfile, session::Session, session_builder::SessionBuilder},
    errors::{DbError, ExecutionError, NewSessionError, PagerExecutionError, PrepareError, RequestAttemptError},
    policies::{load_balancing::DefaultPolicy, retry::DefaultRetryPolicy},
    response::query_result::QueryResult,
    statement::{Consistency, SerialConsistency, unprepared::Statement},
    value::{CqlValue, Row},
};
use serde::{Deserialize, Serialize};
use tracing::info;
use uuid::Uuid;

use crate::tls::BackendTls;

/// How the keyspace is replicated. Development uses `SimpleStrategy` with
/// one replica; production uses `NetworkTopologyStrategy` with (at least)
/// three replicas in each datacenter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", deny_unknown_fields)]
pub enum Replication {
    SimpleStrategy { factor: u32 },
    NetworkTopologyStrategy { datacenters: BTreeMap<String, u32> },
}

impl Replication {
    /// The CQL map literal for `CREATE KEYSPACE` (after `validate`).
    pub fn to_cql(&self) -> String {
        match self {
            Replication::SimpleStrategy { factor } => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}")
            }
            Replication::NetworkTopologyStrategy { datacenters } => {
                let mut text = String::from("{'class': 'NetworkTopologyStrategy'");
                for (datacenter, factor) in datacenters {
                    text.push_str(&format!(", '{datacenter}': {factor}"));
                }
                text.push('}');
                text
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConsistencyLevel {
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

impl From<ConsistencyLevel> for Consistency {
    fn from(level: ConsistencyLevel) -> Self {
        match level {
            ConsistencyLevel::One => Consistency::One,
            ConsistencyLevel::Two => Consistency::Two,
            ConsistencyLevel::Three => Consistency::Three,
            ConsistencyLevel::Quorum => Consistency::Quorum,
            ConsistencyLevel::All => Consistency::All,
            ConsistencyLevel::LocalQuorum => Consistency::LocalQuorum,
            ConsistencyLevel::EachQuorum => Consistency::EachQuorum,
            ConsistencyLevel::LocalOne => Consistency::LocalOne,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SerialLevel {
    Serial,
    LocalSerial,
}

impl SerialLevel {
    pub fn serial(self) -> SerialConsistency {
        match self {
            SerialLevel::Serial => SerialConsistency::Serial,
            SerialLevel::LocalSerial => SerialConsistency::LocalSerial,
        }
    }

    /// The consistency of a read that must see every committed LWT.
    pub fn read(self) -> Consistency {
        match self {
            SerialLevel::Serial => Consistency::Serial,
            SerialLevel::LocalSerial => Consistency::LocalSerial,
        }
    }
}

/// A keyspace name this store accepts: `[a-z_][a-z0-9_]{0,47}`.
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.len() <= 48
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A datacenter name as `NetworkTopologyStrategy` takes it.
pub fn valid_datacenter(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A CQL failure: `Unavailable` when a retry may cure it (a node down,
/// overloaded or slow), `Storage` otherwise. Each store maps it to its own error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Storage(String),
}

pub fn other(context: &str, error: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{context}: {error}"))
}

pub fn execution_error(error: ExecutionError) -> Error {
    if is_transient(&error) {
        Error::Unavailable(format!("scylla: {error}"))
    } else {
        Error::Storage(format!("scylla: {error}"))
    }
}

fn is_transient(error: &ExecutionError) -> bool {
    match error {
        ExecutionError::EmptyPlan | ExecutionError::ConnectionPoolError(_) | ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::RateLimitReached { .. }
            ),
            RequestAttemptError::BrokenConnectionError(_) | RequestAttemptError::UnableToAllocStreamId => true,
            _ => false,
        },
        _ => false,
    }
}

pub fn prepare_error(error: PrepareError) -> Error {
    Error::Unavailable(format!("scylla: cannot prepare a statement: {error}"))
}

pub fn pager_error(error: PagerExecutionError) -> Error {
    match error {
        PagerExecutionError::NextPageError(error) => Error::Unavailable(format!("scylla: {error}")),
        other => Error::Storage(format!("scylla: {other}")),
    }
}

pub fn session_error(error: NewSessionError) -> Error {
    Error::Unavailable(format!("scylla: cannot connect: {error}"))
}

/// The cluster the CQL stores share (`[scylla]`): where it is, how to talk
/// to it, and the keyspace that holds the message, media and push tables.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Used by `migrate` when it creates the keyspace; unset means
    /// `SimpleStrategy` with one replica (development). Not a default value:
    /// the layers below a file would merge into a file's table, so a file's
    /// `NetworkTopologyStrategy` would carry the default's `factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// Prefer (and stay in) this datacenter; None treats every node as local.
    pub local_datacenter: Option<String>,
    pub consistency: ConsistencyLevel,
    /// Paxos consistency of LWTs and of the reads policy decisions use.
    pub serial_consistency: SerialLevel,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Create or update the tables at start (also `messenger migrate`).
    pub migrate_on_start: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to every node (on when `tls.ca_file` is set). The driver checks a
    /// node's certificate for the node's IP address, or for `tls.server_name`.
    pub tls: BackendTls,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "messenger".into(),
            replication: None,
            local_datacenter: None,
            consistency: ConsistencyLevel::LocalQuorum,
            serial_consistency: SerialLevel::LocalSerial,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            migrate_on_start: false,
            username: None,
            password: None,
            tls: BackendTls::default(),
        }
    }
}

impl Cluster {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() || self.nodes.iter().any(|node| node.trim().is_empty()) {
            return Err("scylla.nodes must list at least one non-empty host:port".into());
        }
        if !valid_identifier(&self.keyspace) {
            return Err(format!("scylla.keyspace {:?} must match [a-z_][a-z0-9_]{{0,47}}", self.keyspace));
        }
        match &self.replication() {
            Replication::SimpleStrategy { factor } if *factor == 0 => {
                return Err("scylla.replication.factor must be positive".into());
            }
            Replication::NetworkTopologyStrategy { datacenters } => {
                if datacenters.is_empty() {
                    return Err("scylla.replication.datacenters must name at least one datacenter".into());
                }
                for (datacenter, factor) in datacenters {
                    if !valid_datacenter(datacenter) {
                        return Err(format!("scylla.replication: bad datacenter name {datacenter:?}"));
                    }
                    if *factor == 0 {
                        return Err(format!("scylla.replication: datacenter {datacenter} has factor 0"));
                    }
                }
            }
            Replication::SimpleStrategy { .. } => {}
        }
        if let Some(datacenter) = &self.local_datacenter
            && !valid_datacenter(datacenter)
        {
            return Err(format!("scylla.local_datacenter: bad datacenter name {datacenter:?}"));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("scylla.username and scylla.password go together".into());
        }
        for (key, value) in [("request_timeout", self.request_timeout), ("connect_timeout", self.connect_timeout)] {
            if value.is_zero() {
                return Err(format!("scylla.{key} must be positive"));
            }
        }
        self.tls.validate("scylla.tls")
    }

    /// The keyspace's replication: the configured one, else one replica.
    pub fn replication(&self) -> Replication {
        self.replication.clone().unwrap_or(Replication::SimpleStrategy { factor: 1 })
    }
}

/// A session with token-aware balancing that stays in the local datacenter,
/// the default retry policy and the cluster's consistency levels, over TLS
/// when the cluster's `tls` says so. Settings that do not validate are
/// refused first: the keyspace goes into statement text.
pub async fn connect(cluster: &Cluster) -> Result<Session, Error> {
    cluster.validate().map_err(|error| Error::Storage(format!("scylla: {error}")))?;
    let mut balancing = DefaultPolicy::builder().token_aware(true).permit_dc_failover(false);
    if let Some(datacenter) = &cluster.local_datacenter {
        balancing = balancing.prefer_datacenter(datacenter.clone());
    }
    let profile = ExecutionProfile::builder()
        .consistency(cluster.consistency.into())
        .serial_consistency(Some(cluster.serial_consistency.serial()))
        .request_timeout(Some(cluster.request_timeout))
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .load_balancing_policy(balancing.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cluster.nodes)
        .connection_timeout(cluster.connect_timeout)
        .default_execution_profile_handle(profile.into_handle());
    if let (Some(username), Some(password)) = (&cluster.username, &cluster.password) {
        builder = builder.user(username, password);
    }
    let tls = cluster.tls.client_config().map_err(|error| Error::Storage(format!("scylla tls: {error}")))?;
    builder = builder.tls_context(tls.map(Arc::new));
    builder.build().await.map_err(session_error)
}

/// Every row of a statement's answer, typed.
pub fn rows<R>(result: QueryResult) -> Result<Vec<R>, Error>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    let rows = result.into_rows_result().map_err(|e| other("expected rows", e))?;
    let typed = rows.rows::<R>().map_err(|e| other("unexpected row type", e))?;
    typed.collect::<Result<Vec<R>, _>>().map_err(|e| other("cannot read a row", e))
}

/// The answer of a conditional statement: whether it applied, and the
/// current values returned with it. Cassandra returns only `[applied]` when
/// a statement applied, ScyllaDB the row as well: read values only from an
/// answer that did not apply.
pub struct Lwt {
    pub applied: bool,
    columns: Vec<(String, Option<CqlValue>)>,
}

impl Lwt {
    pub fn from_result(result: QueryResult) -> Result<Self, Error> {
        let rows = result.into_rows_result().map_err(|e| other("conditional statement returned no rows", e))?;
        let names: Vec<String> = rows.column_specs().iter().map(|spec| spec.name().to_owned()).collect();
        let row: Row = rows.first_row().map_err(|e| other("conditional statement returned no row", e))?;
        let columns: Vec<(String, Option<CqlValue>)> = names.into_iter().zip(row.columns).collect();
        let applied = columns
            .iter()
            .find(|(name, _)| name == "[applied]")
            .and_then(|(_, value)| value.as_ref())
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| Error::Storage("conditional statement returned no [applied] column".into()))?;
        Ok(Self { applied, columns })
    }

    fn value(&self, name: &str) -> Option<&CqlValue> {
        self.columns.iter().find(|(column, _)| column == name).and_then(|(_, value)| value.as_ref())
    }

    pub fn bigint(&self, name: &str) -> Option<i64> {
        self.value(name).and_then(CqlValue::as_bigint)
    }

    pub fn uuid(&self, name: &str) -> Option<Uuid> {
        self.value(name).and_then(CqlValue::as_uuid)
    }
}

// ---- Versioned schema management (`messenger migrate`, `migrate_on_start`).
//
// Version N of a component's schema is the first N entries of its
// `versions`: a later change appends a version (ALTER / CREATE statements)
// and never edits an applied one. The keyspace's `schema_version` table has
// one row per component (0: messages, 1: media) recording the version
// reached; the row doubles as a lock: whoever takes it (an LWT) applies the
// missing versions while every other migrator (several pods starting at
// once) waits for the version to arrive, since concurrent schema changes of
// one table can conflict on Cassandra. A lock whose holder died is taken
// over after `LOCK_STALE`.

/// Schema changes flush and replicate; they can take far longer than a
/// request (`request_timeout`) on a busy cluster.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);

/// A migration lock older than this belongs to a migrator that died.
const LOCK_STALE: Duration = Duration::from_secs(300);

/// How long a migrator waits for another one to finish.
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(600);

/// One store's schema history.
pub struct Schema {
    /// Its row in `schema_version` (0: messages, 1: media).
    pub component: i32,
    /// For reports: `messages`, `media`.
    pub name: &'static str,
    pub keyspace: String,
    /// Used when the keyspace is created.
    pub replication: Replication,
    /// Every version's statements, oldest first.
    pub versions: Vec<Vec<String>>,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub keyspace: String,
    pub name: &'static str,
    /// The version found, and the version the schema is at now.
    pub from: u32,
    pub to: u32,
    /// The statements this run applied (empty when another migrator did).
    pub applied: Vec<String>,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (keyspace, name) = (&self.keyspace, self.name);
        if self.from == self.to {
            return write!(f, "keyspace {keyspace} ({name}): schema at version {}, nothing to do", self.to);
        }
        write!(f, "keyspace {keyspace} ({name}): schema version {} -> {}", self.from, self.to)?;
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

/// CQL has no `ADD ... IF NOT EXISTS`: a column a CREATE TABLE already made
/// (or a migrator that died after adding it) is no error.
fn already_applied(statement: &str, error: &Error) -> bool {
    let text = error.to_string();
    statement.contains(" ADD ")
        && (text.contains("already exist") || text.contains("conflicts with an existing column"))
}

async fn ddl(session: &Session, text: String) -> Result<(), Error> {
    let mut statement = Statement::new(text);
    statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
    session.query_unpaged(statement, ()).await.map(drop).map_err(execution_error)
}

async fn lwt(session: &Session, text: String, values: impl scylla::serialize::row::SerializeRow) -> Result<Lwt, Error> {
    let mut statement = Statement::new(text);
    statement.set_serial_consistency(Some(SerialConsistency::Serial));
    let result = session.query_unpaged(statement, values).await.map_err(execution_error)?;
    Lwt::from_result(result)
}

/// The component's recorded version and migration lock, read at SERIAL.
async fn state(session: &Session, schema: &Schema) -> Result<(u32, Option<(Uuid, i64)>), Error> {
    let mut statement = Statement::new(format!(
        "SELECT version, migrating, migrating_since_ms FROM {}.schema_version WHERE id = ?",
        schema.keyspace
    ));
    statement.set_consistency(Consistency::Serial);
    let result = session.query_unpaged(statement, (schema.component,)).await.map_err(execution_error)?;
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

fn now_ms() -> i64 {
    crate::ids::now_ms()
}

/// Brings `schema` to its newest version (creating the keyspace if
/// missing), safe to run from several processes at once; says what it did.
pub async fn migrate(session: &Session, schema: &Schema) -> Result<MigrationReport, Error> {
    let keyspace = &schema.keyspace;
    let (id, target) = (schema.component, schema.versions.len() as u32);
    // The keyspace and the version row come first (both idempotent).
    ddl(
        session,
        format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}", schema.replication.to_cql()),
    )
    .await?;
    ddl(
        session,
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.schema_version (id int PRIMARY KEY, version int, \
             migrating uuid, migrating_since_ms bigint, updated_at_ms bigint)"
        ),
    )
    .await?;
    session.await_schema_agreement().await.map_err(|e| other("schema agreement", e))?;
    lwt(session, format!("INSERT INTO {keyspace}.schema_version (id, version) VALUES (?, 0) IF NOT EXISTS"), (id,))
        .await?;
    let token = Uuid::now_v7();
    let waiting = Instant::now();
    let (found, _) = state(session, schema).await?;
    let report = |from: u32, to: u32, applied: Vec<String>| MigrationReport {
        keyspace: keyspace.clone(),
        name: schema.name,
        from,
        to,
        applied,
    };
    loop {
        let (version, lock) = state(session, schema).await?;
        if version >= target {
            return Ok(report(found, version, Vec::new()));
        }
        let taken = match lock {
            None => {
                let take = format!(
                    "UPDATE {keyspace}.schema_version SET migrating = ?, migrating_since_ms = ? WHERE id = ? \
                     IF migrating = null"
                );
                lwt(session, take, (token, now_ms(), id)).await?.applied
            }
            Some((holder, since)) if now_ms().saturating_sub(since) > LOCK_STALE.as_millis() as i64 => {
                let take = format!(
                    "UPDATE {keyspace}.schema_version SET migrating = ?, migrating_since_ms = ? WHERE id = ? \
                     IF migrating = ?"
                );
                lwt(session, take, (token, now_ms(), id, holder)).await?.applied
            }
            Some(_) => false,
        };
        if !taken {
            if waiting.elapsed() > WAIT_FOR_OTHERS {
                return Err(Error::Unavailable(format!(
                    "keyspace {keyspace} ({}): another migrator holds the schema lock for over {WAIT_FOR_OTHERS:?}",
                    schema.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut applied = Vec::new();
        for (index, statements) in schema.versions.iter().enumerate().skip(version as usize) {
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
                "UPDATE {keyspace}.schema_version SET version = ?, updated_at_ms = ? WHERE id = ? IF migrating = ?"
            );
            if !lwt(session, record, (reached, now_ms(), id, token)).await?.applied {
                return Err(Error::Unavailable(format!(
                    "keyspace {keyspace} ({}): lost the schema lock while migrating",
                    schema.name
                )));
            }
            info!(%keyspace, schema = schema.name, version = reached, "schema version applied");
        }
        let release = format!(
            "UPDATE {keyspace}.schema_version SET migrating = null, migrating_since_ms = null WHERE id = ? \
             IF migrating = ?"
        );
        lwt(session, release, (id, token)).await?;
        return Ok(report(version, target, applied));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every store's session checks the settings before it connects: a
    /// keyspace that would be pasted into CQL text never reaches a node.
    #[tokio::test]
    async fn a_session_is_refused_settings_that_do_not_validate() {
        let cluster = Cluster { keyspace: "messenger; DROP KEYSPACE x".into(), ..Cluster::default() };
        let error = connect(&cluster).await.unwrap_err().to_string();
        assert!(error.contains("scylla.keyspace"), "{error}");
    }
}
