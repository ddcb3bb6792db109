//! The `PushStore` on the ScyllaDB cluster the message store uses (the
//! keyspace `[scylla]` names), for several notify instances.
//!
//! Tables (`push_` prefixed, beside the message and media tables):
//! - `push_devices`: registrations by user; `push_mutes`: mutes by
//!   conversation (an entry's recipients are read in one partition).
//! - `push_jobs`: the outbox, one row per job id, every state change an LWT
//!   on `state`, so a job is claimed, finished, cancelled or retracted once
//!   across instances.
//! - `push_due`: queued jobs by due time in [`DUE_SHARDS`] partitions; the
//!   claim reads each shard's due range, holds each job with an LWT
//!   (`IF state = 0 AND held_until_ms <= now AND due_at_ms = <entry's>`)
//!   and drops entries that no longer match their job. An entry goes when
//!   its job finishes or moves.
//! - `push_by_conversation`: a user's notifications per conversation and
//!   seq (what a read cancels or retracts); `push_unread`: the badge's
//!   entries; `push_dead`: dead letters, newest first, in one partition
//!   (they are rare).
//!
//! Retention is by TTL rather than by [`PushStore::purge`]: a job that
//! finishes is written again whole with `finished_retention` (dead ones
//! `dead_letter_retention`), and index rows carry the same TTL. The
//! rewrite follows the LWT that finished the job; if clock skew gave it an
//! older timestamp than the LWT's, the row keeps its state and only misses
//! its expiry.
//!
//! Costs: a job is an LWT to store and one to claim, a read and an LWT to
//! finish; a read one index range plus a read (and maybe an LWT) per
//! notification it passes.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt as _, TryStreamExt as _, stream};
use messenger_platform::cql::{self, Lwt};
use scylla::{
    DeserializeRow, SerializeRow, client::session::Session, response::query_result::QueryResult,
    serialize::row::SerializeRow, statement::prepared::PreparedStatement,
};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Device, Job, JobKind, JobState, Mute, OutboxSize, Platform, Preview, PushStore, Shown, Unread, WebPushKeys,
    },
};

/// The push tables' row in `schema_version`.
const COMPONENT: i32 = 2;
/// Partitions of `push_due` (spread the writes; a claim reads them all).
pub const DUE_SHARDS: i32 = 16;
/// Statements one call runs at once.
const PARALLEL: usize = 32;

const DEVICE_COLUMNS: &str = "user_id, device_id, platform, push_token, endpoint, p256dh, auth, app_id, locale, previews, \
     secret, registration, updated_at_ms";
const JOB_COLUMNS: &str = "job_id, kind, user_id, device_id, conversation_id, seq, state, due_at_ms, held_until_ms, \
     attempts, created_at_ms, preview_sender, preview_title, preview_body, last_error, finished_at_ms, \
     trace_context";

