//! The background task that owns the device's Connect stream.
//!
//! It keeps three pieces of state across reconnects: sends awaiting their ack
//! (resent with the same client id after a reconnect, so the server dedupes;
//! `connection/sends.rs`), the highest seq handed to the app per conversation
//! (anything at or below is a duplicate from resume and is dropped), and acks
//! not yet flushed. What comes in is handled in `connection/frames.rs`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use messenger_proto::v1::{self as pb, ClientFrame, client_frame::Frame as OutFrame, server_frame::Frame as InFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tracing::debug;

use crate::{Error, Event, Gateways, Options, model::Model};

mod frames;
mod sends;

use sends::Sends;

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

pub(crate) struct Task {
    options: Arc<Options>,
    api: Gateways,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Sends awaiting their answer (`connection/sends.rs`).
    sends: Sends,
    /// Frames waiting for room on the stream; the loop never blocks on sending.
    backlog: VecDeque<ClientFrame>,
    highest: HashMap<String, u64>,
    acks: HashMap<String, u64>,
    reads: HashMap<String, u64>,
    model: Arc<Mutex<Model>>,
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
            sends: Sends::default(),
            backlog: VecDeque::new(),
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
                self.sends.add(frame, trace, reply);
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
                    self.sends.fail_all(&error);
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
        self.backlog.clear();
        let resend = self.sends.resend_all();
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
                        let out = self.sends.add(frame, trace, reply);
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
                () = self.sends.retry_due(), if self.sends.retrying() => {
                    let due = self.sends.due();
                    self.backlog.extend(due);
                    None
                }
                _ = ping_tick.tick() => {
                    nonce += 1;
                    self.backlog.push_back(ClientFrame { trace_context: Default::default(), frame: Some(OutFrame::Ping(pb::Ping { nonce })) });
                    self.sends.drop_abandoned();
                    None
                }
            };
            if let Some(end) = closing {
                self.close_gracefully(outbound, &mut inbound).await;
                return end;
            }
        }
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
}

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
