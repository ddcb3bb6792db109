//! One device's Connect stream, from Hello to disconnect: the handshake
//! and presence here, the delivery order in `session/order.rs` (in seq
//! order, no gaps, never past what is readable), the client's frames in
//! `session/frames.rs`.
//!
//! Memory per session is bounded: `session_queue_depth` outbound frames,
//! `inbox_depth` live messages (overflow switches to re-sync), and
//! `max_inflight_sends` sends awaiting their ack.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered};
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

mod frames;
mod order;
mod watch;

pub(crate) use frames::status_frame;
use frames::{Completion, error_frame};
use order::{Delivery, GrpcBacklog};
use watch::{OpenSession, session_metrics};

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

/// A session's way out to its client: its frame queue, and how long a
/// frame may wait for room in it before the client counts as slow.
#[derive(Clone)]
struct Outlet {
    out: mpsc::Sender<Outbound>,
    timeout: std::time::Duration,
}

impl Outlet {
    async fn emit(&self, frame: ServerFrame) -> Result<(), End> {
        session_metrics().queue_depth.record((self.out.max_capacity() - self.out.capacity()) as u64, &[]);
        match tokio::time::timeout(self.timeout, self.out.send(Ok(Box::new(frame)))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => Err(End::SlowConsumer),
        }
    }
}

struct Session {
    context: Arc<Context>,
    user: String,
    device: String,
    session_id: String,
    outlet: Outlet,
    delivery: Delivery<GrpcBacklog>,
    /// Per conversation, the highest read mark this session passed on: a
    /// repeat (or an older one) moves nothing, so it costs no call, no write
    /// and no receipt.
    read_marks: HashMap<String, u64>,
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

    let outlet = Outlet { out, timeout: context.options.slow_consumer_timeout };
    let backlog = GrpcBacklog { message: context.message.clone(), user: user.clone(), device: device.clone() };
    let delivery = Delivery::new(backlog, outlet.clone(), context.options.sync_page);
    let mut session =
        Session { context: context.clone(), user, device, session_id, outlet, delivery, read_marks: HashMap::new() };
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
            let _ = session.outlet.out.try_send(Err(Box::new(status.clone())));
        }
        End::Unreadable(status) => {
            debug!(session_id = %session.session_id, reason = end.reason(), "session ended: a frame it cannot read");
            let _ = session.outlet.out.try_send(Err(Box::new(status.clone())));
        }
        End::TokenExpired => {
            info!(session_id = %session.session_id, "session ended: token expired");
            let status = Status::unauthenticated("token expired; reconnect with a fresh token");
            let _ = tokio::time::timeout(
                context.options.slow_consumer_timeout,
                session.outlet.out.send(Err(Box::new(status))),
            )
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
        if let Err(end) = self.delivery.sync(None).await {
            return end;
        }
        let shutdown = self.context.shutdown.clone();
        let max_inflight = self.context.options.max_inflight_sends;
        let mut inflight: FuturesUnordered<BoxFuture<'static, Completion>> = FuturesUnordered::new();
        let mut gap_retry = tokio::time::interval(self.context.options.gap_retry_interval);
        gap_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let held_back = self.delivery.held_back();
            let step = tokio::select! {
                // Not biased: client frames, completions and live events get fair turns.
                () = shutdown.cancelled() => {
                    let frame = error_frame(Code::Unavailable, "gateway shutting down; reconnect", "", "");
                    let _ = self.outlet.out.try_send(Ok(Box::new(frame)));
                    return End::ClientGone;
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => self.complete(done).await,
                live = inbox.recv() => match live.as_ref().map(|live| (&*live.event, &live.span)) {
                    Some((delivery::Event::Message(message), span)) => {
                        let frame = trace::child(span, "write message frame");
                        self.delivery.live(message).instrument(frame).await
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
                () = resync.notified() => self.delivery.resync(&self.session_id).await,
                _ = gap_retry.tick(), if held_back => self.delivery.retry_held_back(&self.session_id).await,
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
        self.outlet.emit(frame).await
    }
}
