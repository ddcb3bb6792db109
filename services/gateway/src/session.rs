//! One device's Connect stream, from Hello to disconnect.
//!
//! Invariant: within a session, a device receives each conversation's
//! messages in seq order with no gaps, starting after its delivered cursor.
//! `last_sent` remembers the highest seq pushed per conversation; a live
//! message at or below it is a duplicate and skipped, one above `last + 1`
//! first pulls the missing range from history. So a failed or overflowing
//! live path costs a fetch, never a lost or reordered message.
//!
//! Memory per session is bounded: `session_queue_depth` outbound frames,
//! `inbox_depth` live messages (overflow switches to re-sync), and
//! `max_inflight_sends` sends awaiting their ack.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use messenger_platform::{auth::TokenExpiry, ids, metrics, trace};
use messenger_proto::v1::{
    self as pb, ClientFrame, ServerFrame, client_frame::Frame as In, delivery, server_frame::Frame as Out,
};
use tokio::sync::{Notify, mpsc};
use tonic::{Code, Status};
use tracing::{Instrument as _, debug, info, warn};

use crate::{
    Context,
    registry::{Live, SessionHandle},
};

/// What a session queues for its client. Boxed so the queue's blocks stay
/// small: they are allocated per session and live as long as it does.
pub(crate) type Outbound = Result<Box<ServerFrame>, Box<Status>>;

/// What a client sends, from either transport: a gRPC `Connect` stream or a
/// WebSocket (`web.rs`). A read error ends the session.
pub(crate) type Inbound = futures::stream::BoxStream<'static, Result<ClientFrame, Unreadable>>;

/// Why a transport could not read the client's next frame.
#[derive(Debug)]
pub(crate) enum Unreadable {
    /// Larger than `server.max_message_bytes` (the transport's words).
    TooLarge(String),
    /// A message that is not a `ClientFrame` (WebSocket only).
    NotAFrame(String),
    /// The connection failed: nobody to tell.
    Gone,
}

impl Unreadable {
    /// What the client is told, if anyone is there to hear it.
    pub(crate) fn refusal(&self) -> Option<Status> {
        match self {
            Unreadable::TooLarge(detail) => Some(Status::resource_exhausted(format!(
                "a frame is larger than this server accepts (server.max_message_bytes): {detail}"
            ))),
            Unreadable::NotAFrame(detail) => Some(Status::invalid_argument(detail.clone())),
            Unreadable::Gone => None,
        }
    }
}

/// Conversations whose read mark a session remembers (repeats beyond it
/// are passed on; the message service ignores those that move nothing).
const MAX_READ_MARKS: usize = 4096;

/// Why a session ended early.
#[derive(Debug)]
enum End {
    ClientGone,
    SlowConsumer,
    Upstream(Status),
    /// The token the stream was opened with expired.
    TokenExpired,
    /// The client sent a frame over `server.max_message_bytes`, or (on a
    /// WebSocket) one that is not a `ClientFrame`.
    Unreadable(Status),
}

/// A message-service failure the session outlives: the catch-up is tried
/// again at the next gap retry, and the stream stays open.
fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::ClientGone => "client_gone",
            End::SlowConsumer => "slow_consumer",
            End::Upstream(_) => "upstream",
            End::TokenExpired => "token_expired",
            End::Unreadable(status) if status.code() == Code::ResourceExhausted => "frame_too_large",
            End::Unreadable(_) => "unreadable_frame",
        }
    }
}

/// What SREs watch of the sessions: how many are open, why they end.
struct SessionMetrics {
    open: metrics::UpDownCounter<i64>,
    ended: metrics::Counter<u64>,
    /// Frames waiting in a session's queue (`gateway.session_queue_depth`).
    queue_depth: metrics::Histogram<u64>,
    /// From a message's commit (its server time) to its live frame.
    commit_to_deliver: metrics::Histogram<f64>,
}

/// One open session in `messenger.gateway.sessions`, while it lives.
struct OpenSession;

impl OpenSession {
    fn count() -> OpenSession {
        session_metrics().open.add(1, &[]);
        OpenSession
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        session_metrics().open.add(-1, &[]);
    }
}

