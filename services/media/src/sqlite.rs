//! The embedded `MediaStore`: one SQLite file, one connection behind a mutex
//! (uploads are few next to messages; every call is one short statement).

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use r2d2_sqlite::rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{MediaStore, Multipart, Processed, State, Upload},
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS uploads (
    media_id        BLOB PRIMARY KEY,
    owner           TEXT NOT NULL,
    conversation_id BLOB NOT NULL,
    mime            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    sha256          BLOB NOT NULL,
    file_name       TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    state           INTEGER NOT NULL,
    upload_id       TEXT,
    part_size       INTEGER NOT NULL DEFAULT 0,
    part_sha256     BLOB,
    stored_size     INTEGER NOT NULL DEFAULT 0,
    width           INTEGER NOT NULL DEFAULT 0,
    height          INTEGER NOT NULL DEFAULT 0,
    blurhash        TEXT NOT NULL DEFAULT '',
    has_thumbnail   INTEGER NOT NULL DEFAULT 0,
    attached_to     TEXT
);
CREATE INDEX IF NOT EXISTS uploads_by_owner ON uploads (owner, state);
CREATE INDEX IF NOT EXISTS uploads_pending ON uploads (state, created_at_ms);
";

const COLUMNS: &str = "media_id, owner, conversation_id, mime, size, sha256, file_name, created_at_ms, state, \
     upload_id, part_size, part_sha256, stored_size, width, height, blurhash, has_thumbnail";

#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

fn storage(error: impl std::fmt::Display) -> Error {
    Error::Storage(error.to_string())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(storage)?;
        }
        let connection = Connection::open(path).map_err(storage)?;
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
            .map_err(storage)?;
        connection.execute_batch(SCHEMA).map_err(storage)?;
        Ok(Self { connection: Arc::new(Mutex::new(connection)) })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> r2d2_sqlite::rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let connection = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&connection)
        })
        .await
        .map_err(storage)?
        .map_err(storage)
    }
}

fn sha(bytes: Vec<u8>) -> [u8; 32] {
    bytes.try_into().unwrap_or([0; 32])
}

fn row_to_upload(row: &Row<'_>) -> r2d2_sqlite::rusqlite::Result<Upload> {
    let id: Vec<u8> = row.get(0)?;
    let conversation: Vec<u8> = row.get(2)?;
    let upload_id: Option<String> = row.get(9)?;
    let parts: Option<Vec<u8>> = row.get(11)?;
    let multipart = upload_id.map(|upload_id| Multipart {
        upload_id,
        part_size: row.get::<_, i64>(10).unwrap_or(0) as u64,
        part_sha256: parts.unwrap_or_default().chunks_exact(32).map(|chunk| sha(chunk.to_vec())).collect(),
    });
    Ok(Upload {
        id: Uuid::from_slice(&id).unwrap_or_default(),
        owner: row.get(1)?,
        conversation_id: Uuid::from_slice(&conversation).unwrap_or_default(),
        mime: row.get(3)?,
        size: row.get::<_, i64>(4)? as u64,
        sha256: sha(row.get(5)?),
        file_name: row.get(6)?,
        created_at_ms: row.get(7)?,
        state: State::from_code(row.get(8)?).unwrap_or(State::Deleted),
        multipart,
        processed: Processed {
            stored_size: row.get::<_, i64>(12)? as u64,
            width: row.get::<_, i64>(13)? as u32,
            height: row.get::<_, i64>(14)? as u32,
            blurhash: row.get(15)?,
            has_thumbnail: row.get(16)?,
        },
    })
}

#[async_trait]
impl MediaStore for SqliteStore {
    async fn create(&self, upload: &Upload) -> Result<()> {
        let upload = upload.clone();
        self.with(move |connection| {
            let (upload_id, part_size, parts) = match &upload.multipart {
                Some(multipart) => {
                    (Some(multipart.upload_id.clone()), multipart.part_size as i64, Some(multipart.part_sha256.concat()))
                }
                None => (None, 0, None),
            };
            connection.execute(
                &format!("INSERT INTO uploads ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 0, 0, 0, '', 0)"),
                params![
                    upload.id.as_bytes().as_slice(),
                    upload.owner,
                    upload.conversation_id.as_bytes().as_slice(),
                    upload.mime,
                    upload.size as i64,
                    upload.sha256.as_slice(),
                    upload.file_name,
                    upload.created_at_ms,
                    upload.state.code(),
                    upload_id,
                    part_size,
                    parts,
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: Uuid) -> Result<Option<Upload>> {
        self.with(move |connection| {
            connection
                .query_row(
                    &format!("SELECT {COLUMNS} FROM uploads WHERE media_id = ?1"),
                    [id.as_bytes().as_slice()],
                    row_to_upload,
                )
                .optional()
        })
        .await
    }

    async fn mark_ready(&self, id: Uuid, processed: &Processed) -> Result<bool> {
        let processed = processed.clone();
        self.with(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = ?2, stored_size = ?3, width = ?4, height = ?5, blurhash = ?6, has_thumbnail = ?7
                 WHERE media_id = ?1 AND state = ?8",
                params![
                    id.as_bytes().as_slice(),
                    State::Ready.code(),
                    processed.stored_size as i64,
                    processed.width,
                    processed.height,
                    processed.blurhash,
                    processed.has_thumbnail,
                    State::Pending.code(),
                ],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn mark_deleted(&self, id: Uuid) -> Result<bool> {
        self.with(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = ?2 WHERE media_id = ?1 AND state != ?2",
                params![id.as_bytes().as_slice(), State::Deleted.code()],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn attach(&self, id: Uuid, client_msg_id: &str) -> Result<bool> {
        let key = client_msg_id.to_owned();
        self.with(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET attached_to = ?2
                 WHERE media_id = ?1 AND state = ?3 AND (attached_to IS NULL OR attached_to = ?2)",
                params![id.as_bytes().as_slice(), key, State::Ready.code()],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn abandon(&self, id: Uuid) -> Result<bool> {
        self.with(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = ?2 WHERE media_id = ?1 AND state = ?3",
                params![id.as_bytes().as_slice(), State::Deleted.code(), State::Pending.code()],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    async fn used_bytes(&self, owner: &str) -> Result<u64> {
        let owner = owner.to_owned();
        self.with(move |connection| {
            connection.query_row(
                "SELECT COALESCE(SUM(CASE state WHEN ?2 THEN stored_size ELSE size END), 0) FROM uploads
                 WHERE owner = ?1 AND state IN (?2, ?3)",
                params![owner, State::Ready.code(), State::Pending.code()],
                |row| row.get::<_, i64>(0).map(|sum| sum as u64),
            )
        })
        .await
    }

    async fn pending_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Upload>> {
        self.with(move |connection| {
            let mut statement = connection.prepare(&format!(
                "SELECT {COLUMNS} FROM uploads WHERE state = ?1 AND created_at_ms < ?2 ORDER BY created_at_ms LIMIT ?3"
            ))?;
            let rows = statement.query_map(params![State::Pending.code(), cutoff_ms, limit as i64], row_to_upload)?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("media.db")).unwrap();
        crate::store::contract::run(&store).await;
    }
}
