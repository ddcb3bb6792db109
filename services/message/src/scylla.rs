//! The production `MessageStore` on ScyllaDB (the `scylla` driver).
//!
//! Layout: `options.rs` ([`ScyllaOptions`]), `schema.cql` (the tables),
//! `migrate.rs` (versioned schema changes under an LWT lock, [`migrate`]), `statements.rs` (every CQL statement, prepared
//! once at connect), `rows.rs` (row mapping, buckets, error mapping), `send.rs` (the per-conversation send batcher),
//! `apply.rs` (conversation creation and changes), `reads.rs` (history,
//! inbox, sync, members, cursors).
//!
//! # How seqs stay dense
//!
//! Each conversation has a head row (`conversations`) whose `last_seq` is
//! only ever changed by a lightweight transaction (Paxos):
//! `UPDATE ... SET last_seq = ? ... IF last_seq = ?`. Whoever's LWT applies
//! owns the seqs between the old and the new value. Sends to one conversation
//! that arrive together at one instance queue up behind one task, which takes
//! up to `max_reservation` of them and reserves their whole range with ONE
//! LWT; on conflict (another instance won) it re-reads the head and retries,
//! up to `lwt_max_retries` times, then answers `Unavailable`. Only after the
//! message rows are written (at LOCAL_QUORUM) does `send` return: durable
//! before ack.
//!
//! # Idempotent sends across instances
//!
//! Before reserving, each send claims `(conversation, sender, client_msg_id)`
//! in `send_dedupe` with `INSERT ... IF NOT EXISTS USING TTL dedupe_ttl`.
//! Once its seq is reserved, the seq is recorded in the claim, and only then
//! is the message row written. A retry that finds a claim whose seq has a
//! row answers `Duplicate` with the stored original; one that finds a claim
//! without a row (the first attempt is in flight, maybe on another instance)
//! answers `Unavailable` and the client retries. A claim older than twice
//! `lock_timeout` has no writer left that may still succeed (the budgets
//! below), so it is taken over: a recorded seq is first declared lost.
//!
//! # Lost seqs, and why they stay lost
//!
//! A crash (or a write failing past its retries) between the reservation
//! and the row write leaves a seq with no row; rows of concurrent writers
//! also land out of order. Forward reads (gap fill, sync) stop at a missing
//! seq until the next present row is older than twice `lock_timeout`, then
//! declare it lost and skip it (`reads.rs`); a retry that takes the claim
//! over does the same for the seq recorded in it. Declaring lost writes a
//! range tombstone at the declarer's clock, and rows carry their writer's
//! stamp as write timestamp, so a row that lands later (a write that timed
//! out on the client but was applied, by hinted handoff or a replica's
//! backlog) is shadowed and never appears behind a cursor that passed it,
//! nor as a second seq of one `client_msg_id`. The writer's side of the
//! bargain is two budgets counted from its stamp, taken just before the head
//! LWT that reserved its seqs: it writes no row once `lock_timeout / 2` has
//! passed, and acknowledges none written after `lock_timeout` (its client
//! retries and finds the original or the lost seq). A later seq's stamp is
//! at most `lock_timeout / 2` before its reservation, which follows every
//! earlier one, so a seq is declared lost at least `1.5 x lock_timeout` after
//! its own stamp, past its writer's last acknowledgement. **Clock bound:**
//! the arithmetic holds while instances' wall clocks agree within
//! `lock_timeout / 8` (about 1.9 s at the default 15 s; NTP keeps them
//! within milliseconds) and do not step. The sender of a lost seq
//! got no ack and retries, which gives the message a new seq; clients see a
//! seq number missing but nothing out of order or duplicated. Seqs of group
//! changes and modifications never become such holes: their rows are
//! recorded in the head with the reservation and written by the next writer
//! if theirs stopped (`apply.rs`), and readers never skip them.
//!
//! Costs per batch of sends: one LWT on the head (plus one serial read of
//! the head when this instance keeps none, or kept a stale one:
//! `head::Heads`), one claim LWT and one seq record per message (distinct
//! partitions, run in parallel, so latency is one round each, not N), and
//! one single-partition batch per bucket chunk of rows.
//!
//! # Known gaps
//!
//! - An LWT whose outcome is unknown (timeout) is resolved by re-reading the
//!   head at SERIAL: `last_reservation` names the LWT that last moved it. If
//!   another reservation already followed, the outcome cannot be told and the
//!   range is treated as not ours (at worst a lost seq as above, never two
//!   writers on one seq).
//! - Every forward read that crosses a lost seq declares it again (one
//!   tombstone write per gap and read; lost seqs need a crash, so they are
//!   rare): no record of what was already declared is kept.
//! - Past `dedupe_ttl` a retry is a new message (SQLite dedupes forever).
//! - Unread counts look at the newest `UNREAD_SCAN` entries after the read
//!   cursor only, and the inbox's last message at the newest
//!   `LAST_MESSAGE_SCAN` entries (`reads.rs`).
//!
//! # Policy state
//!
//! The active roster (user -> role), kind and title live in the head row, so
//! the head LWT that reserves a seq also proves that the state the policy was
//! checked against has not changed (`IF last_seq = <the seq read with it>`).
//! Changes that read message or member rows (edits, deletes, reactions,
//! membership) additionally hold the head's `applying` lock from their
//! reservation until their rows are written, so the next change reads the
//! rows of every earlier one (see `apply.rs`).
//!
//! `active_member_ids` reads the roster from the head each call (one
//! single-partition read at LOCAL_QUORUM; no in-process cache, so fan-out is
//! never stale). Read and delivered cursors are written `USING TIMESTAMP
//! <cursor>`, so the largest value wins without a read-modify-write.

