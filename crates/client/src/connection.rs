//! The background task that owns the device's Connect stream.
//!
//! It keeps three pieces of state across reconnects: sends awaiting their ack
//! (resent with the same client id after a reconnect, so the server dedupes),
//! the highest seq handed to the app per conversation (anything at or below
//! is a duplicate from resume and is dropped), and acks not yet flushed.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use messenger_proto::v1::{self as pb, ClientFrame, client_frame::Frame as OutFrame, server_frame::Frame as InFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tracing::debug;

use crate::{Error, Event, Gateways, Options, model::Model};

/// A send as it goes on the stream, with the app's trace context.
fn send_frame(frame: pb::SendRequestFrame, trace: crate::TraceContext) -> ClientFrame {
    ClientFrame { frame: Some(OutFrame::Send(frame)), trace_context: trace }
}

pub(crate) enum Command {
    Send {
        frame: pb::SendRequestFrame,
        /// The app's trace context for this send (empty: none).
        trace: crate::TraceContext,
        reply: oneshot::Sender<Result<pb::SendAck, Error>>,
    },
    /// Kept until sent; coalesced per conversation.
    Read {
        conversation_id: String,
        seq: u64,
    },
    /// Sent only while connected.
    Typing {
        conversation_id: String,
        typing: bool,
    },
    Offline,
    Online,
    Close,
}

struct Pending {
    frame: pb::SendRequestFrame,
    trace: crate::TraceContext,
    reply: oneshot::Sender<Result<pb::SendAck, Error>>,
}

pub(crate) struct Task {
    options: Arc<Options>,
    api: Gateways,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Sends awaiting their ack, in the order the app made them (resent in that order).
    pending: BTreeMap<u64, Pending>,
    pending_ids: HashMap<String, u64>,
    next_order: u64,
    /// Frames waiting for room on the stream; the loop never blocks on sending.
    backlog: VecDeque<ClientFrame>,
    /// Sends the server could not finish for now (UNAVAILABLE, DEADLINE_EXCEEDED,
    /// ABORTED), due to go again on this stream, same id: (when, client_msg_id).
    retries: Vec<(tokio::time::Instant, String)>,
    /// How many times each such send was tried again, for its backoff.
    retried: HashMap<String, u32>,
    highest: HashMap<String, u64>,
    acks: HashMap<String, u64>,
    reads: HashMap<String, u64>,
    model: Arc<Mutex<Model>>,
}

/// The first wait before a send the server could not finish goes again;
/// doubled per try up to [`SEND_RETRY_MAX`].
const SEND_RETRY_FIRST: Duration = Duration::from_millis(50);
const SEND_RETRY_MAX: Duration = Duration::from_secs(2);

/// Resolves when the earliest of `retries` is due.
async fn retry_due(retries: &[(tokio::time::Instant, String)]) {
    if let Some(at) = retries.iter().map(|(at, _)| *at).min() {
        tokio::time::sleep_until(at).await;
    }
}

/// How one stream ended.
enum End {
    /// The app closed the client.
    Closed,
    /// Not worth retrying (refused token).
    Fatal(Error),
    /// Dropped; reconnect.
    Lost { error: Error, was_ready: bool },
    /// The app asked to go offline; reconnect when it says so.
    Offline,
}

impl Task {
    pub fn new(
        options: Arc<Options>,
        api: Gateways,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        model: Arc<Mutex<Model>>,
    ) -> Self {
        Self {
            options,
            api,
            commands,
            events,
            pending: BTreeMap::new(),
            pending_ids: HashMap::new(),
            next_order: 0,
            backlog: VecDeque::new(),
            retries: Vec::new(),
            retried: HashMap::new(),
            highest: HashMap::new(),
            acks: HashMap::new(),
            reads: HashMap::new(),
            model,
        }
    }

