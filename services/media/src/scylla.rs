//! The `MediaStore` on the ScyllaDB cluster the message store uses (the
//! keyspace `[scylla]` names), for several media instances.
//!
//! Tables (`media_` prefixed, beside the message tables):
//! - `media_owners`: media id -> owner, written once by an LWT (`IF NOT
//!   EXISTS`: a media id is created once).
//! - `media_uploads`: the records, partitioned by owner, so the quota
//!   (`used_bytes`) reads one partition and state changes are LWTs on the
//!   very rows it sums: never a second copy to drift.
//! - `media_pending`: pending uploads by creation day and a shard of the
//!   media id, for the sweep. An entry goes when its upload leaves pending;
//!   the sweep checks each entry against its record and drops stale ones, so
//!   a writer that stopped between the two leaves nothing wrong behind.
//!   Entries expire after [`PENDING_LOOKBACK_DAYS`] + 1 days: an upload left
//!   pending longer while no sweep ran is for the bucket's lifecycle rule on
//!   the pending prefix (README).
//!
//! Costs: a ticket is one LWT and two writes; complete, attach, abandon and
//! delete one LWT after two key reads; the quota one partition scan (a
//! user's uploads); a sweep pass `(PENDING_LOOKBACK_DAYS + 1) x
//! PENDING_SHARDS` bounded range reads. LWT answers are read only when they
//! did not apply (Cassandra returns `[applied]` alone otherwise).

use async_trait::async_trait;
use futures::TryStreamExt;
use messenger_platform::cql::{self, Lwt};
use scylla::{
    DeserializeRow,
    client::session::Session,
    statement::{Consistency, prepared::PreparedStatement},
};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{MediaStore, Multipart, Processed, State, Upload},
};

/// The media tables' row in `schema_version`.
const COMPONENT: i32 = 1;

/// Days before the sweep's cutoff it looks for pending uploads.
pub const PENDING_LOOKBACK_DAYS: i64 = 7;
/// Partitions per day of `media_pending` (spreads the ticket writes).
const PENDING_SHARDS: i32 = 8;
const DAY_MS: i64 = 86_400_000;

const COLUMNS: &str = "media_id, owner, conversation_id, mime, size, sha256, file_name, created_at_ms, state, \
     upload_id, part_size, part_sha256, stored_size, width, height, blurhash, has_thumbnail";

/// Every schema version's statements, oldest first (the runner is
/// `messenger_platform::cql::migrate`).
pub fn versions(keyspace: &str) -> Vec<Vec<String>> {
    vec![vec![
        format!("CREATE TABLE IF NOT EXISTS {keyspace}.media_owners (media_id uuid PRIMARY KEY, owner text)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.media_uploads (owner text, media_id uuid, conversation_id uuid, \
             mime text, size bigint, sha256 blob, file_name text, created_at_ms bigint, state int, upload_id text, \
             part_size bigint, part_sha256 blob, stored_size bigint, width int, height int, blurhash text, \
             has_thumbnail boolean, attached_to text, PRIMARY KEY (owner, media_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.media_pending (day bigint, shard int, created_at_ms bigint, \
             media_id uuid, PRIMARY KEY ((day, shard), created_at_ms, media_id))"
        ),
    ]]
}

async fn run_migrations(session: &Session, cluster: &cql::Cluster) -> Result<cql::MigrationReport> {
    let schema = cql::Schema {
        component: COMPONENT,
        name: "media",
        keyspace: cluster.keyspace.clone(),
        replication: cluster.replication(),
        versions: versions(&cluster.keyspace),
    };
    Ok(cql::migrate(session, &schema).await?)
}

/// Brings the media tables of `cluster`'s keyspace to the newest version,
/// creating the keyspace if missing (`messenger migrate`); safe to run from
/// several processes at once.
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

#[derive(DeserializeRow)]
struct UploadRow {
    media_id: Uuid,
    owner: String,
    conversation_id: Option<Uuid>,
    mime: Option<String>,
    size: Option<i64>,
    sha256: Option<Vec<u8>>,
    file_name: Option<String>,
    created_at_ms: Option<i64>,
    state: Option<i32>,
    upload_id: Option<String>,
    part_size: Option<i64>,
    part_sha256: Option<Vec<u8>>,
    stored_size: Option<i64>,
    width: Option<i32>,
    height: Option<i32>,
    blurhash: Option<String>,
    has_thumbnail: Option<bool>,
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    bytes.try_into().unwrap_or([0; 32])
}