mod apply;
mod head;
pub(crate) mod migrate;
mod options;
mod reads;
mod rows;
mod send;
mod statements;

use std::{sync::Arc, time::Duration};

use ::scylla::{
    client::session::Session,
    deserialize::row::DeserializeRow,
    response::query_result::QueryResult,
    serialize::{batch::BatchValues, row::SerializeRow},
    statement::batch::{Batch, BatchType},
};
use async_trait::async_trait;
use futures::TryStreamExt;
use tracing::info;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{
        Appended, BlockedUser, Blocks, ChangeRequest, Conversation, DeviceCursors, HistoryRange, InboxCursor, Member,
        MessageStore, NewGroup, NewMessage, SendOutcome, SeqBounds, StoredMessage, SyncCursor,
    },
};
use rows::{Lwt, execution_error, other, pager_error};
use statements::{Arity, Prepared, Statements};

#[cfg(test)]
use messenger_platform::cql::valid_identifier;
pub use messenger_platform::cql::{Cluster, ConsistencyLevel, MigrationReport, Replication, SerialLevel};
pub use options::ScyllaOptions;

/// The schema, with `{keyspace}` and `{replication}` placeholders.
pub(crate) const SCHEMA: &str = include_str!("scylla/schema.cql");

/// The schema's statements for this cluster's keyspace, comments removed.
pub(crate) fn schema_statements(cluster: &Cluster) -> Vec<String> {
    let text: String =
        SCHEMA.lines().map(|line| line.split_once("--").map_or(line, |(code, _)| code)).collect::<Vec<_>>().join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(|statement| {
            statement.replace("{keyspace}", &cluster.keyspace).replace("{replication}", &cluster.replication().to_cql())
        })
        .collect()
}

async fn open_session(cluster: &Cluster) -> Result<Session> {
    Ok(messenger_platform::cql::connect(cluster).await?)
}

/// Brings the keyspace to the newest schema version (creating it if
/// missing), safe to run from several processes at once; says what it did.
/// For `messenger migrate` (and `migrate_on_start`).
pub async fn migrate(cluster: &Cluster) -> Result<MigrationReport> {
    let session = open_session(cluster).await?;
    migrate::run(&session, cluster).await
}