fn session_metrics() -> &'static SessionMetrics {
    static METRICS: std::sync::OnceLock<SessionMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = metrics::meter();
        SessionMetrics {
            open: meter
                .i64_up_down_counter("messenger.gateway.sessions")
                .with_description("Connect streams past their Hello, open now")
                .build(),
            ended: meter
                .u64_counter("messenger.gateway.sessions.ended")
                .with_description("Sessions ended, by reason (slow_consumer: cut off for not reading)")
                .build(),
            queue_depth: meter
                .u64_histogram("messenger.gateway.session_queue_depth")
                .with_description("Frames already waiting for the device when a session queues one")
                .with_boundaries(vec![0.0, 1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 1024.0])
                .build(),
            commit_to_deliver: meter
                .f64_histogram("messenger.gateway.commit_to_deliver")
                .with_unit("s")
                .with_description("From a message's commit to its live frame being queued to a device")
                .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0])
                .build(),
        }
    })
}

enum Completion {
    Frame(Box<ServerFrame>),
    Nothing,
}

struct Session {
    context: Arc<Context>,
    user: String,
    device: String,
    session_id: String,
    out: mpsc::Sender<Outbound>,
    last_sent: HashMap<String, u64>,
    /// Per conversation, the newest live message held back behind seqs that
    /// history could not supply yet.
    deferred: HashMap<String, u64>,
    /// Conversations whose first sync in this session stopped before the
    /// live message that started it (a seq right after the device's cursor
    /// not readable yet): synced again until it moves, with that message's seq.
    unsynced: HashMap<String, u64>,
    /// Per conversation, the highest read mark this session passed on: a
    /// repeat (or an older one) moves nothing, so it costs no call, no write
    /// and no receipt.
    read_marks: HashMap<String, u64>,
    /// A whole sync the message service could not answer (unreachable for
    /// a moment): tried again at the next gap retry.
    resync_pending: bool,
}

fn error_frame(code: Code, message: impl Into<String>, client_msg_id: &str, conversation_id: &str) -> ServerFrame {
    ServerFrame {
        frame: Some(Out::Error(pb::Error {
            code: code as i32,
            message: message.into(),
            client_msg_id: client_msg_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            retry_after_ms: 0,
        })),
    }
}

/// The Error frame for a refused call: its code and message, and the wait
/// its `google.rpc.RetryInfo` names (a rate limit's) as `retry_after_ms`.
pub(crate) fn status_frame(status: &Status, client_msg_id: &str, conversation_id: &str) -> ServerFrame {
    use tonic_types::StatusExt as _;
    let mut frame = error_frame(status.code(), status.message(), client_msg_id, conversation_id);
    if let Some(Out::Error(error)) = &mut frame.frame
        && let Some(wait) = status.get_details_retry_info().and_then(|info| info.retry_delay)
    {
        error.retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    }
    frame
}

/// Nothing on success; an Error frame (stream stays open) on failure.
fn answer_or_error<T>(result: Result<T, Status>, conversation_id: &str) -> Completion {
    match result {
        Ok(_) => Completion::Nothing,
        Err(status) => Completion::Frame(Box::new(status_frame(&status, "", conversation_id))),
    }
}

/// Admits a new stream of `user` from `address` (the connect rate limits,
/// the pre-Hello cap per address, `max_sessions`) and runs its session in a
/// task; what the client is sent comes out of the returned queue.
pub(crate) fn open(
    context: &Arc<Context>,
    user: String,
    expiry: Option<TokenExpiry>,
    address: Option<IpAddr>,
    inbound: Inbound,
) -> Result<mpsc::Receiver<Outbound>, Status> {
    let limits = &context.limits;
    if let Some(address) = address {
        limits.connects_per_address.check(&address.to_string())?;
    }
    limits.connects_per_user.check(&user)?;
    let pre_hello = address.map(|address| limits.pre_hello.take(address)).transpose()?;
    // Counted from acceptance, so streams still waiting for Hello count too.
    let Some(slot) = StreamSlot::take(context) else {
        let limit = context.options.max_sessions;
        return Err(Status::resource_exhausted(format!(
            "this gateway holds its limit of {limit} sessions; retry later or elsewhere"
        )));
    };
    let (out, frames) = mpsc::channel(context.options.session_queue_depth);
    let context = context.clone();
    tokio::spawn(async move {
        run(context, user, expiry, pre_hello, inbound, out).await;
        drop(slot);
    });
    Ok(frames)
}

