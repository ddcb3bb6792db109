//! The embedded `PushStore`: one SQLite file, one connection behind a mutex
//! (every call is a few short statements), for one notify instance.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use r2d2_sqlite::rusqlite::{self, Connection, OptionalExtension, Row, params, params_from_iter};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Device, Job, JobKind, JobState, Mute, OutboxSize, Platform, Preview, PushStore, Shown, Unread, WebPushKeys,
    },
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS push_devices (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    platform        INTEGER NOT NULL,
    token           TEXT NOT NULL,
    endpoint        TEXT,
    p256dh          TEXT,
    auth            TEXT,
    app_id          TEXT NOT NULL,
    locale          TEXT NOT NULL,
    previews        INTEGER NOT NULL,
    secret          TEXT NOT NULL,
    registration    BLOB NOT NULL,
    updated_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS mutes (
    user_id         TEXT NOT NULL,
    conversation_id BLOB NOT NULL,
    until_ms        INTEGER NOT NULL,
    mentions_only   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, conversation_id)
);
CREATE TABLE IF NOT EXISTS push_jobs (
    job_id          BLOB PRIMARY KEY,
    kind            INTEGER NOT NULL,
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    conversation_id BLOB NOT NULL,
    seq             INTEGER NOT NULL,
    state           INTEGER NOT NULL,
    due_at_ms       INTEGER NOT NULL,
    held_until_ms   INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at_ms   INTEGER NOT NULL,
    preview_sender  TEXT,
    preview_title   TEXT,
    preview_body    TEXT,
    last_error      TEXT NOT NULL DEFAULT '',
    trace_context   TEXT NOT NULL DEFAULT '',
    finished_at_ms  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS unread (
    user_id         TEXT NOT NULL,
    conversation_id BLOB NOT NULL,
    seq             INTEGER NOT NULL,
    at_ms           INTEGER NOT NULL,
    PRIMARY KEY (user_id, conversation_id, seq)
);
CREATE INDEX IF NOT EXISTS unread_by_age ON unread (at_ms);
CREATE INDEX IF NOT EXISTS push_jobs_due ON push_jobs (state, due_at_ms);
CREATE INDEX IF NOT EXISTS push_jobs_finished ON push_jobs (state, finished_at_ms);
CREATE INDEX IF NOT EXISTS push_jobs_by_conversation ON push_jobs (user_id, conversation_id, state, seq);
";

const DEVICE_COLUMNS: &str = "user_id, device_id, platform, token, endpoint, p256dh, auth, app_id, locale, previews, \
     secret, registration, updated_at_ms";
const JOB_COLUMNS: &str = "job_id, kind, user_id, device_id, conversation_id, seq, state, due_at_ms, attempts, \
     created_at_ms, preview_sender, preview_title, preview_body, last_error, trace_context";

#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

fn storage(error: impl std::fmt::Display) -> Error {
    Error::Storage(error.to_string())
}

fn now_ms() -> i64 {
    messenger_platform::ids::now_ms()
}

fn uuid(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let bytes: Vec<u8> = row.get(index)?;
    Uuid::from_slice(&bytes)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Blob, Box::new(error)))
}

fn invalid(index: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Integer, format!("unknown {what}").into())
}

fn device_row(row: &Row<'_>) -> rusqlite::Result<Device> {
    let platform = Platform::from_code(row.get(2)?).ok_or_else(|| invalid(2, "platform"))?;
    let endpoint: Option<String> = row.get(4)?;
    let web_push = match endpoint {
        Some(endpoint) => Some(WebPushKeys { endpoint, p256dh: row.get(5)?, auth: row.get(6)? }),
        None => None,
    };
    Ok(Device {
        user_id: row.get(0)?,
        device_id: row.get(1)?,
        platform,
        token: row.get(3)?,
        web_push,
        app_id: row.get(7)?,
        locale: row.get(8)?,
        previews: row.get(9)?,
        secret: row.get(10)?,
        registration: uuid(row, 11)?,
        updated_at_ms: row.get(12)?,
    })
}

fn job_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let sender: Option<String> = row.get(10)?;
    let preview = match sender {
        Some(sender_id) => Some(Preview { sender_id, title: row.get(11)?, body: row.get(12)? }),
        None => None,
    };
    Ok(Job {
        id: uuid(row, 0)?,
        kind: JobKind::from_code(row.get(1)?).ok_or_else(|| invalid(1, "job kind"))?,
        user_id: row.get(2)?,
        device_id: row.get(3)?,
        conversation_id: uuid(row, 4)?,
        seq: row.get::<_, i64>(5)? as u64,
        state: JobState::from_code(row.get(6)?).ok_or_else(|| invalid(6, "job state"))?,
        due_at_ms: row.get(7)?,
        attempts: row.get::<_, i64>(8)? as u32,
        created_at_ms: row.get(9)?,
        preview,
        last_error: row.get(13)?,
        trace_context: row.get(14)?,
    })
}