/// The Scylla store. Cheap to share: everything lives behind one `Arc`.
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    session: Session,
    statements: Statements,
    options: ScyllaOptions,
    batcher: send::Batcher,
    heads: head::Heads,
    /// Tests: every change fails after its LWT, before its rows (a writer
    /// that stopped there).
    #[cfg(test)]
    fail_plan_writes: std::sync::atomic::AtomicBool,
    /// Tests: a send's message rows wait here, already on their way (past
    /// every check), until released: a write that lands late.
    #[cfg(test)]
    hold_rows: std::sync::Mutex<Option<send::HoldRows>>,
    /// Tests: the instance is dead from here on (kill -9): every statement
    /// it would send fails at once, as if the request never left.
    #[cfg(test)]
    killed: std::sync::atomic::AtomicBool,
    /// Tests: when positive, the instance dies before that many more statements.
    #[cfg(test)]
    kill_countdown: std::sync::atomic::AtomicI64,
    /// Tests: rows wait up to this long before they are written.
    #[cfg(test)]
    row_jitter_ms: std::sync::atomic::AtomicU64,
    /// Tests: every request sent, as (statement name, mode label).
    #[cfg(test)]
    sent: std::sync::Mutex<Vec<(&'static str, &'static str)>>,
}

impl ScyllaStore {
    /// Connects to `cluster`, optionally migrates, and prepares every statement.
    pub async fn connect(cluster: &Cluster, options: &ScyllaOptions) -> Result<ScyllaStore> {
        options.validate(cluster).map_err(Error::InvalidArgument)?;
        let session = open_session(cluster).await?;
        if cluster.migrate_on_start {
            let report = migrate::run(&session, cluster).await?;
            info!(%report, "scylla schema");
        }
        let statements = Statements::prepare(&session, &cluster.keyspace, cluster.serial_consistency.read()).await?;
        let inner = Inner {
            session,
            statements,
            options: options.clone(),
            batcher: send::Batcher::default(),
            heads: head::Heads::new(options.head_cache_members),
            #[cfg(test)]
            fail_plan_writes: Default::default(),
            #[cfg(test)]
            hold_rows: Default::default(),
            #[cfg(test)]
            killed: Default::default(),
            #[cfg(test)]
            kill_countdown: Default::default(),
            #[cfg(test)]
            row_jitter_ms: Default::default(),
            #[cfg(test)]
            sent: Default::default(),
        };
        Ok(ScyllaStore { inner: Arc::new(inner) })
    }
}

/// Counts one request to the cluster: a statement by its declared name and
/// mode, or a batch (mode `batch`) by the name of its first statement. The
/// counter (`messenger.message.scylla.statements`) is what a send, a delivery
/// or a read costs the nodes; `messenger bench` reports it per delivered message.
fn count(statement: &'static str, mode: &'static str) {
    static SENT: std::sync::OnceLock<messenger_platform::metrics::Counter<u64>> = std::sync::OnceLock::new();
    let sent = SENT.get_or_init(|| {
        messenger_platform::metrics::meter()
            .u64_counter("messenger.message.scylla.statements")
            .with_description(
                "Requests sent to the CQL cluster, by statement and mode (read, serial_read, write, lwt, batch)",
            )
            .build()
    });
    use messenger_platform::metrics::KeyValue;
    sent.add(1, &[KeyValue::new("statement", statement), KeyValue::new("mode", mode)]);
}