impl UploadRow {
    fn into_upload(self) -> Upload {
        let multipart = self.upload_id.map(|upload_id| Multipart {
            upload_id,
            part_size: self.part_size.unwrap_or(0) as u64,
            part_sha256: self.part_sha256.unwrap_or_default().chunks_exact(32).map(sha).collect(),
        });
        Upload {
            id: self.media_id,
            owner: self.owner,
            conversation_id: self.conversation_id.unwrap_or_default(),
            mime: self.mime.unwrap_or_default(),
            size: self.size.unwrap_or(0) as u64,
            sha256: sha(&self.sha256.unwrap_or_default()),
            file_name: self.file_name.unwrap_or_default(),
            created_at_ms: self.created_at_ms.unwrap_or(0),
            state: State::from_code(i64::from(self.state.unwrap_or(2))).unwrap_or(State::Deleted),
            multipart,
            processed: Processed {
                stored_size: self.stored_size.unwrap_or(0) as u64,
                width: self.width.unwrap_or(0) as u32,
                height: self.height.unwrap_or(0) as u32,
                blurhash: self.blurhash.unwrap_or_default(),
                has_thumbnail: self.has_thumbnail.unwrap_or(false),
            },
        }
    }
}

/// Where the `media_pending` entry of the upload `id` made at `created_at_ms` lives.
fn pending_key(created_at_ms: i64, id: Uuid) -> (i64, i32) {
    (created_at_ms.div_euclid(DAY_MS), (id.as_u128() % PENDING_SHARDS as u128) as i32)
}

struct Statements {
    claim_id: PreparedStatement,
    insert_upload: PreparedStatement,
    insert_pending: PreparedStatement,
    delete_pending: PreparedStatement,
    owner_of: PreparedStatement,
    get: PreparedStatement,
    /// At SERIAL: what an LWT that did not apply met.
    attach_state: PreparedStatement,
    mark_ready: PreparedStatement,
    mark_deleted: PreparedStatement,
    attach: PreparedStatement,
    abandon: PreparedStatement,
    sizes: PreparedStatement,
    pending: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, keyspace: &str, serial: Consistency) -> Result<Self> {
        let prepare = |text: String| async move { session.prepare(text).await.map_err(cql::prepare_error) };
        let k = keyspace;
        let mut attach_state =
            prepare(format!("SELECT state, attached_to FROM {k}.media_uploads WHERE owner = ? AND media_id = ?"))
                .await?;
        attach_state.set_consistency(serial);
        Ok(Self {
            claim_id: prepare(format!("INSERT INTO {k}.media_owners (media_id, owner) VALUES (?, ?) IF NOT EXISTS"))
                .await?,
            insert_upload: prepare(format!(
                "INSERT INTO {k}.media_uploads (media_id, owner, conversation_id, mime, size, sha256, file_name, \
                 created_at_ms, state, upload_id, part_size, part_sha256, stored_size, width, height, blurhash, \
                 has_thumbnail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, '', false)"
            ))
            .await?,
            insert_pending: prepare(format!(
                "INSERT INTO {k}.media_pending (day, shard, created_at_ms, media_id) VALUES (?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            delete_pending: prepare(format!(
                "DELETE FROM {k}.media_pending WHERE day = ? AND shard = ? AND created_at_ms = ? AND media_id = ?"
            ))
            .await?,
            owner_of: prepare(format!("SELECT owner FROM {k}.media_owners WHERE media_id = ?")).await?,
            get: prepare(format!("SELECT {COLUMNS} FROM {k}.media_uploads WHERE owner = ? AND media_id = ?")).await?,
            attach_state,
            mark_ready: prepare(format!(
                "UPDATE {k}.media_uploads SET state = 1, stored_size = ?, width = ?, height = ?, blurhash = ?, \
                 has_thumbnail = ? WHERE owner = ? AND media_id = ? IF state = 0"
            ))
            .await?,
            mark_deleted: prepare(format!(
                "UPDATE {k}.media_uploads SET state = 2 WHERE owner = ? AND media_id = ? IF state IN (0, 1)"
            ))
            .await?,
            attach: prepare(format!(
                "UPDATE {k}.media_uploads SET attached_to = ? WHERE owner = ? AND media_id = ? \
                 IF state = 1 AND attached_to = null"
            ))
            .await?,
            abandon: prepare(format!(
                "UPDATE {k}.media_uploads SET state = 2 WHERE owner = ? AND media_id = ? IF state = 0"
            ))
            .await?,
            sizes: prepare(format!("SELECT state, stored_size, size FROM {k}.media_uploads WHERE owner = ?")).await?,
            pending: prepare(format!(
                "SELECT created_at_ms, media_id FROM {k}.media_pending WHERE day = ? AND shard = ? \
                 AND created_at_ms < ? LIMIT ?"
            ))
            .await?,
        })
    }
}

pub struct ScyllaStore {
    session: Session,
    statements: Statements,
}

fn rows<R>(result: scylla::response::query_result::QueryResult) -> Result<Vec<R>>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    Ok(cql::rows(result)?)
}