    /// Handles a command while no stream is open; returns whether to stop
    /// waiting (`Some(true)`: reconnect now, `None`: the client closed).
    fn offline_command(&mut self, command: Option<Command>) -> Option<bool> {
        match command {
            Some(Command::Send { frame, trace, reply }) => {
                self.insert_pending(frame, trace, reply);
                Some(false)
            }
            Some(Command::Read { conversation_id, seq }) => {
                let read = self.reads.entry(conversation_id).or_insert(0);
                *read = (*read).max(seq);
                Some(false)
            }
            Some(Command::Typing { .. } | Command::Offline) => Some(false),
            Some(Command::Online) => Some(true),
            Some(Command::Close) | None => None,
        }
    }

    fn backoff(&self) -> impl Iterator<Item = std::time::Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.options.reconnect_min)
            .with_max_delay(self.options.reconnect_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    pub async fn run(mut self, ready: oneshot::Sender<Result<String, Error>>) {
        let mut ready = Some(ready);
        let mut delays = self.backoff();
        // Before the first session, each gateway gets one try before `connect` fails.
        let mut first_attempts = 1;
        // Whether a token was fetched since the last stream that got to Ready.
        let mut refreshed = false;
        loop {
            let end = self.stream(&mut ready, &mut refreshed).await;
            let end = match end {
                End::Fatal(Error::Unauthenticated(reason)) if self.options.token_provider.is_some() && !refreshed => {
                    // Expired (the gateway ends streams at `exp`) or refused:
                    // one fresh token, then reconnect at once; pending sends
                    // go again with their ids, so nothing is lost or doubled.
                    refreshed = true;
                    match self.refresh_token().await {
                        Ok(()) => {
                            debug!(%reason, "token refreshed; reconnecting");
                            delays = self.backoff();
                            continue;
                        }
                        Err(error) => End::Fatal(error),
                    }
                }
                other => other,
            };
            let reason = match end {
                End::Closed => return,
                End::Offline => {
                    let _ = self.events.send(Event::Disconnected { reason: "offline".into(), will_retry: true }).await;
                    loop {
                        let command = self.commands.recv().await;
                        match self.offline_command(command) {
                            None => return,
                            Some(true) => break,
                            Some(false) => {}
                        }
                    }
                    delays = self.backoff();
                    continue;
                }
                End::Fatal(error) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(error.clone()));
                    }
                    self.pending_ids.clear();
                    for (_, pending) in std::mem::take(&mut self.pending) {
                        let _ = pending.reply.send(Err(error.clone()));
                    }
                    let _ =
                        self.events.send(Event::Disconnected { reason: error.to_string(), will_retry: false }).await;
                    return;
                }
                End::Lost { error, was_ready } => {
                    // The next attempt goes to the next gateway, if there are several.
                    let other_gateway = self.api.fail_over();
                    if ready.is_some() && other_gateway && first_attempts < self.api.len() {
                        first_attempts += 1;
                        continue;
                    }
                    if let Some(ready) = ready.take() {
                        // Never connected: let `connect` report it instead of retrying silently.
                        let _ = ready.send(Err(error));
                        return;
                    }
                    // Tell the app once per lost connection, not once per failed attempt.
                    if was_ready {
                        delays = self.backoff();
                        let _ =
                            self.events.send(Event::Disconnected { reason: error.to_string(), will_retry: true }).await;
                    }
                    error.to_string()
                }
            };
            debug!(%reason, "stream lost; reconnecting");
            let delay = delays.next().unwrap_or(self.options.reconnect_max);
            // Keep taking sends while waiting; they go out after the reconnect.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = self.commands.recv() => match self.offline_command(command) {
                        None => return,
                        Some(true) => break,
                        Some(false) => {}
                    },
                }
            }
        }
    }

    /// Asks the app's token provider for a fresh token and uses it from now on.
    async fn refresh_token(&self) -> Result<(), Error> {
        let provider = self.options.token_provider.as_ref().expect("checked by the caller");
        let token =
            provider.fetch().await.map_err(|e| Error::Unauthenticated(format!("token provider failed: {e}")))?;
        self.api.bearer.set(&token)
    }

    /// Opens one stream and serves it until it ends. `refreshed` is cleared
    /// once the server accepts the stream (the token worked).
    async fn stream(
        &mut self,
        ready: &mut Option<oneshot::Sender<Result<String, Error>>>,
        refreshed: &mut bool,
    ) -> End {
        let (outbound, frames) = mpsc::channel::<ClientFrame>(self.options.max_pending_sends.max(16));
        let hello = OutFrame::Hello(pb::Hello { device_id: self.options.device_id.clone(), ..Default::default() });
        let _ = outbound.try_send(ClientFrame { trace_context: Default::default(), frame: Some(hello) });
        let response = match self.api.current().connect(ReceiverStream::new(frames)).await {
            Ok(response) => response,
            Err(status) => return lost_or_fatal(status, false),
        };
        let mut inbound = response.into_inner();
        let session_id = match inbound.message().await {
            Ok(Some(pb::ServerFrame { frame: Some(InFrame::Ready(ready_frame)) })) => {
                *refreshed = false;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(ready_frame.user_id));
                }
                ready_frame.session_id
            }
            Ok(Some(_)) => {
                return End::Fatal(Error::Protocol("first server frame was not Ready".into()));
            }
            Ok(None) => {
                return End::Lost { error: Error::Unavailable("stream closed before Ready".into()), was_ready: false };
            }
            Err(status) => return lost_or_fatal(status, false),
        };
        let _ = self.events.send(Event::Connected { session_id }).await;
        // What others did while this device was away (members, titles, read cursors).
        let known: Vec<String> =
            self.model.lock().unwrap_or_else(|e| e.into_inner()).conversations.keys().cloned().collect();
        self.refresh(known);

        // Whatever was in flight when the last stream dropped goes again, same
        // ids, in the order the app sent it.
        self.drop_abandoned();
        self.backlog.clear();
        self.retries.clear();
        let resend: Vec<ClientFrame> =
            self.pending.values().map(|p| send_frame(p.frame.clone(), p.trace.clone())).collect();
        self.backlog.extend(resend);
        let mut ack_tick = tokio::time::interval(self.options.ack_interval);
        let mut ping_tick = tokio::time::interval(self.options.ping_interval);
        let mut nonce = 0u64;
        let backlog_limit = self.options.max_pending_sends.max(16);
        loop {
            let closing = tokio::select! {
                permit = outbound.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(self.backlog.pop_front().expect("backlog is not empty"));
                        None
                    }
                    Err(_) => return lost("stream closed"),
                },
                command = self.commands.recv(), if self.backlog.len() < backlog_limit => match command {
                    Some(Command::Send { frame, trace, reply }) => {
                        let out = send_frame(frame.clone(), trace.clone());
                        self.insert_pending(frame, trace, reply);
                        self.backlog.push_back(out);
                        None
                    }
                    Some(Command::Read { conversation_id, seq }) => {
                        let read = self.reads.entry(conversation_id).or_insert(0);
                        *read = (*read).max(seq);
                        None
                    }
                    Some(Command::Typing { conversation_id, typing }) => {
                        let frame = OutFrame::Typing(pb::TypingFrame { conversation_id, typing });
                        self.backlog.push_back(ClientFrame { trace_context: Default::default(), frame: Some(frame) });
                        None
                    }
                    Some(Command::Online) => None,
                    Some(Command::Offline) => Some(End::Offline),
                    Some(Command::Close) | None => Some(End::Closed),
                },
                frame = inbound.message() => match frame {
                    Ok(Some(frame)) => {
                        if let Some(end) = self.handle(frame).await {
                            return end;
                        }
                        None
                    }
                    Ok(None) => return lost("server closed the stream"),
                    Err(status) => return lost_or_fatal(status, true),
                },
                _ = ack_tick.tick() => {
                    self.flush_acks();
                    None
                }
                () = retry_due(&self.retries), if !self.retries.is_empty() => {
                    self.resend_due();
                    None
                }
                _ = ping_tick.tick() => {
                    nonce += 1;
                    self.backlog.push_back(ClientFrame { trace_context: Default::default(), frame: Some(OutFrame::Ping(pb::Ping { nonce })) });
                    self.drop_abandoned();
                    None
                }
            };
            if let Some(end) = closing {
                self.close_gracefully(outbound, &mut inbound).await;
                return end;
            }
        }
    }

    fn insert_pending(
        &mut self,
        frame: pb::SendRequestFrame,
        trace: crate::TraceContext,
        reply: oneshot::Sender<Result<pb::SendAck, Error>>,
    ) {
        // A retry of an id still pending replaces the older request in place.
        let order = match self.pending_ids.get(&frame.client_msg_id) {
            Some(order) => *order,
            None => {
                self.next_order += 1;
                self.pending_ids.insert(frame.client_msg_id.clone(), self.next_order);
                self.next_order
            }
        };
        self.pending.insert(order, Pending { frame, trace, reply });
    }

    fn take_pending(&mut self, client_msg_id: &str) -> Option<Pending> {
        self.retried.remove(client_msg_id);
        let order = self.pending_ids.remove(client_msg_id)?;
        self.pending.remove(&order)
    }

    /// A send the server could not finish for now goes again on this stream
    /// with its id (the server answers the original if it stored it), after a
    /// backoff or the wait the server named; the stream and every other send
    /// are left alone. The caller's `send_timeout` bounds the tries.
    fn retry_later(&mut self, client_msg_id: &str, retry_after_ms: u64) {
        if !self.pending_ids.contains_key(client_msg_id) {
            return;
        }
        let tries = self.retried.entry(client_msg_id.to_owned()).or_insert(0);
        *tries += 1;
        let backoff = SEND_RETRY_FIRST.saturating_mul(1 << (*tries - 1).min(16)).min(SEND_RETRY_MAX);
        let wait = backoff.max(Duration::from_millis(retry_after_ms));
        self.retries.push((tokio::time::Instant::now() + wait, client_msg_id.to_owned()));
    }

    /// Puts the sends whose retry is due back on the stream.
    fn resend_due(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.retries.drain(..).partition(|(at, _)| *at <= now);
        self.retries = later;
        for (_, id) in due {
            let Some(order) = self.pending_ids.get(&id) else { continue };
            if let Some(pending) = self.pending.get(order) {
                self.backlog.push_back(send_frame(pending.frame.clone(), pending.trace.clone()));
            }
        }
    }

    /// Forgets sends whose caller stopped waiting (timed out, dropped).
    fn drop_abandoned(&mut self) {
        self.pending.retain(|_, p| !p.reply.is_closed());
        let live: std::collections::HashSet<String> =
            self.pending.values().map(|p| p.frame.client_msg_id.clone()).collect();
        self.pending_ids.retain(|id, _| live.contains(id));
    }

    async fn handle(&mut self, frame: pb::ServerFrame) -> Option<End> {
        match frame.frame? {
            InFrame::Message(message) => {
                let highest = self.highest.entry(message.conversation_id.clone()).or_insert(0);
                if message.seq <= *highest {
                    return None;
                }
                *highest = message.seq;
                let is_new = self.model.lock().unwrap_or_else(|e| e.into_inner()).apply(&message);
                if is_new {
                    self.refresh(vec![message.conversation_id.clone()]);
                }
                let (conversation, seq) = (message.conversation_id.clone(), message.seq);
                // Waiting here when the app lags is deliberate: it stops reading the stream.
                if self.events.send(Event::Message(message)).await.is_err() {
                    return Some(End::Closed);
                }
                let ack = self.acks.entry(conversation).or_insert(0);
                *ack = (*ack).max(seq);
            }
            InFrame::SendAck(ack) => {
                if let Some(pending) = self.take_pending(&ack.client_msg_id) {
                    let _ = pending.reply.send(Ok(ack));
                }
            }
            InFrame::Error(error) => {
                let code = Code::from_i32(error.code);
                let retriable = matches!(code, Code::Unavailable | Code::DeadlineExceeded | Code::Aborted);
                if !error.client_msg_id.is_empty() && retriable {
                    // The server could not finish it for now: it stays
                    // pending and goes again with the same id, alone.
                    self.retry_later(&error.client_msg_id, error.retry_after_ms);
                } else if !error.client_msg_id.is_empty() {
                    if let Some(pending) = self.take_pending(&error.client_msg_id) {
                        let _ = pending.reply.send(Err(Error::Rejected { code, message: error.message }));
                    }
                } else if code == Code::Unavailable && error.conversation_id.is_empty() {
                    // The gateway itself going away ("shutting down; reconnect").
                    // A read mark or typing hint the server could not take names its
                    // conversation: reported below, the stream stays.
                    return Some(lost(&error.message));
                } else {
                    let _ = self.events.send(Event::ServerError { code, message: error.message }).await;
                }
            }
            InFrame::Receipt(receipt) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_receipt(&receipt);
                let _ = self.events.send(Event::Receipt(receipt)).await;
            }
            InFrame::Typing(typing) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_typing(&typing);
                let _ = self.events.send(Event::Typing(typing)).await;
            }
            InFrame::Presence(update) => {
                self.model.lock().unwrap_or_else(|e| e.into_inner()).apply_presence(&update);
                let _ = self.events.send(Event::Presence(update)).await;
            }
            InFrame::Pong(_) | InFrame::Ready(_) => {}
        }
        None
    }

    /// Flushes acks and reads, half-closes the stream and lets the server
    /// finish what it was asked (bounded), so nothing already sent is cut off.
    async fn close_gracefully(
        &mut self,
        outbound: mpsc::Sender<ClientFrame>,
        inbound: &mut Streaming<pb::ServerFrame>,
    ) {
        self.flush_acks();
        let timeout = self.options.connect_timeout;
        let backlog = std::mem::take(&mut self.backlog);
        let send_rest = async {
            for frame in backlog {
                if outbound.send(frame).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, send_rest).await;
        drop(outbound);
        let drain = async {
            while let Ok(Some(frame)) = inbound.message().await {
                if self.handle(frame).await.is_some() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, drain).await;
    }

    /// Fetches members, title and cursors of conversations in the
    /// background: one `GetConversations` per `REFRESH_BATCH` of them (one
    /// `GetConversation` each from a server that refuses the batch).
    fn refresh(&self, conversation_ids: Vec<String>) {
        if conversation_ids.is_empty() {
            return;
        }
        let (mut api, model) = (self.api.current(), self.model.clone());
        tokio::spawn(async move {
            for batch in conversation_ids.chunks(REFRESH_BATCH) {
                let request = pb::GetConversationsRequest { conversation_ids: batch.to_vec() };
                let conversations = match api.get_conversations(request).await {
                    Ok(response) => response.into_inner().conversations,
                    // An older server, or one that takes fewer ids a call.
                    Err(status) if matches!(status.code(), Code::Unimplemented | Code::InvalidArgument) => {
                        let mut one_by_one = Vec::new();
                        for conversation_id in batch {
                            let request = pb::GetConversationRequest { conversation_id: conversation_id.clone() };
                            if let Ok(response) = api.get_conversation(request).await {
                                one_by_one.extend(response.into_inner().conversation);
                            }
                        }
                        one_by_one
                    }
                    Err(_) => continue,
                };
                let mut model = model.lock().unwrap_or_else(|e| e.into_inner());
                for conversation in &conversations {
                    model.refresh(conversation);
                }
            }
        });
    }

    /// Queues read marks and acks (coalesced per conversation) for sending.
    fn flush_acks(&mut self) {
        for (conversation_id, seq) in self.reads.drain() {
            self.backlog.push_back(ClientFrame {
                trace_context: Default::default(),
                frame: Some(OutFrame::Read(pb::Read { conversation_id, seq })),
            });
        }
        for (conversation_id, seq) in self.acks.drain() {
            self.backlog.push_back(ClientFrame {
                trace_context: Default::default(),
                frame: Some(OutFrame::Ack(pb::Ack { conversation_id, seq })),
            });
        }
    }
}

/// Conversations per `GetConversations` call when refreshing after a
/// reconnect: the server's default `message.conversations_per_call`.
const REFRESH_BATCH: usize = 100;

fn lost_or_fatal(status: Status, was_ready: bool) -> End {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument | Code::FailedPrecondition => {
            End::Fatal(Error::from(status))
        }
        _ => End::Lost { error: Error::from(status), was_ready },
    }
}

fn lost(reason: &str) -> End {
    End::Lost { error: Error::Unavailable(reason.to_owned()), was_ready: true }
}