/// One accepted stream's place under `max_sessions`; given back on drop.
struct StreamSlot(Arc<Context>);

impl StreamSlot {
    fn take(context: &Arc<Context>) -> Option<StreamSlot> {
        let limit = context.options.max_sessions;
        let previous = context.open_streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if previous >= limit {
            context.open_streams.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return None;
        }
        Some(StreamSlot(context.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs the session; returns when the client leaves, the server shuts down,
/// or the client is too slow.
async fn run(
    context: Arc<Context>,
    user: String,
    expiry: Option<TokenExpiry>,
    pre_hello: Option<crate::limits::PreHelloSlot>,
    mut inbound: Inbound,
    out: mpsc::Sender<Outbound>,
) {
    let hello = tokio::time::timeout(context.options.hello_timeout, inbound.next()).await.map(Option::transpose);
    drop(pre_hello);
    let device = match hello {
        Ok(Ok(Some(ClientFrame { frame: Some(In::Hello(hello)), .. }))) => hello.device_id,
        Ok(Ok(Some(_))) => {
            let _ = out.send(Err(Box::new(Status::failed_precondition("the first frame must be Hello")))).await;
            return;
        }
        Ok(Err(unreadable)) if let Some(refused) = unreadable.refusal() => {
            let _ = out.send(Err(Box::new(refused))).await;
            return;
        }
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let _ = out.send(Err(Box::new(Status::deadline_exceeded("no Hello received in time")))).await;
            return;
        }
    };
    if device.is_empty() || device.len() > 128 || device.chars().any(char::is_control) {
        let _ = out.send(Err(Box::new(Status::invalid_argument("device_id must be 1 to 128 printable bytes")))).await;
        return;
    }
    let session_id = ids::new_id().to_string();
    let (inbox_tx, inbox) = mpsc::channel(context.options.inbox_depth);
    let resync = Arc::new(Notify::new());
    let registration = Arc::new(pb::Session {
        user_id: user.clone(),
        device_id: device.clone(),
        session_id: session_id.clone(),
        gateway_id: context.gateway_id.clone(),
        gateway_addr: context.advertise_internal.clone(),
        connected_at_ms: ids::now_ms(),
    });
    let handle = SessionHandle { inbox: inbox_tx, resync: resync.clone(), presence: registration.clone() };
    context.registry.insert(session_id.clone(), handle);

    let registered = context
        .presence
        .clone()
        .register(pb::RegisterRequest { session: Some((*registration).clone()), restore: false })
        .await;
    let came_online = match registered {
        // Stamped by presence after the user's every earlier transition
        // (0 from a presence that predates the stamp: now, as before).
        Ok(response) => {
            let response = response.into_inner();
            response.came_online.then(|| if response.online_at_ms > 0 { response.online_at_ms } else { ids::now_ms() })
        }
        Err(status) => {
            context.registry.remove(&session_id);
            let _ = out.send(Err(Box::new(status))).await;
            return;
        }
    };
    if let Some(online_at_ms) = came_online {
        presence_changed(
            &context,
            pb::PresenceUpdate { user_id: user.clone(), online: true, last_seen_ms: online_at_ms },
        );
    }
    info!(user_id = %user, device_id = %device, session_id = %session_id, "session started");
    // Counted out when this function ends or its future is dropped.
    let _open = OpenSession::count();

    let mut session = Session {
        context: context.clone(),
        user,
        device,
        session_id,
        out,
        last_sent: HashMap::new(),
        deferred: HashMap::new(),
        unsynced: HashMap::new(),
        read_marks: HashMap::new(),
        resync_pending: false,
    };
    let expires = expires_at(expiry, context.token_leeway);
    let end = tokio::select! {
        end = session.serve(&mut inbound, inbox, resync) => end,
        () = tokio::time::sleep_until(expires) => End::TokenExpired,
    };
    session_metrics().ended.add(1, &[metrics::KeyValue::new("reason", end.reason())]);
    match &end {
        End::ClientGone => {}
        End::SlowConsumer => {
            warn!(session_id = %session.session_id, "slow consumer disconnected; it resumes from its cursor")
        }
        End::Upstream(status) => {
            warn!(session_id = %session.session_id, code = ?status.code(), "session ended: upstream failure");
            let _ = session.out.try_send(Err(Box::new(status.clone())));
        }
        End::Unreadable(status) => {
            debug!(session_id = %session.session_id, reason = end.reason(), "session ended: a frame it cannot read");
            let _ = session.out.try_send(Err(Box::new(status.clone())));
        }
        End::TokenExpired => {
            info!(session_id = %session.session_id, "session ended: token expired");
            let status = Status::unauthenticated("token expired; reconnect with a fresh token");
            let _ =
                tokio::time::timeout(context.options.slow_consumer_timeout, session.out.send(Err(Box::new(status))))
                    .await;
        }
    }
    context.acks.flush_device(&context.message, &session.user, &session.device).await;
    context.registry.remove(&session.session_id);
    let unregistered = context
        .presence
        .clone()
        .unregister(pb::UnregisterRequest { user_id: session.user.clone(), session_id: session.session_id.clone() })
        .await;
    if let Ok(response) = unregistered
        && let pb::UnregisterResponse { went_offline: true, last_seen_ms } = response.into_inner()
    {
        presence_changed(&context, pb::PresenceUpdate { user_id: session.user.clone(), online: false, last_seen_ms });
    }
    debug!(session_id = %session.session_id, "session closed");
}

/// When a stream opened with a token expiring at `expiry` must end: when
/// the token would stop verifying (`exp` plus the tolerated skew).
fn expires_at(expiry: Option<TokenExpiry>, leeway: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    // A token always has `exp` (the verifier requires it); without one here, a century.
    let Some(TokenExpiry(exp)) = expiry else { return now + std::time::Duration::from_secs(100 * 365 * 86_400) };
    let remaining_ms = (exp.saturating_mul(1000) + leeway.as_millis() as u64).saturating_sub(ids::now_ms() as u64);
    now + std::time::Duration::from_millis(remaining_ms)
}

/// Tells the user's contacts, in the background: a hint, never worth a wait.
fn presence_changed(context: &Context, update: pb::PresenceUpdate) {
    let mut message = context.message.clone();
    tokio::spawn(async move {
        let request = pb::PresenceChangedRequest { update: Some(update) };
        if let Err(status) = message.presence_changed(request).await {
            debug!(code = ?status.code(), "presence update not sent");
        }
    });
}

impl Session {
    async fn serve(&mut self, inbound: &mut Inbound, mut inbox: mpsc::Receiver<Live>, resync: Arc<Notify>) -> End {
        let ready = Out::Ready(pb::Ready { session_id: self.session_id.clone(), user_id: self.user.clone() });
        if let Err(end) = self.emit(ServerFrame { frame: Some(ready) }).await {
            return end;
        }
        // A stream that cannot catch up at its start ends (UNAVAILABLE): the
        // device reconnects, perhaps through a gateway that can. Later, a
        // message service unreachable for a moment only postpones catch-up.
        if let Err(end) = self.sync(None).await {
            return end;
        }
        let shutdown = self.context.shutdown.clone();
        let max_inflight = self.context.options.max_inflight_sends;
        let mut inflight: FuturesUnordered<BoxFuture<'static, Completion>> = FuturesUnordered::new();
        let mut gap_retry = tokio::time::interval(self.context.options.gap_retry_interval);
        gap_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let held_back = !self.deferred.is_empty() || !self.unsynced.is_empty() || self.resync_pending;
            let step = tokio::select! {
                // Not biased: client frames, completions and live events get fair turns.
                () = shutdown.cancelled() => {
                    let frame = error_frame(Code::Unavailable, "gateway shutting down; reconnect", "", "");
                    let _ = self.out.try_send(Ok(Box::new(frame)));
                    return End::ClientGone;
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => self.complete(done).await,
                live = inbox.recv() => match live.as_ref().map(|live| (&*live.event, &live.span)) {
                    Some((delivery::Event::Message(message), span)) => {
                        let frame = trace::child(span, "write message frame");
                        self.deliver_live(message).instrument(frame).await
                    }
                    Some((delivery::Event::Receipt(receipt), _)) => {
                        self.emit(ServerFrame { frame: Some(Out::Receipt(receipt.clone())) }).await
                    }
                    Some((delivery::Event::Typing(typing), _)) => {
                        self.emit(ServerFrame { frame: Some(Out::Typing(typing.clone())) }).await
                    }
                    Some((delivery::Event::Presence(update), _)) => {
                        self.emit(ServerFrame { frame: Some(Out::Presence(update.clone())) }).await
                    }
                    None => return End::ClientGone,
                },
                () = resync.notified() => self.resync().await,
                _ = gap_retry.tick(), if held_back => self.retry_held_back().await,
                frame = inbound.next(), if inflight.len() < max_inflight => match frame.transpose() {
                    Ok(Some(frame)) => self.handle(frame, &mut inflight).await,
                    Ok(None) => {
                        self.finish_inflight(&mut inflight).await;
                        return End::ClientGone;
                    }
                    Err(unreadable) => {
                        self.finish_inflight(&mut inflight).await;
                        return unreadable.refusal().map_or(End::ClientGone, End::Unreadable);
                    }
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The client closed its side: let what it already asked for (sends, read
    /// marks, acks) complete, within the slow-consumer timeout, before closing.
    async fn finish_inflight(&mut self, inflight: &mut FuturesUnordered<BoxFuture<'static, Completion>>) {
        let deadline = tokio::time::Instant::now() + self.context.options.slow_consumer_timeout;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, inflight.next()).await {
            // The client may still be reading its side: answers go out when they can.
            let _ = self.complete(done).await;
        }
    }

    async fn emit(&self, frame: ServerFrame) -> Result<(), End> {
        session_metrics().queue_depth.record((self.out.max_capacity() - self.out.capacity()) as u64, &[]);
        match tokio::time::timeout(self.context.options.slow_consumer_timeout, self.out.send(Ok(Box::new(frame)))).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => Err(End::SlowConsumer),
        }
    }

    /// Pushes a message unless this session already sent it.
    async fn push(&mut self, message: pb::Message) -> Result<(), End> {
        let last = self.last_sent.entry(message.conversation_id.clone()).or_insert(0);
        if message.seq <= *last {
            return Ok(());
        }
        *last = message.seq;
        self.emit(ServerFrame { frame: Some(Out::Message(message)) }).await
    }

    /// Sends everything after the device's delivered cursor (all conversations, or one).
    async fn sync(&mut self, only: Option<&str>) -> Result<(), End> {
        let mut page_token = String::new();
        loop {
            let request = pb::SyncRequest {
                user_id: self.user.clone(),
                device_id: self.device.clone(),
                limit: self.context.options.sync_page,
                page_token,
                conversation_id: only.unwrap_or_default().to_owned(),
            };
            let response = self.context.message.clone().sync(request).await.map_err(End::Upstream)?.into_inner();
            for message in response.messages {
                self.push(message).await?;
            }
            if response.next_page_token.is_empty() {
                return Ok(());
            }
            page_token = response.next_page_token;
        }
    }

    async fn deliver_live(&mut self, message: &pb::Message) -> Result<(), End> {
        let id = &message.conversation_id;
        if let Some(waiting) = self.unsynced.get_mut(id) {
            *waiting = (*waiting).max(message.seq);
            return Ok(());
        }
        if !self.last_sent.contains_key(id) {
            // First message of this conversation in this session: start from
            // the cursor. The message is committed, so sync returns it too
            // unless a seq between the cursor and it is not readable yet;
            // then it waits, never pushed past that seq.
            match self.sync(Some(id)).await {
                Err(End::Upstream(status)) if transient(&status) => {}
                other => other?,
            }
            if !self.last_sent.contains_key(id) {
                self.unsynced.insert(id.clone(), message.seq);
                return Ok(());
            }
        }
        match self.last_sent.get(id).copied() {
            None => Ok(()),
            Some(last) if message.seq <= last => Ok(()),
            Some(last) if message.seq == last + 1 => {
                let latency = (ids::now_ms() - message.sent_at_ms).max(0) as f64 / 1000.0;
                session_metrics().commit_to_deliver.record(latency, &[]);
                self.push(message.clone()).await
            }
            Some(last) => {
                if self.fill_gap(&message.conversation_id, last, message.seq).await? {
                    self.push(message.clone()).await?;
                } else {
                    // Earlier seqs are not readable yet (a store whose
                    // concurrent writers land out of order): never push past
                    // them, or the device's cursor would skip them. Fetched
                    // once they are, when the next live message arrives.
                    let deferred = self.deferred.entry(message.conversation_id.clone()).or_insert(0);
                    *deferred = (*deferred).max(message.seq);
                }
                Ok(())
            }
        }?;
        self.catch_up_deferred(&message.conversation_id).await
    }

    /// Syncs every conversation; a message service unreachable for the
    /// moment leaves it for the next gap retry instead of ending the stream.
    async fn resync(&mut self) -> Result<(), End> {
        self.resync_pending = false;
        match self.sync(None).await {
            Err(End::Upstream(status)) if transient(&status) => {
                debug!(session_id = %self.session_id, code = ?status.code(), "sync postponed: message service unavailable");
                self.resync_pending = true;
                Ok(())
            }
            other => other,
        }
    }

    /// Looks again at every conversation with live messages held back.
    async fn retry_held_back(&mut self) -> Result<(), End> {
        if self.resync_pending {
            self.resync().await?;
        }
        let unsynced: Vec<(String, u64)> = self.unsynced.drain().collect();
        for (id, newest) in unsynced {
            match self.sync(Some(&id)).await {
                Err(End::Upstream(status)) if transient(&status) => {}
                other => other?,
            }
            match self.last_sent.get(&id).copied() {
                None => {
                    self.unsynced.insert(id, newest);
                }
                Some(last) if last < newest => {
                    let deferred = self.deferred.entry(id).or_insert(0);
                    *deferred = (*deferred).max(newest);
                }
                Some(_) => {}
            }
        }
        let deferred: Vec<String> = self.deferred.keys().cloned().collect();
        for id in deferred {
            self.catch_up_deferred(&id).await?;
        }
        Ok(())
    }

    /// Pushes live messages held back behind a gap, once the gap is readable.
    async fn catch_up_deferred(&mut self, conversation_id: &str) -> Result<(), End> {
        let Some(&deferred) = self.deferred.get(conversation_id) else { return Ok(()) };
        let last = self.last_sent.get(conversation_id).copied().unwrap_or(0);
        if deferred <= last || self.fill_gap(conversation_id, last, deferred + 1).await? {
            self.deferred.remove(conversation_id);
        }
        Ok(())
    }

    /// Fetches and pushes (last, upto) exclusive, from history; false if
    /// history could not (yet) supply all of it.
    async fn fill_gap(&mut self, conversation_id: &str, mut last: u64, upto: u64) -> Result<bool, End> {
        while last + 1 < upto {
            let request = pb::MessageHistoryRequest {
                user_id: self.user.clone(),
                conversation_id: conversation_id.to_owned(),
                before_seq: 0,
                after_seq: Some(last),
                limit: (upto - last - 1).min(self.context.options.sync_page as u64) as u32,
            };
            let page = self
                .context
                .message
                .clone()
                .history(messenger_platform::discovery::routed(conversation_id, request))
                .await;
            let messages = match page {
                Ok(page) => page.into_inner().messages,
                // Removed from the conversation meanwhile, say: nothing more to show.
                Err(status) if status.code() == Code::NotFound => return Ok(true),
                // Not readable now: held back, fetched at the next gap retry.
                Err(status) if transient(&status) => return Ok(false),
                Err(status) => return Err(End::Upstream(status)),
            };
            if messages.is_empty() {
                return Ok(false);
            }
            for message in messages {
                last = last.max(message.seq);
                self.push(message).await?;
            }
        }
        Ok(true)
    }

    async fn handle(
        &mut self,
        frame: ClientFrame,
        inflight: &mut FuturesUnordered<BoxFuture<'static, Completion>>,
    ) -> Result<(), End> {
        match frame.frame {
            Some(In::Send(send)) => {
                if let Err(status) = self.context.limits.sends.check(&self.user) {
                    let frame = status_frame(&status, &send.client_msg_id, &send.conversation_id);
                    return self.emit(frame).await;
                }
                // The app's trace, when it sent one (`Client::send_traced`).
                let span = trace::frame_span(
                    "messenger.v1.GatewayService/Connect Send",
                    "messenger.v1.GatewayService",
                    "Connect",
                    &frame.trace_context,
                );
                let context = self.context.clone();
                let request = pb::SendRequest {
                    sender_id: self.user.clone(),
                    device_id: self.device.clone(),
                    conversation_id: send.conversation_id.clone(),
                    client_msg_id: send.client_msg_id.clone(),
                    body: send.body,
                    reply_to_seq: send.reply_to_seq,
                    media_ids: send.media_ids,
                };
                inflight.push(
                    async move {
                        let sent = context.sends.send(request).await;
                        let code = sent.as_ref().map_or_else(Status::code, |_| Code::Ok);
                        trace::finish(&tracing::Span::current(), code, true);
                        let frame = match sent {
                            Ok(response) => match response.ack {
                                Some(ack) => ServerFrame { frame: Some(Out::SendAck(ack)) },
                                None => error_frame(
                                    Code::Internal,
                                    "missing ack",
                                    &send.client_msg_id,
                                    &send.conversation_id,
                                ),
                            },
                            Err(status) => status_frame(&status, &send.client_msg_id, &send.conversation_id),
                        };
                        Completion::Frame(Box::new(frame))
                    }
                    .instrument(span)
                    .boxed(),
                );
                Ok(())
            }
            Some(In::Ack(ack)) => {
                if messenger_platform::ids::parse(&ack.conversation_id).is_none() {
                    return self
                        .emit(error_frame(Code::InvalidArgument, "ack conversation_id must be a UUID", "", ""))
                        .await;
                }
                if !self.context.acks.add(&self.user, &self.device, ack.conversation_id, ack.seq) {
                    return self
                        .emit(error_frame(
                            Code::ResourceExhausted,
                            "too many acked conversations at once; retry",
                            "",
                            "",
                        ))
                        .await;
                }
                Ok(())
            }
            Some(In::Read(read)) => {
                if self.read_marks.get(&read.conversation_id).is_some_and(|&marked| read.seq <= marked) {
                    return Ok(());
                }
                if let Err(status) = self.context.limits.reads.check(&self.user) {
                    return self.emit(status_frame(&status, "", &read.conversation_id)).await;
                }
                if self.read_marks.len() < MAX_READ_MARKS || self.read_marks.contains_key(&read.conversation_id) {
                    self.read_marks.insert(read.conversation_id.clone(), read.seq);
                }
                let mut client = self.context.message.clone();
                let conversation_id = read.conversation_id.clone();
                let request = pb::MarkReadRequest {
                    user_id: self.user.clone(),
                    conversation_id: read.conversation_id,
                    seq: read.seq,
                };
                inflight
                    .push(async move { answer_or_error(client.mark_read(request).await, &conversation_id) }.boxed());
                Ok(())
            }
            Some(In::Typing(typing)) => {
                if self.context.limits.typing.wait(&self.user).is_ok() {
                    let mut client = self.context.message.clone();
                    let conversation_id = typing.conversation_id.clone();
                    let request = pb::NotifyTypingRequest {
                        user_id: self.user.clone(),
                        conversation_id: typing.conversation_id,
                        typing: typing.typing,
                    };
                    inflight.push(
                        async move { answer_or_error(client.notify_typing(request).await, &conversation_id) }.boxed(),
                    );
                }
                Ok(())
            }
            Some(In::Ping(ping)) => {
                self.emit(ServerFrame { frame: Some(Out::Pong(pb::Pong { nonce: ping.nonce })) }).await
            }
            Some(In::Hello(_)) => {
                self.emit(error_frame(Code::FailedPrecondition, "Hello was already received", "", "")).await
            }
            None => self.emit(error_frame(Code::InvalidArgument, "empty frame", "", "")).await,
        }
    }

    async fn complete(&mut self, done: Completion) -> Result<(), End> {
        match done {
            Completion::Frame(frame) => self.emit(*frame).await,
            Completion::Nothing => Ok(()),
        }
    }
}