/// Every schema version's statements, oldest first (the runner is
/// `messenger_platform::cql::migrate`).
pub fn versions(keyspace: &str) -> Vec<Vec<String>> {
    let k = keyspace;
    vec![vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_devices (user_id text, device_id text, platform int, push_token text, \
             endpoint text, p256dh text, auth text, app_id text, locale text, previews boolean, secret text, \
             registration uuid, updated_at_ms bigint, PRIMARY KEY (user_id, device_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_mutes (conversation_id uuid, user_id text, until_ms bigint, \
             mentions_only boolean, PRIMARY KEY (conversation_id, user_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_jobs (job_id uuid PRIMARY KEY, kind int, user_id text, \
             device_id text, conversation_id uuid, seq bigint, state bigint, due_at_ms bigint, held_until_ms bigint, \
             attempts int, created_at_ms bigint, preview_sender text, preview_title text, preview_body text, \
             last_error text, finished_at_ms bigint, trace_context text)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_due (shard int, due_at_ms bigint, job_id uuid, \
             PRIMARY KEY (shard, due_at_ms, job_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_by_conversation (user_id text, conversation_id uuid, seq bigint, \
             device_id text, job_id uuid, PRIMARY KEY ((user_id, conversation_id), seq, device_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_unread (user_id text, conversation_id uuid, seq bigint, \
             at_ms bigint, PRIMARY KEY (user_id, conversation_id, seq))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {k}.push_dead (bucket int, finished_at_ms bigint, job_id uuid, \
             PRIMARY KEY (bucket, finished_at_ms, job_id)) WITH CLUSTERING ORDER BY (finished_at_ms DESC, job_id ASC)"
        ),
    ]]
}

async fn run_migrations(session: &Session, cluster: &cql::Cluster) -> Result<cql::MigrationReport> {
    let schema = cql::Schema {
        component: COMPONENT,
        name: "push",
        keyspace: cluster.keyspace.clone(),
        replication: cluster.replication(),
        versions: versions(&cluster.keyspace),
    };
    Ok(cql::migrate(session, &schema).await?)
}

/// Brings the push tables of `cluster`'s keyspace to the newest version
/// (`messenger migrate`); safe to run from several processes at once.
pub async fn migrate(cluster: &cql::Cluster) -> Result<cql::MigrationReport> {
    run_migrations(&cql::connect(cluster).await?, cluster).await
}

impl From<cql::Error> for Error {
    fn from(error: cql::Error) -> Self {
        match error {
            cql::Error::Unavailable(text) => Error::Unavailable(text),
            cql::Error::Storage(text) => Error::Storage(text),
        }
    }
}

/// How long finished rows live (TTL).
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub finished: Duration,
    pub dead: Duration,
}

fn ttl(duration: Duration) -> i32 {
    duration.as_secs().clamp(1, i32::MAX as u64) as i32
}

fn shard(id: Uuid) -> i32 {
    (id.as_u128() % DUE_SHARDS as u128) as i32
}

#[derive(DeserializeRow)]
struct DeviceRow {
    user_id: String,
    device_id: String,
    platform: Option<i32>,
    push_token: Option<String>,
    endpoint: Option<String>,
    p256dh: Option<String>,
    auth: Option<String>,
    app_id: Option<String>,
    locale: Option<String>,
    previews: Option<bool>,
    secret: Option<String>,
    registration: Option<Uuid>,
    updated_at_ms: Option<i64>,
}

impl DeviceRow {
    fn into_device(self) -> Result<Device> {
        let platform = self
            .platform
            .and_then(|code| Platform::from_code(i64::from(code)))
            .ok_or_else(|| Error::Storage(format!("device {} has no known platform", self.device_id)))?;
        let web_push = self.endpoint.map(|endpoint| WebPushKeys {
            endpoint,
            p256dh: self.p256dh.unwrap_or_default(),
            auth: self.auth.unwrap_or_default(),
        });
        Ok(Device {
            user_id: self.user_id,
            device_id: self.device_id,
            platform,
            token: self.push_token.unwrap_or_default(),
            web_push,
            app_id: self.app_id.unwrap_or_default(),
            locale: self.locale.unwrap_or_default(),
            previews: self.previews.unwrap_or(false),
            secret: self.secret.unwrap_or_default(),
            registration: self.registration.unwrap_or_default(),
            updated_at_ms: self.updated_at_ms.unwrap_or(0),
        })
    }
}

#[derive(DeserializeRow)]
struct JobRow {
    job_id: Uuid,
    kind: Option<i32>,
    user_id: Option<String>,
    device_id: Option<String>,
    conversation_id: Option<Uuid>,
    seq: Option<i64>,
    state: Option<i64>,
    due_at_ms: Option<i64>,
    held_until_ms: Option<i64>,
    attempts: Option<i32>,
    created_at_ms: Option<i64>,
    preview_sender: Option<String>,
    preview_title: Option<String>,
    preview_body: Option<String>,
    last_error: Option<String>,
    finished_at_ms: Option<i64>,
    trace_context: Option<String>,
}

/// A job as stored, with what only this backend keeps.
struct Stored {
    job: Job,
    held_until_ms: i64,
    finished_at_ms: i64,
}

impl JobRow {
    /// None for a row that is not a whole job (only its key columns left).
    fn into_stored(self) -> Option<Stored> {
        let preview = self.preview_sender.map(|sender_id| Preview {
            sender_id,
            title: self.preview_title.unwrap_or_default(),
            body: self.preview_body.unwrap_or_default(),
        });
        let job = Job {
            id: self.job_id,
            kind: JobKind::from_code(i64::from(self.kind?))?,
            user_id: self.user_id?,
            device_id: self.device_id?,
            conversation_id: self.conversation_id?,
            seq: self.seq? as u64,
            state: JobState::from_code(self.state?)?,
            due_at_ms: self.due_at_ms.unwrap_or(0),
            attempts: self.attempts.unwrap_or(0) as u32,
            created_at_ms: self.created_at_ms.unwrap_or(0),
            preview,
            last_error: self.last_error.unwrap_or_default(),
            trace_context: self.trace_context.unwrap_or_default(),
        };
        Some(Stored {
            job,
            held_until_ms: self.held_until_ms.unwrap_or(0),
            finished_at_ms: self.finished_at_ms.unwrap_or(0),
        })
    }
}

struct Statements {
    put_device: PreparedStatement,
    device: PreparedStatement,
    devices: PreparedStatement,
    remove_device: PreparedStatement,
    remove_device_if: PreparedStatement,
    mute: PreparedStatement,
    unmute: PreparedStatement,
    mutes: PreparedStatement,
    insert_job: PreparedStatement,
    rewrite_job: PreparedStatement,
    job: PreparedStatement,
    insert_due: PreparedStatement,
    delete_due: PreparedStatement,
    due: PreparedStatement,
    count_due: PreparedStatement,
    hold: PreparedStatement,
    finish: PreparedStatement,
    reschedule: PreparedStatement,
    index_conversation: PreparedStatement,
    by_conversation: PreparedStatement,
    forget_conversation: PreparedStatement,
    insert_unread: PreparedStatement,
    unread: PreparedStatement,
    clear_unread: PreparedStatement,
    insert_dead: PreparedStatement,
    dead: PreparedStatement,
    count_dead: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, k: &str) -> Result<Self> {
        let prepare = |text: String| async move { session.prepare(text).await.map_err(cql::prepare_error) };
        let job_values = vec!["?"; 17].join(", ");
        Ok(Self {
            put_device: prepare(format!(
                "INSERT INTO {k}.push_devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            device: prepare(format!(
                "SELECT {DEVICE_COLUMNS} FROM {k}.push_devices WHERE user_id = ? AND device_id = ?"
            ))
            .await?,
            devices: prepare(format!("SELECT {DEVICE_COLUMNS} FROM {k}.push_devices WHERE user_id = ?")).await?,
            remove_device: prepare(format!(
                "DELETE FROM {k}.push_devices WHERE user_id = ? AND device_id = ? IF EXISTS"
            ))
            .await?,
            remove_device_if: prepare(format!(
                "DELETE FROM {k}.push_devices WHERE user_id = ? AND device_id = ? IF registration = ?"
            ))
            .await?,
            mute: prepare(format!(
                "INSERT INTO {k}.push_mutes (conversation_id, user_id, until_ms, mentions_only) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            unmute: prepare(format!("DELETE FROM {k}.push_mutes WHERE conversation_id = ? AND user_id = ?")).await?,
            mutes: prepare(format!(
                "SELECT user_id, until_ms, mentions_only FROM {k}.push_mutes WHERE conversation_id = ?"
            ))
            .await?,
            insert_job: prepare(format!(
                "INSERT INTO {k}.push_jobs ({JOB_COLUMNS}) VALUES ({job_values}) IF NOT EXISTS USING TTL ?"
            ))
            .await?,
            rewrite_job: prepare(format!(
                "INSERT INTO {k}.push_jobs ({JOB_COLUMNS}) VALUES ({job_values}) USING TTL ?"
            ))
            .await?,
            job: prepare(format!("SELECT {JOB_COLUMNS} FROM {k}.push_jobs WHERE job_id = ?")).await?,
            insert_due: prepare(format!("INSERT INTO {k}.push_due (shard, due_at_ms, job_id) VALUES (?, ?, ?)"))
                .await?,
            delete_due: prepare(format!("DELETE FROM {k}.push_due WHERE shard = ? AND due_at_ms = ? AND job_id = ?"))
                .await?,
            due: prepare(format!(
                "SELECT due_at_ms, job_id FROM {k}.push_due WHERE shard = ? AND due_at_ms <= ? LIMIT ?"
            ))
            .await?,
            count_due: prepare(format!("SELECT COUNT(*) FROM {k}.push_due WHERE shard = ?")).await?,
            hold: prepare(format!(
                "UPDATE {k}.push_jobs SET held_until_ms = ? WHERE job_id = ? \
                 IF state = 0 AND held_until_ms <= ? AND due_at_ms = ?"
            ))
            .await?,
            finish: prepare(format!(
                "UPDATE {k}.push_jobs SET state = ?, attempts = ?, last_error = ?, held_until_ms = 0, \
                 finished_at_ms = ? WHERE job_id = ? IF state = ?"
            ))
            .await?,
            reschedule: prepare(format!(
                "UPDATE {k}.push_jobs SET due_at_ms = ?, attempts = ?, last_error = ?, held_until_ms = 0 \
                 WHERE job_id = ? IF state = 0"
            ))
            .await?,
            index_conversation: prepare(format!(
                "INSERT INTO {k}.push_by_conversation (user_id, conversation_id, seq, device_id, job_id) \
                 VALUES (?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            by_conversation: prepare(format!(
                "SELECT seq, device_id, job_id FROM {k}.push_by_conversation \
                 WHERE user_id = ? AND conversation_id = ? AND seq <= ?"
            ))
            .await?,
            forget_conversation: prepare(format!(
                "DELETE FROM {k}.push_by_conversation WHERE user_id = ? AND conversation_id = ? AND seq <= ?"
            ))
            .await?,
            insert_unread: prepare(format!(
                "INSERT INTO {k}.push_unread (user_id, conversation_id, seq, at_ms) VALUES (?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            unread: prepare(format!("SELECT seq FROM {k}.push_unread WHERE user_id = ? LIMIT ?")).await?,
            clear_unread: prepare(format!(
                "DELETE FROM {k}.push_unread WHERE user_id = ? AND conversation_id = ? AND seq <= ?"
            ))
            .await?,
            insert_dead: prepare(format!(
                "INSERT INTO {k}.push_dead (bucket, finished_at_ms, job_id) VALUES (0, ?, ?) USING TTL ?"
            ))
            .await?,
            dead: prepare(format!("SELECT job_id FROM {k}.push_dead WHERE bucket = 0 LIMIT ?")).await?,
            count_dead: prepare(format!("SELECT COUNT(*) FROM {k}.push_dead WHERE bucket = 0")).await?,
        })
    }
}

pub struct ScyllaStore {
    session: Session,
    statements: Statements,
    retention: Retention,
}

fn rows<R>(result: scylla::response::query_result::QueryResult) -> Result<Vec<R>>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    Ok(cql::rows(result)?)
}

impl ScyllaStore {
    /// Connects, migrates when `migrate_on_start`, and prepares every statement.
    pub async fn connect(cluster: &cql::Cluster, retention: Retention) -> Result<Self> {
        let session = cql::connect(cluster).await?;
        if cluster.migrate_on_start {
            let report = run_migrations(&session, cluster).await?;
            tracing::info!(%report, "scylla schema");
        }
        let statements = Statements::prepare(&session, &cluster.keyspace).await?;
        Ok(Self { session, statements, retention })
    }

    async fn execute(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<QueryResult> {
        Ok(self.session.execute_unpaged(statement, values).await.map_err(cql::execution_error)?)
    }

    async fn lwt(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<Lwt> {
        Ok(Lwt::from_result(self.execute(statement, values).await?)?)
    }

    async fn stored(&self, id: Uuid) -> Result<Option<Stored>> {
        let found: Vec<JobRow> = rows(self.execute(&self.statements.job, (id,)).await?)?;
        Ok(found.into_iter().next().and_then(JobRow::into_stored))
    }

    async fn forget_due(&self, due_at_ms: i64, id: Uuid) -> Result<()> {
        self.execute(&self.statements.delete_due, (shard(id), due_at_ms, id)).await?;
        Ok(())
    }

    /// `stored` -> `state` if it is still in `from`: the LWT, then the row
    /// written again whole with its retention, its due entry gone, and a
    /// dead letter listed. False when another change came first.
    async fn settle(
        &self,
        stored: Stored,
        from: JobState,
        state: JobState,
        attempts: u32,
        error: &str,
    ) -> Result<bool> {
        let now = messenger_platform::ids::now_ms();
        let id = stored.job.id;
        let values = (state.code(), attempts as i32, error, now, id, from.code());
        if !self.lwt(&self.statements.finish, values).await?.applied {
            return Ok(false);
        }
        let keep = if state == JobState::Dead { self.retention.dead } else { self.retention.finished };
        let job = Job { state, attempts, last_error: error.to_owned(), ..stored.job };
        self.execute(&self.statements.rewrite_job, job_values(&job, 0, now, ttl(keep))).await?;
        if from == JobState::Queued {
            self.forget_due(job.due_at_ms, id).await?;
        }
        if state == JobState::Dead {
            self.execute(&self.statements.insert_dead, (now, id, ttl(keep))).await?;
        }
        Ok(true)
    }

    /// The notifications of the user's conversation through `read_seq`, as stored now.
    async fn notifications_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<Vec<Stored>> {
        let values = (user_id, conversation_id, read_seq as i64);
        let index: Vec<(i64, String, Uuid)> = rows(self.execute(&self.statements.by_conversation, values).await?)?;
        let found: Vec<Result<Option<Stored>>> =
            stream::iter(index).map(|(_, _, id)| self.stored(id)).buffer_unordered(PARALLEL).collect().await;
        Ok(found.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten().collect())
    }
}

/// A job's columns in `JOB_COLUMNS` order, then its TTL (0: none).
#[derive(SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct JobValues<'a> {
    job_id: Uuid,
    kind: i32,
    user_id: &'a str,
    device_id: &'a str,
    conversation_id: Uuid,
    seq: i64,
    state: i64,
    due_at_ms: i64,
    held_until_ms: i64,
    attempts: i32,
    created_at_ms: i64,
    preview_sender: Option<&'a str>,
    preview_title: Option<&'a str>,
    preview_body: Option<&'a str>,
    last_error: &'a str,
    finished_at_ms: i64,
    trace_context: &'a str,
    ttl: i32,
}

fn job_values(job: &Job, held_until_ms: i64, finished_at_ms: i64, ttl: i32) -> JobValues<'_> {
    let preview = job.preview.as_ref();
    JobValues {
        job_id: job.id,
        kind: job.kind.code() as i32,
        user_id: &job.user_id,
        device_id: &job.device_id,
        conversation_id: job.conversation_id,
        seq: job.seq as i64,
        state: job.state.code(),
        due_at_ms: job.due_at_ms,
        held_until_ms,
        attempts: job.attempts as i32,
        created_at_ms: job.created_at_ms,
        preview_sender: preview.map(|p| p.sender_id.as_str()),
        preview_title: preview.map(|p| p.title.as_str()),
        preview_body: preview.map(|p| p.body.as_str()),
        last_error: &job.last_error,
        finished_at_ms,
        trace_context: &job.trace_context,
        ttl,
    }
}

#[async_trait]
impl PushStore for ScyllaStore {
    async fn put_device(&self, device: &Device) -> Result<()> {
        let keys = device.web_push.as_ref();
        let values = (
            &device.user_id,
            &device.device_id,
            device.platform.code() as i32,
            &device.token,
            keys.map(|k| k.endpoint.as_str()),
            keys.map(|k| k.p256dh.as_str()),
            keys.map(|k| k.auth.as_str()),
            &device.app_id,
            &device.locale,
            device.previews,
            &device.secret,
            device.registration,
            device.updated_at_ms,
        );
        self.execute(&self.statements.put_device, values).await?;
        Ok(())
    }

    async fn device(&self, user_id: &str, device_id: &str) -> Result<Option<Device>> {
        let found: Vec<DeviceRow> = rows(self.execute(&self.statements.device, (user_id, device_id)).await?)?;
        found.into_iter().next().map(DeviceRow::into_device).transpose()
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>> {
        let found: Vec<DeviceRow> = rows(self.execute(&self.statements.devices, (user_id,)).await?)?;
        found.into_iter().map(DeviceRow::into_device).collect()
    }

    async fn remove_device(&self, user_id: &str, device_id: &str) -> Result<bool> {
        Ok(self.lwt(&self.statements.remove_device, (user_id, device_id)).await?.applied)
    }

    async fn remove_device_if(&self, user_id: &str, device_id: &str, registration: Uuid) -> Result<bool> {
        Ok(self.lwt(&self.statements.remove_device_if, (user_id, device_id, registration)).await?.applied)
    }

    async fn set_mute(&self, user_id: &str, conversation_id: Uuid, mute: Mute) -> Result<()> {
        if mute.until_ms <= 0 {
            self.execute(&self.statements.unmute, (conversation_id, user_id)).await?;
        } else {
            self.execute(&self.statements.mute, (conversation_id, user_id, mute.until_ms, mute.mentions_only)).await?;
        }
        Ok(())
    }

    async fn mutes(&self, user_ids: &[String], conversation_id: Uuid) -> Result<Vec<(String, Mute)>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The conversation's mutes are one partition; the users asked for are most of its members.
        let wanted: std::collections::HashSet<&str> = user_ids.iter().map(String::as_str).collect();
        let found: Vec<(String, Option<i64>, Option<bool>)> =
            rows(self.execute(&self.statements.mutes, (conversation_id,)).await?)?;
        Ok(found
            .into_iter()
            .filter(|(user, _, _)| wanted.contains(user.as_str()))
            .map(|(user, until, mentions)| {
                (user, Mute { until_ms: until.unwrap_or(0), mentions_only: mentions.unwrap_or(false) })
            })
            .collect())
    }

    async fn enqueue(&self, jobs: &[Job]) -> Result<usize> {
        let stored: Vec<Result<bool>> = stream::iter(jobs.to_vec())
            .map(|job| async move {
                let answer = self.lwt(&self.statements.insert_job, job_values(&job, 0, 0, 0)).await?;
                // Stored before, by a call this one retries: its index rows
                // are written again (they may be what that call did not get to).
                let (state, due) = if answer.applied {
                    (job.state.code(), job.due_at_ms)
                } else {
                    (answer.bigint("state").unwrap_or(-1), answer.bigint("due_at_ms").unwrap_or(job.due_at_ms))
                };
                if state == JobState::Queued.code() {
                    self.execute(&self.statements.insert_due, (shard(job.id), due, job.id)).await?;
                    if job.kind == JobKind::Notify {
                        let values = (
                            &job.user_id,
                            job.conversation_id,
                            job.seq as i64,
                            &job.device_id,
                            job.id,
                            ttl(self.retention.finished),
                        );
                        self.execute(&self.statements.index_conversation, values).await?;
                    }
                }
                Ok(answer.applied)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        Ok(stored.into_iter().collect::<Result<Vec<bool>>>()?.into_iter().filter(|new| *new).count())
    }

    async fn claim(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Job>> {
        let per_shard = limit.min(i32::MAX as usize) as i32;
        let shards: Vec<Result<Vec<(i64, Uuid)>>> = stream::iter(0..DUE_SHARDS)
            .map(|shard| async move { rows(self.execute(&self.statements.due, (shard, now_ms, per_shard)).await?) })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut candidates: Vec<(i64, Uuid)> = shards.into_iter().collect::<Result<Vec<_>>>()?.concat();
        candidates.sort();
        candidates.truncate(limit);
        let claimed: Vec<Result<Option<Job>>> = stream::iter(candidates)
            .map(|(due, id)| async move {
                let Some(stored) = self.stored(id).await? else {
                    self.forget_due(due, id).await?;
                    return Ok(None);
                };
                if stored.job.state != JobState::Queued || stored.job.due_at_ms != due {
                    // Finished or moved: the entry is stale.
                    self.forget_due(due, id).await?;
                    return Ok(None);
                }
                if stored.held_until_ms > now_ms {
                    return Ok(None);
                }
                let values = (now_ms + lease_ms, id, now_ms, due);
                Ok(self.lwt(&self.statements.hold, values).await?.applied.then_some(stored.job))
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut jobs: Vec<Job> = claimed.into_iter().collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
        jobs.sort_by_key(|job| (job.due_at_ms, job.id));
        Ok(jobs)
    }

    async fn job(&self, id: Uuid) -> Result<Option<Job>> {
        Ok(self.stored(id).await?.map(|stored| stored.job))
    }

    async fn finish(&self, id: Uuid, state: JobState, attempts: u32, error: &str) -> Result<bool> {
        match self.stored(id).await? {
            Some(stored) if stored.job.state == JobState::Queued => {
                self.settle(stored, JobState::Queued, state, attempts, error).await
            }
            _ => Ok(false),
        }
    }

    async fn reschedule(&self, id: Uuid, due_at_ms: i64, attempts: u32, error: &str) -> Result<()> {
        let Some(stored) = self.stored(id).await? else { return Ok(()) };
        if !self.lwt(&self.statements.reschedule, (due_at_ms, attempts as i32, error, id)).await?.applied {
            return Ok(());
        }
        // The new entry first: a crash between the two leaves a stale entry
        // (dropped by the next claim), never a queued job without one.
        self.execute(&self.statements.insert_due, (shard(id), due_at_ms, id)).await?;
        if stored.job.due_at_ms != due_at_ms {
            self.forget_due(stored.job.due_at_ms, id).await?;
        }
        Ok(())
    }

    async fn shown_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<Vec<Shown>> {
        let mut latest: BTreeMap<String, u64> = BTreeMap::new();
        for stored in self.notifications_through(user_id, conversation_id, read_seq).await? {
            if stored.job.state == JobState::Sent && stored.job.kind == JobKind::Notify {
                let seq = latest.entry(stored.job.device_id).or_default();
                *seq = (*seq).max(stored.job.seq);
            }
        }
        Ok(latest.into_iter().map(|(device_id, seq)| Shown { device_id, seq }).collect())
    }

    async fn read_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<usize> {
        let passed = self.notifications_through(user_id, conversation_id, read_seq).await?;
        let settled: Vec<Result<bool>> = stream::iter(passed)
            .map(|stored| async move {
                let (attempts, error) = (stored.job.attempts, stored.job.last_error.clone());
                match stored.job.state {
                    JobState::Queued => {
                        self.settle(stored, JobState::Queued, JobState::Cancelled, attempts, "read").await
                    }
                    JobState::Sent => {
                        self.settle(stored, JobState::Sent, JobState::Retracted, attempts, &error).await.map(|_| false)
                    }
                    _ => Ok(false),
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let cancelled = settled.into_iter().collect::<Result<Vec<bool>>>()?.into_iter().filter(|c| *c).count();
        let values = (user_id, conversation_id, read_seq as i64);
        self.execute(&self.statements.forget_conversation, values).await?;
        Ok(cancelled)
    }

    async fn add_unread(&self, entries: &[Unread]) -> Result<()> {
        let keep = ttl(self.retention.finished);
        stream::iter(entries.to_vec())
            .map(|entry| async move {
                let values = (&entry.user_id, entry.conversation_id, entry.seq as i64, entry.at_ms, keep);
                self.execute(&self.statements.insert_unread, values).await.map(drop)
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn clear_unread(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<()> {
        self.execute(&self.statements.clear_unread, (user_id, conversation_id, read_seq as i64)).await?;
        Ok(())
    }

    async fn unread(&self, user_id: &str, cap: u32) -> Result<u32> {
        let limit = cap.min(i32::MAX as u32) as i32;
        let found: Vec<(i64,)> = rows(self.execute(&self.statements.unread, (user_id, limit)).await?)?;
        Ok(found.len() as u32)
    }

    /// Nothing to do: finished rows carry their retention as a TTL.
    async fn purge(&self, _finished_before_ms: i64, _dead_before_ms: i64) -> Result<u64> {
        Ok(0)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<Job>> {
        let limit = limit.min(i32::MAX as usize) as i32;
        let ids: Vec<(Uuid,)> = rows(self.execute(&self.statements.dead, (limit,)).await?)?;
        let mut dead = Vec::new();
        for (id,) in ids {
            if let Some(stored) = self.stored(id).await?
                && stored.job.state == JobState::Dead
            {
                dead.push((stored.finished_at_ms, stored.job));
            }
        }
        dead.sort_by_key(|(finished, _)| std::cmp::Reverse(*finished));
        Ok(dead.into_iter().map(|(_, job)| job).collect())
    }

    async fn outbox(&self) -> Result<OutboxSize> {
        let mut queued = 0i64;
        for shard in 0..DUE_SHARDS {
            let counted: Vec<(i64,)> = rows(self.execute(&self.statements.count_due, (shard,)).await?)?;
            queued += counted.first().map_or(0, |(count,)| *count);
        }
        let dead: Vec<(i64,)> = rows(self.execute(&self.statements.count_dead, ()).await?)?;
        Ok(OutboxSize { queued: queued.max(0) as u64, dead: dead.first().map_or(0, |(count,)| (*count).max(0) as u64) })
    }
}

#[cfg(test)]
mod tests {
    use messenger_platform::cql::Cluster;

    use super::*;
    use crate::store::contract;

    /// A fresh keyspace on the suite's shared Cassandra node.
    async fn cluster() -> Cluster {
        let node = tokio::task::spawn_blocking(messenger_testkit::shared_cassandra).await.unwrap();
        Cluster {
            nodes: vec![node],
            keyspace: format!("push_test_{}", Uuid::now_v7().simple()),
            migrate_on_start: true,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            ..Cluster::default()
        }
    }

    const RETENTION: Retention = Retention { finished: Duration::from_secs(3600), dead: Duration::from_secs(7200) };

    async fn drop_keyspace(store: &ScyllaStore, keyspace: &str) {
        let mut drop = scylla::statement::unprepared::Statement::new(format!("DROP KEYSPACE {keyspace}"));
        drop.set_request_timeout(Some(Duration::from_secs(60)));
        store.session.query_unpaged(drop, ()).await.unwrap();
    }

    #[tokio::test]
    async fn passes_the_contract_and_finished_jobs_expire_on_a_cql_node() {
        let cluster = cluster().await;
        let store = ScyllaStore::connect(&cluster, RETENTION).await.unwrap();
        contract::run(&store).await;

        // Retention is a TTL on the whole row of a finished job.
        let job = contract::job(JobKind::Notify, "ttl-user", "phone", Uuid::now_v7(), 1, 1_000);
        store.enqueue(std::slice::from_ref(&job)).await.unwrap();
        store.finish(job.id, JobState::Dead, 8, "HTTP 500").await.unwrap();
        let statement = format!("SELECT TTL(state), TTL(user_id) FROM {}.push_jobs WHERE job_id = ?", cluster.keyspace);
        let ttls: Vec<(Option<i32>, Option<i32>)> =
            rows(store.session.query_unpaged(statement, (job.id,)).await.unwrap()).unwrap();
        let (state_ttl, user_ttl) = ttls[0];
        for remaining in [state_ttl, user_ttl] {
            assert!(
                remaining.is_some_and(|left| left > 7000 && left <= 7200),
                "{remaining:?}: the dead-letter retention"
            );
        }
        let again = migrate(&cluster).await.unwrap();
        assert_eq!((again.from, again.to, again.applied.len()), (1, 1, 0), "{again}");
        drop_keyspace(&store, &cluster.keyspace).await;
    }

    /// Two instances claim from one outbox: each due job goes to one of them.
    #[tokio::test]
    async fn two_instances_never_claim_one_job_twice() {
        let cluster = cluster().await;
        let (a, b) = (
            ScyllaStore::connect(&cluster, RETENTION).await.unwrap(),
            ScyllaStore::connect(&cluster, RETENTION).await.unwrap(),
        );
        let conversation = Uuid::now_v7();
        let jobs: Vec<Job> =
            (1..=40).map(|seq| contract::job(JobKind::Notify, "many", "phone", conversation, seq, 1_000)).collect();
        assert_eq!(a.enqueue(&jobs).await.unwrap(), 40);
        let (left, right) = tokio::join!(a.claim(2_000, 60_000, 30), b.claim(2_000, 60_000, 30));
        let (left, right) = (left.unwrap(), right.unwrap());
        let mut ids: Vec<Uuid> = left.iter().chain(&right).map(|job| job.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), left.len() + right.len(), "no job claimed by both");
        let rest = a.claim(2_000, 60_000, 100).await.unwrap();
        assert_eq!(ids.len() + rest.len(), 40, "every job claimed once");
        drop_keyspace(&a, &cluster.keyspace).await;
    }
}