impl ScyllaStore {
    /// Connects, migrates when `migrate_on_start`, and prepares every statement.
    pub async fn connect(cluster: &cql::Cluster) -> Result<Self> {
        let session = cql::connect(cluster).await?;
        if cluster.migrate_on_start {
            let report = run_migrations(&session, cluster).await?;
            tracing::info!(%report, "scylla schema");
        }
        let statements = Statements::prepare(&session, &cluster.keyspace, cluster.serial_consistency.read()).await?;
        Ok(Self { session, statements })
    }

    async fn execute(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<scylla::response::query_result::QueryResult> {
        Ok(self.session.execute_unpaged(statement, values).await.map_err(cql::execution_error)?)
    }

    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<bool> {
        Ok(Lwt::from_result(self.execute(statement, values).await?)?.applied)
    }

    async fn owner(&self, id: Uuid) -> Result<Option<String>> {
        let found: Vec<(Option<String>,)> = rows(self.execute(&self.statements.owner_of, (id,)).await?)?;
        Ok(found.into_iter().next().and_then(|(owner,)| owner))
    }

    /// The pending entry goes with the upload's leaving pending; a failure
    /// here leaves a stale entry the sweep drops.
    async fn forget_pending(&self, created_at_ms: i64, id: Uuid) {
        let (day, shard) = pending_key(created_at_ms, id);
        if let Err(error) = self.execute(&self.statements.delete_pending, (day, shard, created_at_ms, id)).await {
            tracing::warn!(media_id = %id, %error, "pending entry not removed; the sweep drops it");
        }
    }
}

#[async_trait]
impl MediaStore for ScyllaStore {
    async fn create(&self, upload: &Upload) -> Result<()> {
        if !self.lwt(&self.statements.claim_id, (upload.id, &upload.owner)).await? {
            return Err(Error::Storage(format!("media id {} is already recorded", upload.id)));
        }
        let (day, shard) = pending_key(upload.created_at_ms, upload.id);
        let ttl = ((PENDING_LOOKBACK_DAYS + 1) * DAY_MS / 1000) as i32;
        self.execute(&self.statements.insert_pending, (day, shard, upload.created_at_ms, upload.id, ttl)).await?;
        let (upload_id, part_size, parts) = match &upload.multipart {
            Some(multipart) => {
                (Some(multipart.upload_id.as_str()), multipart.part_size as i64, Some(multipart.part_sha256.concat()))
            }
            None => (None, 0, None),
        };
        let values = (
            upload.id,
            &upload.owner,
            upload.conversation_id,
            &upload.mime,
            upload.size as i64,
            upload.sha256.as_slice(),
            &upload.file_name,
            upload.created_at_ms,
            upload.state.code() as i32,
            upload_id,
            part_size,
            parts,
        );
        self.execute(&self.statements.insert_upload, values).await?;
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<Upload>> {
        let Some(owner) = self.owner(id).await? else { return Ok(None) };
        let found: Vec<UploadRow> = rows(self.execute(&self.statements.get, (&owner, id)).await?)?;
        Ok(found.into_iter().next().map(UploadRow::into_upload))
    }

    async fn mark_ready(&self, id: Uuid, processed: &Processed) -> Result<bool> {
        let Some(upload) = self.get(id).await? else { return Ok(false) };
        let values = (
            processed.stored_size as i64,
            processed.width as i32,
            processed.height as i32,
            &processed.blurhash,
            processed.has_thumbnail,
            &upload.owner,
            id,
        );
        let applied = self.lwt(&self.statements.mark_ready, values).await?;
        if applied {
            self.forget_pending(upload.created_at_ms, id).await;
        }
        Ok(applied)
    }

    async fn mark_deleted(&self, id: Uuid) -> Result<bool> {
        let Some(upload) = self.get(id).await? else { return Ok(false) };
        let applied = self.lwt(&self.statements.mark_deleted, (&upload.owner, id)).await?;
        if applied {
            self.forget_pending(upload.created_at_ms, id).await;
        }
        Ok(applied)
    }

    async fn attach(&self, id: Uuid, client_msg_id: &str) -> Result<bool> {
        let Some(owner) = self.owner(id).await? else { return Ok(false) };
        if self.lwt(&self.statements.attach, (client_msg_id, &owner, id)).await? {
            return Ok(true);
        }
        // Not applied: already tied (to this message: a retried send), or not ready.
        let found: Vec<(Option<i32>, Option<String>)> =
            rows(self.execute(&self.statements.attach_state, (&owner, id)).await?)?;
        Ok(found.into_iter().next().is_some_and(|(state, attached)| {
            state == Some(State::Ready.code() as i32) && attached.as_deref() == Some(client_msg_id)
        }))
    }

    async fn abandon(&self, id: Uuid) -> Result<bool> {
        let Some(upload) = self.get(id).await? else { return Ok(false) };
        let applied = self.lwt(&self.statements.abandon, (&upload.owner, id)).await?;
        if applied {
            self.forget_pending(upload.created_at_ms, id).await;
        }
        Ok(applied)
    }

    async fn used_bytes(&self, owner: &str) -> Result<u64> {
        let pager =
            self.session.execute_iter(self.statements.sizes.clone(), (owner,)).await.map_err(cql::pager_error)?;
        let mut stream =
            pager.rows_stream::<(Option<i32>, Option<i64>, Option<i64>)>().map_err(|e| cql::other("sizes", e))?;
        let mut total = 0u64;
        while let Some((state, stored, declared)) =
            stream.try_next().await.map_err(|e| Error::Unavailable(format!("scylla: {e}")))?
        {
            let counted = match state {
                Some(code) if code == State::Ready.code() as i32 => stored,
                Some(code) if code == State::Pending.code() as i32 => declared,
                _ => None,
            };
            total += counted.unwrap_or(0).max(0) as u64;
        }
        Ok(total)
    }

    async fn pending_before(&self, cutoff_ms: i64, limit: usize) -> Result<Vec<Upload>> {
        let last_day = cutoff_ms.div_euclid(DAY_MS);
        let mut candidates: Vec<(i64, Uuid)> = Vec::new();
        for day in last_day - PENDING_LOOKBACK_DAYS..=last_day {
            for shard in 0..PENDING_SHARDS {
                let values = (day, shard, cutoff_ms, limit.min(i32::MAX as usize) as i32);
                let found: Vec<(i64, Uuid)> = rows(self.execute(&self.statements.pending, values).await?)?;
                candidates.extend(found);
            }
        }
        candidates.sort();
        let mut pending = Vec::new();
        for (created_at_ms, id) in candidates {
            if pending.len() == limit {
                break;
            }
            match self.get(id).await? {
                Some(upload) if upload.state == State::Pending => pending.push(upload),
                // Left pending (or never fully created) without its entry going: drop it.
                _ => self.forget_pending(created_at_ms, id).await,
            }
        }
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use messenger_platform::cql::Cluster;

    use super::*;

    /// A fresh keyspace on the suite's shared Cassandra node (or the
    /// ScyllaDB `MESSENGER_TEST_SCYLLA` names).
    async fn cluster() -> Cluster {
        let node = tokio::task::spawn_blocking(messenger_testkit::shared_cassandra).await.unwrap();
        Cluster {
            nodes: vec![node],
            keyspace: format!("media_test_{}", Uuid::now_v7().simple()),
            migrate_on_start: true,
            request_timeout: std::time::Duration::from_secs(10),
            connect_timeout: std::time::Duration::from_secs(10),
            ..Cluster::default()
        }
    }

    async fn drop_keyspace(store: &ScyllaStore, keyspace: &str) {
        let mut drop = scylla::statement::unprepared::Statement::new(format!("DROP KEYSPACE {keyspace}"));
        drop.set_request_timeout(Some(std::time::Duration::from_secs(60)));
        store.session.query_unpaged(drop, ()).await.unwrap();
    }

    #[tokio::test]
    async fn passes_the_contract_on_a_cql_node() {
        let cluster = cluster().await;
        let store = ScyllaStore::connect(&cluster).await.unwrap();
        crate::store::contract::run(&store).await;
        // The schema is recorded as its own component: a second run has nothing to do.
        let again = migrate(&cluster).await.unwrap();
        assert_eq!((again.from, again.to, again.applied.len()), (1, 1, 0), "{again}");
        drop_keyspace(&store, &cluster.keyspace).await;
    }

    /// A pending entry whose upload left pending without it (a writer that
    /// stopped between the LWT and the delete) is dropped by the sweep's
    /// read, not returned, and an upload with no entry of its own is not
    /// invented.
    #[tokio::test]
    async fn the_sweep_drops_stale_pending_entries() {
        let cluster = cluster().await;
        let store = ScyllaStore::connect(&cluster).await.unwrap();
        let upload = crate::store::contract::upload("stale-owner", 5_000, false);
        store.create(&upload).await.unwrap();
        // Ready by the LWT alone, as if the entry's delete never ran.
        let values = (10_i64, 0_i32, 0_i32, "", false, &upload.owner, upload.id);
        assert!(store.lwt(&store.statements.mark_ready, values).await.unwrap());
        assert!(store.pending_before(10_000, 10).await.unwrap().is_empty(), "a ready upload is not pending");
        let (day, shard) = pending_key(upload.created_at_ms, upload.id);
        let left: Vec<(i64, Uuid)> =
            rows(store.execute(&store.statements.pending, (day, shard, 10_000_i64, 10_i32)).await.unwrap()).unwrap();
        assert!(left.is_empty(), "the stale entry was dropped: {left:?}");
        drop_keyspace(&store, &cluster.keyspace).await;
    }
}