impl SqliteStore {
    /// Opens (creating) the file. Holds on jobs claimed by an earlier run of
    /// this process are released: one notify instance owns the file, so
    /// whatever it held when it died is due again now.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(storage)?;
        }
        let connection = Connection::open(path).map_err(storage)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
            .map_err(storage)?;
        connection.execute_batch(SCHEMA).map_err(storage)?;
        connection
            .execute(
                "UPDATE push_jobs SET held_until_ms = 0 WHERE state = ?1 AND held_until_ms > 0",
                [JobState::Queued.code()],
            )
            .map_err(storage)?;
        Ok(Self { connection: Arc::new(Mutex::new(connection)) })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut connection)
        })
        .await
        .map_err(storage)?
        .map_err(storage)
    }
}

#[async_trait]
impl PushStore for SqliteStore {
    async fn put_device(&self, device: &Device) -> Result<()> {
        let device = device.clone();
        self.with(move |c| {
            let keys = device.web_push.as_ref();
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO push_devices ({DEVICE_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    device.user_id,
                    device.device_id,
                    device.platform.code(),
                    device.token,
                    keys.map(|k| k.endpoint.as_str()),
                    keys.map(|k| k.p256dh.as_str()),
                    keys.map(|k| k.auth.as_str()),
                    device.app_id,
                    device.locale,
                    device.previews,
                    device.secret,
                    device.registration.as_bytes().to_vec(),
                    device.updated_at_ms,
                ],
            )
            .map(drop)
        })
        .await
    }