impl Inner {
    fn sending(&self, statement: &'static str, mode: &'static str) {
        count(statement, mode);
        #[cfg(test)]
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).push((statement, mode));
    }

    async fn execute<const N: usize>(
        &self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N>,
    ) -> Result<QueryResult, ::scylla::errors::ExecutionError> {
        #[cfg(test)]
        self.dead()?;
        self.sending(statement.name, statement.mode.label());
        self.session.execute_unpaged(&statement.statement, values).await
    }

    #[cfg(test)]
    #[allow(clippy::result_large_err)] // the driver's own error type, as `execute` returns it
    fn dead(&self) -> Result<(), ::scylla::errors::ExecutionError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.kill_countdown.load(SeqCst) > 0 && self.kill_countdown.fetch_sub(1, SeqCst) == 1 {
            self.killed.store(true, SeqCst);
        }
        match self.killed.load(SeqCst) {
            true => Err(::scylla::errors::ExecutionError::RequestTimeout(Duration::ZERO)),
            false => Ok(()),
        }
    }

    /// Runs an idempotent write or a single-page read.
    async fn run<const N: usize>(&self, statement: &Prepared<N>, values: impl SerializeRow + Arity<N>) -> Result<()> {
        self.execute(statement, values).await.map(drop).map_err(execution_error)
    }

    /// All rows of a query whose result is bounded by the statement (a key
    /// lookup or a LIMIT).
    async fn rows<const N: usize, R>(
        &self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N>,
    ) -> Result<Vec<R>>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
    {
        let result = self.execute(statement, values).await.map_err(execution_error)?;
        let rows = result.into_rows_result().map_err(|e| other("expected rows", e))?;
        rows.rows::<R>()
            .map_err(|e| other("unexpected row type", e))?
            .collect::<Result<Vec<R>, _>>()
            .map_err(|e| other("cannot read a row", e))
    }

    async fn first<const N: usize, R>(
        &self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N>,
    ) -> Result<Option<R>>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
    {
        Ok(self.rows(statement, values).await?.into_iter().next())
    }

    /// Every row of a partition that may be large, read page by page.
    async fn paged<const N: usize, R>(
        &self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N>,
    ) -> Result<Vec<R>>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata> + Send + Unpin + 'static,
    {
        #[cfg(test)]
        self.dead().map_err(execution_error)?;
        self.sending(statement.name, statement.mode.label());
        let pager = self.session.execute_iter(statement.statement.clone(), values).await.map_err(pager_error)?;
        let stream = pager.rows_stream::<R>().map_err(|e| other("unexpected row type", e))?;
        stream.try_collect().await.map_err(|e| Error::Unavailable(format!("scylla: {e}")))
    }

    /// A conditional statement: the raw error is kept so callers can tell
    /// an unknown outcome from a refusal.
    async fn lwt<const N: usize>(
        &self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N>,
    ) -> Result<Result<Lwt, ::scylla::errors::ExecutionError>> {
        match self.execute(statement, values).await {
            Ok(result) => Ok(Ok(Lwt::from_result(result)?)),
            Err(error) => Ok(Err(error)),
        }
    }

    /// Runs a batch of idempotent writes, retrying a few times: rows are
    /// upserts of fixed values, so writing them twice is harmless.
    async fn write_batch(&self, name: &'static str, mut batch: Batch, values: impl BatchValues) -> Result<()> {
        batch.set_is_idempotent(true);
        let mut attempt = 0;
        loop {
            #[cfg(test)]
            self.dead().map_err(execution_error)?;
            self.sending(name, "batch");
            match self.session.batch(&batch, &values).await {
                Ok(_) => return Ok(()),
                Err(error) if attempt < WRITE_ATTEMPTS && rows::outcome_unknown(&error) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                Err(error) => return Err(execution_error(error)),
            }
        }
    }
}

/// Extra attempts of an idempotent batch after a timeout.
const WRITE_ATTEMPTS: u32 = 3;

/// Statements and values collected for one batch.
pub(crate) struct BatchBuilder {
    batch: Batch,
    values: Vec<Box<dyn SerializeRow + Send + Sync>>,
    /// Its first statement's name (what the statement counter calls it).
    name: &'static str,
}

impl BatchBuilder {
    fn new(batch_type: BatchType) -> Self {
        Self { batch: Batch::new(batch_type), values: Vec::new(), name: "" }
    }

    fn push<const N: usize>(
        &mut self,
        statement: &Prepared<N>,
        values: impl SerializeRow + Arity<N> + Send + Sync + 'static,
    ) {
        if self.values.is_empty() {
            self.name = statement.name;
        }
        self.batch.append_statement(statement.statement.clone());
        self.values.push(Box::new(values));
    }