    async fn device(&self, user_id: &str, device_id: &str) -> Result<Option<Device>> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM push_devices WHERE user_id = ?1 AND device_id = ?2"),
                params![user_id, device_id],
                device_row,
            )
            .optional()
        })
        .await
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM push_devices WHERE user_id = ?1 ORDER BY device_id"
            ))?;
            statement.query_map([user_id], device_row)?.collect()
        })
        .await
    }

    async fn remove_device(&self, user_id: &str, device_id: &str) -> Result<bool> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        self.with(move |c| {
            c.execute("DELETE FROM push_devices WHERE user_id = ?1 AND device_id = ?2", params![user_id, device_id])
                .map(|n| n > 0)
        })
        .await
    }

    async fn remove_device_if(&self, user_id: &str, device_id: &str, registration: Uuid) -> Result<bool> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        self.with(move |c| {
            c.execute(
                "DELETE FROM push_devices WHERE user_id = ?1 AND device_id = ?2 AND registration = ?3",
                params![user_id, device_id, registration.as_bytes().to_vec()],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn set_mute(&self, user_id: &str, conversation_id: Uuid, mute: Mute) -> Result<()> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            let conversation = conversation_id.as_bytes().to_vec();
            if mute.until_ms <= 0 {
                c.execute(
                    "DELETE FROM mutes WHERE user_id = ?1 AND conversation_id = ?2",
                    params![user_id, conversation],
                )
            } else {
                c.execute(
                    "INSERT OR REPLACE INTO mutes (user_id, conversation_id, until_ms, mentions_only) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![user_id, conversation, mute.until_ms, mute.mentions_only],
                )
            }
            .map(drop)
        })
        .await
    }

    async fn mutes(&self, user_ids: &[String], conversation_id: Uuid) -> Result<Vec<(String, Mute)>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let user_ids = user_ids.to_vec();
        self.with(move |c| {
            let mut found = Vec::new();
            // SQLite's bound-parameter limit: ask in parts.
            for part in user_ids.chunks(500) {
                let marks = vec!["?"; part.len()].join(", ");
                let mut statement = c.prepare(&format!(
                    "SELECT user_id, until_ms, mentions_only FROM mutes WHERE conversation_id = ? \
                     AND user_id IN ({marks})"
                ))?;
                let mut values: Vec<rusqlite::types::Value> = vec![conversation_id.as_bytes().to_vec().into()];
                values.extend(part.iter().map(|user| user.clone().into()));
                let rows = statement.query_map(params_from_iter(values), |row| {
                    Ok((row.get(0)?, Mute { until_ms: row.get(1)?, mentions_only: row.get(2)? }))
                })?;
                for row in rows {
                    found.push(row?);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn enqueue(&self, jobs: &[Job]) -> Result<usize> {
        let jobs = jobs.to_vec();
        self.with(move |c| {
            let transaction = c.transaction()?;
            let mut stored = 0;
            {
                let mut statement = transaction.prepare_cached(&format!(
                    "INSERT OR IGNORE INTO push_jobs ({JOB_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
                ))?;
                for job in &jobs {
                    let preview = job.preview.as_ref();
                    stored += statement.execute(params![
                        job.id.as_bytes().to_vec(),
                        job.kind.code(),
                        job.user_id,
                        job.device_id,
                        job.conversation_id.as_bytes().to_vec(),
                        job.seq as i64,
                        job.state.code(),
                        job.due_at_ms,
                        job.attempts,
                        job.created_at_ms,
                        preview.map(|p| p.sender_id.as_str()),
                        preview.map(|p| p.title.as_str()),
                        preview.map(|p| p.body.as_str()),
                        job.last_error,
                        job.trace_context,
                    ])?;
                }
            }
            transaction.commit()?;
            Ok(stored)
        })
        .await
    }

    async fn claim(&self, now_ms: i64, lease_ms: i64, limit: usize) -> Result<Vec<Job>> {
        self.with(move |c| {
            let transaction = c.transaction()?;
            let jobs: Vec<Job> = {
                let mut statement = transaction.prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM push_jobs WHERE state = ?1 AND due_at_ms <= ?2 AND held_until_ms <= ?2 \
                     ORDER BY due_at_ms LIMIT ?3"
                ))?;
                statement
                    .query_map(params![JobState::Queued.code(), now_ms, limit as i64], job_row)?
                    .collect::<rusqlite::Result<_>>()?
            };
            {
                let mut hold =
                    transaction.prepare_cached("UPDATE push_jobs SET held_until_ms = ?1 WHERE job_id = ?2")?;
                for job in &jobs {
                    hold.execute(params![now_ms + lease_ms, job.id.as_bytes().to_vec()])?;
                }
            }
            transaction.commit()?;
            Ok(jobs)
        })
        .await
    }

    async fn job(&self, id: Uuid) -> Result<Option<Job>> {
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {JOB_COLUMNS} FROM push_jobs WHERE job_id = ?1"),
                [id.as_bytes().to_vec()],
                job_row,
            )
            .optional()
        })
        .await
    }

    async fn finish(&self, id: Uuid, state: JobState, attempts: u32, error: &str) -> Result<bool> {
        let error = error.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE push_jobs SET state = ?1, attempts = ?2, last_error = ?3, held_until_ms = 0, \
                 finished_at_ms = ?4 WHERE job_id = ?5 AND state = ?6",
                params![state.code(), attempts, error, now_ms(), id.as_bytes().to_vec(), JobState::Queued.code()],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn reschedule(&self, id: Uuid, due_at_ms: i64, attempts: u32, error: &str) -> Result<()> {
        let error = error.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE push_jobs SET due_at_ms = ?1, attempts = ?2, last_error = ?3, held_until_ms = 0 \
                 WHERE job_id = ?4 AND state = ?5",
                params![due_at_ms, attempts, error, id.as_bytes().to_vec(), JobState::Queued.code()],
            )
            .map(drop)
        })
        .await
    }

    async fn shown_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<Vec<Shown>> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            let mut statement = c.prepare_cached(
                "SELECT device_id, MAX(seq) FROM push_jobs WHERE user_id = ?1 AND conversation_id = ?2 \
                 AND state = ?3 AND kind = ?4 AND seq <= ?5 GROUP BY device_id ORDER BY device_id",
            )?;
            statement
                .query_map(
                    params![
                        user_id,
                        conversation_id.as_bytes().to_vec(),
                        JobState::Sent.code(),
                        JobKind::Notify.code(),
                        read_seq as i64
                    ],
                    |row| Ok(Shown { device_id: row.get(0)?, seq: row.get::<_, i64>(1)? as u64 }),
                )?
                .collect()
        })
        .await
    }

    async fn read_through(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<usize> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            let transaction = c.transaction()?;
            let conversation = conversation_id.as_bytes().to_vec();
            let notify = JobKind::Notify.code();
            let cancelled = transaction.execute(
                "UPDATE push_jobs SET state = ?1, last_error = 'read', finished_at_ms = ?2 WHERE user_id = ?3 \
                 AND conversation_id = ?4 AND state = ?5 AND kind = ?6 AND seq <= ?7",
                params![
                    JobState::Cancelled.code(),
                    now_ms(),
                    user_id,
                    conversation,
                    JobState::Queued.code(),
                    notify,
                    read_seq as i64
                ],
            )?;
            transaction.execute(
                "UPDATE push_jobs SET state = ?1 WHERE user_id = ?2 AND conversation_id = ?3 AND state = ?4 \
                 AND kind = ?5 AND seq <= ?6",
                params![
                    JobState::Retracted.code(),
                    user_id,
                    conversation,
                    JobState::Sent.code(),
                    notify,
                    read_seq as i64
                ],
            )?;
            transaction.commit()?;
            Ok(cancelled)
        })
        .await
    }

    async fn add_unread(&self, entries: &[Unread]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let entries = entries.to_vec();
        self.with(move |c| {
            let transaction = c.transaction()?;
            {
                let mut statement = transaction.prepare_cached(
                    "INSERT OR IGNORE INTO unread (user_id, conversation_id, seq, at_ms) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for entry in &entries {
                    statement.execute(params![
                        entry.user_id,
                        entry.conversation_id.as_bytes().to_vec(),
                        entry.seq as i64,
                        entry.at_ms
                    ])?;
                }
            }
            transaction.commit()
        })
        .await
    }

    async fn clear_unread(&self, user_id: &str, conversation_id: Uuid, read_seq: u64) -> Result<()> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM unread WHERE user_id = ?1 AND conversation_id = ?2 AND seq <= ?3",
                params![user_id, conversation_id.as_bytes().to_vec(), read_seq as i64],
            )
            .map(drop)
        })
        .await
    }

    async fn unread(&self, user_id: &str, cap: u32) -> Result<u32> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM (SELECT 1 FROM unread WHERE user_id = ?1 LIMIT ?2)",
                params![user_id, cap],
                |row| row.get::<_, u32>(0),
            )
        })
        .await
    }

    async fn purge(&self, finished_before_ms: i64, dead_before_ms: i64) -> Result<u64> {
        self.with(move |c| {
            let transaction = c.transaction()?;
            let mut removed = 0;
            for state in [JobState::Sent, JobState::Cancelled, JobState::Retracted] {
                removed += transaction.execute(
                    "DELETE FROM push_jobs WHERE state = ?1 AND finished_at_ms < ?2",
                    params![state.code(), finished_before_ms],
                )?;
            }
            removed += transaction.execute(
                "DELETE FROM push_jobs WHERE state = ?1 AND finished_at_ms < ?2",
                params![JobState::Dead.code(), dead_before_ms],
            )?;
            removed += transaction.execute("DELETE FROM unread WHERE at_ms < ?1", [finished_before_ms])?;
            transaction.commit()?;
            Ok(removed as u64)
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<Job>> {
        self.with(move |c| {
            let mut statement = c.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM push_jobs WHERE state = ?1 ORDER BY finished_at_ms DESC LIMIT ?2"
            ))?;
            statement.query_map(params![JobState::Dead.code(), limit as i64], job_row)?.collect()
        })
        .await
    }

    async fn outbox(&self) -> Result<OutboxSize> {
        self.with(move |c| {
            let count = |state: JobState| {
                c.query_row("SELECT COUNT(*) FROM push_jobs WHERE state = ?1", [state.code()], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|n| n as u64)
            };
            Ok(OutboxSize { queued: count(JobState::Queued)?, dead: count(JobState::Dead)? })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(&dir.path().join("notify.db")).unwrap();
        crate::store::contract::run(&store).await;
        crate::store::contract::purge(&store).await;
    }

    #[tokio::test]
    async fn a_reopened_file_releases_what_the_dead_process_held() {
        use crate::store::{JobKind, PushStore};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.db");
        let store = super::SqliteStore::open(&path).unwrap();
        let job = crate::store::contract::job(JobKind::Notify, "u", "d", uuid::Uuid::now_v7(), 1, 100);
        store.enqueue(std::slice::from_ref(&job)).await.unwrap();
        assert_eq!(store.claim(200, 60_000, 10).await.unwrap().len(), 1);
        assert!(store.claim(300, 60_000, 10).await.unwrap().is_empty(), "held");
        drop(store);
        let reopened = super::SqliteStore::open(&path).unwrap();
        let claimed = reopened.claim(300, 60_000, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job.id], "due again after a restart");
    }
}