    /// Writes every statement at this timestamp (microseconds) instead of the coordinator's.
    fn timestamp(&mut self, micros: i64) {
        self.batch.set_timestamp(Some(micros));
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    async fn write(self, inner: &Inner) -> Result<()> {
        if self.values.is_empty() {
            return Ok(());
        }
        inner.write_batch(self.name, self.batch, self.values).await
    }
}

#[async_trait]
impl MessageStore for ScyllaStore {
    async fn get_or_create_direct(&self, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Conversation> {
        apply::get_or_create_direct(&self.inner, user, peer, id, now_ms).await
    }

    async fn create_group(&self, group: NewGroup, max_group_size: usize) -> Result<(Conversation, Appended)> {
        apply::create_group(&self.inner, group, max_group_size).await
    }

    async fn conversation_for_member(&self, id: Uuid, user: &str) -> Result<Option<Conversation>> {
        reads::conversation_for_member(&self.inner, id, user).await
    }

    async fn member(&self, id: Uuid, user: &str) -> Result<Option<Member>> {
        let mut member = reads::current_member(&self.inner, id, user).await?;
        if let Some(member) = &mut member {
            member.delivered_seq = 0;
        }
        Ok(member)
    }

    async fn active_member_ids(&self, id: Uuid) -> Result<Arc<Vec<String>>> {
        let head = reads::head(&self.inner, id, false).await?;
        Ok(Arc::new(head.map(|head| head.roster.into_keys().collect()).unwrap_or_default()))
    }

    async fn members(&self, id: Uuid) -> Result<Vec<Member>> {
        reads::current_members(&self.inner, id).await
    }

    async fn send(&self, message: NewMessage) -> Result<SendOutcome> {
        send::send(&self.inner, message).await
    }

    async fn apply(&self, request: ChangeRequest) -> Result<Vec<Appended>> {
        let id = request.conversation_id;
        let applied = apply::apply(&self.inner, request).await;
        // The change moved the head (whether or not its answer says so).
        self.inner.heads.forget(id);
        applied
    }

    async fn history(
        &self,
        id: Uuid,
        range: HistoryRange,
        visible: SeqBounds,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        reads::history(&self.inner, id, range, visible, limit).await
    }

    async fn list_conversations(
        &self,
        user: &str,
        after: Option<InboxCursor>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        reads::list_conversations(&self.inner, user, after, limit).await
    }

    async fn ack_delivered(&self, user: &str, device: &str, cursors: Vec<(Uuid, u64)>) -> Result<Vec<(Uuid, u64)>> {
        reads::ack_delivered(&self.inner, user, device, cursors).await
    }

    async fn ack_delivered_many(&self, acks: Vec<DeviceCursors>) -> Result<Vec<DeviceCursors>> {
        let acks = acks.into_iter().map(|ack| async move {
            let cursors = reads::ack_delivered(&self.inner, &ack.user, &ack.device, ack.cursors).await?;
            Ok::<_, Error>(DeviceCursors { user: ack.user, device: ack.device, cursors })
        });
        futures::future::try_join_all(acks).await
    }

    async fn mark_read(&self, id: Uuid, user: &str, seq: u64) -> Result<crate::store::ReadMark> {
        reads::mark_read(&self.inner, id, user, seq).await
    }

    async fn sync(
        &self,
        user: &str,
        device: &str,
        only: Option<Uuid>,
        after: Option<SyncCursor>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        reads::sync(&self.inner, user, device, only, after, limit).await
    }

    /// An outcome left unknown by a timeout answers UNAVAILABLE; the retry
    /// then finds the block in place and answers "unchanged".
    async fn block(&self, user: &str, target: &str, now_ms: i64) -> Result<bool> {
        let values = (user.to_owned(), target.to_owned(), now_ms);
        Ok(self.inner.lwt(&self.inner.statements.block_claim, values).await?.map_err(execution_error)?.applied)
    }

    async fn unblock(&self, user: &str, target: &str) -> Result<bool> {
        let values = (user.to_owned(), target.to_owned());
        Ok(self.inner.lwt(&self.inner.statements.block_release, values).await?.map_err(execution_error)?.applied)
    }

    async fn blocked_users(&self, user: &str, limit: usize) -> Result<Vec<BlockedUser>> {
        reads::blocked_users(&self.inner, user, limit).await
    }

    async fn blocks_between(&self, a: &str, b: &str) -> Result<Blocks> {
        reads::blocks_between(&self.inner, a, b).await
    }

    async fn blocked_by(&self, user: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self.inner.paged(&self.inner.statements.blocked_by_read, (user,)).await?;
        let mut users: Vec<String> = rows.into_iter().map(|(user,)| user).collect();
        users.sort();
        Ok(users)
    }
}

#[cfg(test)]
mod tests;
