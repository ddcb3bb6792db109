//! The Rust client SDK: what a native app embeds to talk to a messenger gateway.
//!
//! [`Client::connect`] opens the device's `Connect` stream and keeps it open:
//! it reconnects with jittered exponential backoff and resumes from the
//! server-side cursor, so the app sees every message exactly once and in
//! order per conversation (duplicates after a reconnect are dropped by
//! `(conversation, seq)`). [`Client::send`] is idempotent: a send that was in
//! flight when the connection dropped is retried with the same client id and
//! answered with the original seq. Delivered messages are acked automatically.
//!
//! Layout:
//! - `options.rs`: [`Options`], every knob with its default.
//! - `connection.rs`: the background task that owns the stream.
//! - `error.rs`: [`Error`].
//! - `media.rs`: [`Client::send_file`], uploads (resumable, in parts above a
//!   threshold) and downloads through the URLs the server signs.
//!
//! ```no_run
//! # async fn example() -> Result<(), messenger_client::Error> {
//! use messenger_client::{Client, Event, Options};
//! let (client, mut events) = Client::connect(Options::new("http://127.0.0.1:7700", "TOKEN", "phone-1")).await?;
//! let conversation = client.direct("bob").await?;
//! let ack = client.send(&conversation.conversation_id, "hello").await?;
//! println!("stored as seq {}", ack.seq);
//! while let Some(event) = events.next().await {
//!     if let Event::Message(message) = event {
//!         println!("{}: {}", message.sender_id, message.body);
//!     }
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod connection;
mod error;
mod media;
mod model;
mod options;

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use messenger_proto::v1::{self as pb, gateway_service_client::GatewayServiceClient};
use tokio::sync::{mpsc, oneshot};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

pub use error::Error;
pub use media::{File, Progress};
pub use messenger_proto::v1::Attachment;
pub use messenger_proto::v1::{
    BlockedUser, Conversation, GetReceiptsResponse, HistoryResponse, ListConversationsResponse, Message, MessageKind,
    PresenceUpdate, PushDevice, PushPlatform, Receipt, RegisterPushDeviceResponse, Role, SendAck, Typing,
    WebPushSubscription,
};
pub use model::{ConversationState, MessageState};
pub use options::{Options, TlsOptions, TokenProvider};

/// A W3C trace context (`traceparent`, `tracestate`) an app hands to
/// [`Client::send_traced`].
pub type TraceContext = std::collections::HashMap<String, String>;

/// Something that happened on the connection.
#[derive(Debug, Clone)]
// Messages are nearly every event: boxing them would cost an allocation each
// to shrink the rare others.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// The stream is (again) open; backlog sync follows.
    Connected { session_id: String },
    /// The stream dropped (sent once per lost connection, not per failed
    /// attempt); the client reconnects by itself unless `will_retry` is false.
    Disconnected { reason: String, will_retry: bool },
    /// A new message, never one seen before by this client.
    Message(Message),
    /// The server rejected a frame that was not a send.
    ServerError { code: tonic::Code, message: String },
    /// A member's read or delivered cursor moved (already applied to the model).
    Receipt(Receipt),
    /// A member started or stopped typing (already applied to the model).
    Typing(Typing),
    /// A contact (someone in a small conversation with this user) came online
    /// or went offline (already applied: see [`Client::presence`]).
    Presence(PresenceUpdate),
}

/// The app's side of the event stream. Reading it is what lets the client
/// ack messages; an app that stops reading eventually gets disconnected and
/// resumes later, losing nothing.
pub struct Events {
    receiver: mpsc::Receiver<Event>,
}

impl Events {
    pub async fn next(&mut self) -> Option<Event> {
        self.receiver.recv().await
    }
}

impl futures::Stream for Events {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.receiver.poll_recv(cx)
    }
}

/// The `authorization` header of every call; replaced when a token provider
/// hands out a fresh token, for every gateway at once.
#[derive(Clone)]
pub(crate) struct Bearer(std::sync::Arc<std::sync::RwLock<MetadataValue<Ascii>>>);

impl Bearer {
    fn new(token: &str) -> Result<Self, Error> {
        Ok(Self(std::sync::Arc::new(std::sync::RwLock::new(bearer_value(token)?))))
    }

    pub(crate) fn set(&self, token: &str) -> Result<(), Error> {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = bearer_value(token)?;
        Ok(())
    }
}

fn bearer_value(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    format!("Bearer {token}").parse().map_err(|_| Error::InvalidArgument("token contains invalid characters".into()))
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub(crate) type Api = GatewayServiceClient<InterceptedService<Channel, Bearer>>;

/// The gateway endpoints, in the order they are tried: the one in use, and
/// the next one after a lost connection.
#[derive(Clone)]
pub(crate) struct Gateways {
    apis: std::sync::Arc<Vec<Api>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) bearer: Bearer,
}

impl Gateways {
    pub(crate) fn current(&self) -> Api {
        let index = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.apis.len();
        self.apis[index].clone()
    }

    /// Moves on to the next endpoint; false when there is only one.
    pub(crate) fn fail_over(&self) -> bool {
        self.current.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.apis.len() > 1
    }

    pub(crate) fn len(&self) -> usize {
        self.apis.len()
    }

    /// A call that is safe to repeat: on UNAVAILABLE (a gateway unreachable,
    /// or a service behind it briefly unable to answer) it is tried again up
    /// to `RETRIES` times, on the next gateway when there is one, after a
    /// short growing pause.
    async fn retried<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Api) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        const RETRIES: u32 = 3;
        let mut attempt = 0;
        loop {
            match call(self.current()).await {
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < RETRIES => {
                    // Straight on to another gateway; the same one after a pause.
                    if !self.fail_over() || attempt > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                    }
                    attempt += 1;
                }
                answered => return answered,
            }
        }
    }

    /// A call that must not be repeated (it may have taken effect): the next
    /// call goes to the next gateway if this one was unreachable.
    async fn once<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let answer = call.await;
        if matches!(&answer, Err(status) if status.code() == tonic::Code::Unavailable) {
            self.fail_over();
        }
        answer
    }
}

/// A connected device. Cheap to clone; the connection closes when every clone is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<connection::Command>,
    api: Gateways,
    user_id: String,
    options: std::sync::Arc<Options>,
    model: std::sync::Arc<std::sync::Mutex<model::Model>>,
}

impl Client {
    /// Connects and waits until the server has accepted the session.
    /// Fails at once on a refused token; later drops are retried in the background.
    pub async fn connect(options: Options) -> Result<(Client, Events), Error> {
        options.validate()?;
        let bearer = Bearer::new(&options.token)?;
        let mut apis = Vec::new();
        for address in std::iter::once(&options.endpoint).chain(&options.fallback_endpoints) {
            let invalid = |e: tonic::transport::Error| Error::InvalidArgument(format!("endpoint {address}: {e}"));
            let mut endpoint = Endpoint::from_shared(address.clone()).map_err(invalid)?;
            if address.starts_with("https://") {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                tls = match &options.tls.ca_pem {
                    Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                    None => tls.with_webpki_roots(),
                };
                if let Some(name) = &options.tls.server_name {
                    tls = tls.domain_name(name.clone());
                }
                endpoint = endpoint.tls_config(tls).map_err(invalid)?;
            }
            let endpoint = endpoint
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(options.ping_interval)
                .keep_alive_timeout(options.connect_timeout)
                .keep_alive_while_idle(true)
                .local_address(options.local_address);
            apis.push(
                GatewayServiceClient::with_interceptor(endpoint.connect_lazy(), bearer.clone())
                    .max_decoding_message_size(options.max_response_bytes),
            );
        }
        let api = Gateways { apis: std::sync::Arc::new(apis), current: std::sync::Arc::default(), bearer };
        let (commands, command_rx) = mpsc::channel(options.max_pending_sends);
        let (events_tx, receiver) = mpsc::channel(options.event_buffer);
        let (ready_tx, ready_rx) = oneshot::channel();
        let options = std::sync::Arc::new(options);
        let model = std::sync::Arc::new(std::sync::Mutex::new(model::Model::default()));
        let task = connection::Task::new(options.clone(), api.clone(), command_rx, events_tx, model.clone());
        tokio::spawn(task.run(ready_tx));
        let user_id = ready_rx.await.map_err(|_| Error::Closed)??;
        model.lock().unwrap_or_else(|e| e.into_inner()).me = user_id.clone();
        Ok((Client { commands, api, user_id, options, model }, Events { receiver }))
    }

    /// The authenticated user, as the server sees it (the token's subject).
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Sends with a new client message id; see [`Client::send_with_id`].
    pub async fn send(&self, conversation_id: &str, body: &str) -> Result<SendAck, Error> {
        self.send_with_id(conversation_id, &uuid::Uuid::now_v7().to_string(), body).await
    }

    /// Sends a message and waits for its durable ack. Retrying with the same
    /// `client_msg_id` (after a timeout, say) returns the original ack.
    pub async fn send_with_id(&self, conversation_id: &str, client_msg_id: &str, body: &str) -> Result<SendAck, Error> {
        self.send_frame(pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            body: body.to_owned(),
            reply_to_seq: 0,
            media_ids: Vec::new(),
        })
        .await
    }

    /// As [`Client::send_with_id`], continuing the app's trace: `trace_context`
    /// holds its W3C `traceparent` (and `tracestate`), e.g. what an
    /// OpenTelemetry propagator injects into a `HashMap`. The server's spans
    /// for this message (gateway, message service, store, fan-out, delivery)
    /// join that trace.
    pub async fn send_traced(
        &self,
        conversation_id: &str,
        client_msg_id: &str,
        body: &str,
        trace_context: TraceContext,
    ) -> Result<SendAck, Error> {
        let frame = pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            body: body.to_owned(),
            reply_to_seq: 0,
            media_ids: Vec::new(),
        };
        self.send_frame_traced(frame, trace_context).await
    }

    /// Sends a reply to the message at `reply_to_seq`.
    pub async fn reply(&self, conversation_id: &str, reply_to_seq: u64, body: &str) -> Result<SendAck, Error> {
        self.send_frame(pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: uuid::Uuid::now_v7().to_string(),
            body: body.to_owned(),
            reply_to_seq,
            media_ids: Vec::new(),
        })
        .await
    }

    async fn send_frame(&self, frame: pb::SendRequestFrame) -> Result<SendAck, Error> {
        self.send_frame_traced(frame, TraceContext::new()).await
    }

    async fn send_frame_traced(&self, frame: pb::SendRequestFrame, trace: TraceContext) -> Result<SendAck, Error> {
        let (reply, answer) = oneshot::channel();
        let size = prost::Message::encoded_len(&pb::ClientFrame {
            frame: Some(pb::client_frame::Frame::Send(frame.clone())),
            trace_context: trace.clone(),
        });
        if size > self.options.max_frame_bytes {
            return Err(Error::InvalidArgument(format!(
                "send frame is {size} bytes; the limit is {} bytes",
                self.options.max_frame_bytes
            )));
        }
        self.commands.send(connection::Command::Send { frame, trace, reply }).await.map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.options.send_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The 1:1 conversation with `peer_id`, created on first use.
    pub async fn direct(&self, peer_id: &str) -> Result<Conversation, Error> {
        let request = pb::GetOrCreateDirectRequest { peer_id: peer_id.to_owned() };
        let response = self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.get_or_create_direct(request).await }
            })
            .await?
            .into_inner();
        response.conversation.ok_or_else(|| Error::Protocol("response without conversation".into()))
    }

    /// Messages before `before_seq` (0: the newest), ascending.
    pub async fn history(&self, conversation_id: &str, before_seq: u64, limit: u32) -> Result<HistoryResponse, Error> {
        let request = pb::HistoryRequest { conversation_id: conversation_id.to_owned(), before_seq, limit };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.history(request).await }
            })
            .await?
            .into_inner())
    }

    /// The inbox, most recent activity first; pass `next_page_token` for the next page.
    pub async fn conversations(&self, page_token: &str, limit: u32) -> Result<ListConversationsResponse, Error> {
        let request = pb::ListConversationsRequest { page_token: page_token.to_owned(), limit };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.list_conversations(request).await }
            })
            .await?
            .into_inner())
    }

    /// Marks everything up to `seq` read; sent with the next acks (kept while offline).
    pub async fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<(), Error> {
        let command = connection::Command::Read { conversation_id: conversation_id.to_owned(), seq };
        self.commands.send(command).await.map_err(|_| Error::Closed)
    }

    /// Tells the other members this user is (or stopped) typing. Best effort:
    /// dropped while offline and when sent faster than the server allows.
    pub async fn typing(&self, conversation_id: &str, typing: bool) -> Result<(), Error> {
        let command = connection::Command::Typing { conversation_id: conversation_id.to_owned(), typing };
        self.commands.send(command).await.map_err(|_| Error::Closed)
    }

    /// Creates a group with the caller as owner.
    pub async fn create_group(&self, title: &str, member_ids: &[&str]) -> Result<Conversation, Error> {
        let request = pb::CreateGroupRequest {
            title: title.to_owned(),
            member_ids: member_ids.iter().map(|m| m.to_string()).collect(),
        };
        let response = self.api.once(self.api.current().create_group(request)).await?.into_inner();
        response.conversation.ok_or_else(|| Error::Protocol("response without conversation".into()))
    }

    async fn update_group(
        &self,
        conversation_id: &str,
        change: pb::update_group_request::Change,
    ) -> Result<Option<Message>, Error> {
        let request = pb::UpdateGroupRequest { conversation_id: conversation_id.to_owned(), change: Some(change) };
        Ok(self.api.once(self.api.current().update_group(request)).await?.into_inner().event)
    }

    pub async fn add_members(&self, conversation_id: &str, user_ids: &[&str]) -> Result<Option<Message>, Error> {
        let list = pb::MemberList { user_ids: user_ids.iter().map(|u| u.to_string()).collect() };
        self.update_group(conversation_id, pb::update_group_request::Change::AddMembers(list)).await
    }

    pub async fn remove_member(&self, conversation_id: &str, user_id: &str) -> Result<Option<Message>, Error> {
        self.update_group(conversation_id, pb::update_group_request::Change::RemoveMember(user_id.to_owned())).await
    }

    pub async fn leave(&self, conversation_id: &str) -> Result<Option<Message>, Error> {
        self.update_group(conversation_id, pb::update_group_request::Change::Leave(true)).await
    }

    pub async fn rename(&self, conversation_id: &str, title: &str) -> Result<Option<Message>, Error> {
        self.update_group(conversation_id, pb::update_group_request::Change::Rename(title.to_owned())).await
    }

    pub async fn set_role(&self, conversation_id: &str, user_id: &str, role: Role) -> Result<Option<Message>, Error> {
        let change = pb::RoleChange { user_id: user_id.to_owned(), role: role as i32 };
        self.update_group(conversation_id, pb::update_group_request::Change::SetRole(change)).await
    }

    async fn modify(
        &self,
        conversation_id: &str,
        target_seq: u64,
        change: pb::modify_message_request::Change,
    ) -> Result<Option<Message>, Error> {
        let request =
            pb::ModifyMessageRequest { conversation_id: conversation_id.to_owned(), target_seq, change: Some(change) };
        Ok(self.api.once(self.api.current().modify_message(request)).await?.into_inner().event)
    }

    /// Replaces the body of one's own message (within the server's edit window).
    pub async fn edit(&self, conversation_id: &str, seq: u64, body: &str) -> Result<Option<Message>, Error> {
        self.modify(conversation_id, seq, pb::modify_message_request::Change::Edit(body.to_owned())).await
    }

    /// Deletes a message for everyone; its body leaves the server.
    pub async fn delete(&self, conversation_id: &str, seq: u64) -> Result<Option<Message>, Error> {
        self.modify(conversation_id, seq, pb::modify_message_request::Change::Delete(true)).await
    }

    /// Sets this user's reaction (one per message); an empty emoji removes it.
    pub async fn react(&self, conversation_id: &str, seq: u64, emoji: &str) -> Result<Option<Message>, Error> {
        self.modify(conversation_id, seq, pb::modify_message_request::Change::React(emoji.to_owned())).await
    }

    /// The conversation with members, roles and cursors, as the server has it.
    pub async fn get_conversation(&self, conversation_id: &str) -> Result<Conversation, Error> {
        let request = pb::GetConversationRequest { conversation_id: conversation_id.to_owned() };
        let conversation = self
            .api
            .current()
            .get_conversation(request)
            .await?
            .into_inner()
            .conversation
            .ok_or_else(|| Error::Protocol("response without conversation".into()))?;
        self.model.lock().unwrap_or_else(|e| e.into_inner()).refresh(&conversation);
        Ok(conversation)
    }

    /// Who (besides the caller) has received and read the message at `seq`.
    pub async fn receipts(&self, conversation_id: &str, seq: u64) -> Result<GetReceiptsResponse, Error> {
        let request = pb::GetReceiptsRequest { conversation_id: conversation_id.to_owned(), seq };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.get_receipts(request).await }
            })
            .await?
            .into_inner())
    }

    /// Blocks `user_id`: they can no longer open a direct conversation with
    /// this user nor send in one, and no longer see this user's presence.
    /// Returns false when they were blocked already. Idempotent, so retried.
    pub async fn block(&self, user_id: &str) -> Result<bool, Error> {
        let request = pb::BlockUserRequest { user_id: user_id.to_owned() };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.block_user(request).await }
            })
            .await?
            .into_inner()
            .changed)
    }

    /// Unblocks `user_id`; false when they were not blocked.
    pub async fn unblock(&self, user_id: &str) -> Result<bool, Error> {
        let request = pb::UnblockUserRequest { user_id: user_id.to_owned() };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.unblock_user(request).await }
            })
            .await?
            .into_inner()
            .changed)
    }

    /// Everyone this user has blocked, oldest block first.
    pub async fn blocked_users(&self) -> Result<Vec<BlockedUser>, Error> {
        Ok(self
            .api
            .retried(|mut api| async move { api.list_blocked_users(pb::ListBlockedUsersRequest {}).await })
            .await?
            .into_inner()
            .users)
    }

    /// Registers where this device is pushed while it is offline (its
    /// `device_id` is set to this client's). Registering again replaces the
    /// registration. For a webhook, the answer carries the signing secret.
    pub async fn register_push_device(&self, mut device: PushDevice) -> Result<RegisterPushDeviceResponse, Error> {
        device.device_id = self.options.device_id.clone();
        let request = pb::RegisterPushDeviceRequest { device: Some(device) };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.register_push_device(request).await }
            })
            .await?
            .into_inner())
    }

    /// Stops pushes to `device_id` (this device or another of this user's);
    /// false when it was not registered.
    pub async fn unregister_push_device(&self, device_id: &str) -> Result<bool, Error> {
        let request = pb::UnregisterPushDeviceRequest { device_id: device_id.to_owned() };
        Ok(self
            .api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.unregister_push_device(request).await }
            })
            .await?
            .into_inner()
            .removed)
    }

    /// This user's push registrations (without tokens), by device id.
    pub async fn push_devices(&self) -> Result<Vec<PushDevice>, Error> {
        Ok(self
            .api
            .retried(|mut api| async move { api.list_push_devices(pb::ListPushDevicesRequest {}).await })
            .await?
            .into_inner()
            .devices)
    }

    /// Mutes a conversation's pushes on every device of this user until
    /// `until_ms` (milliseconds since the epoch; 0 unmutes).
    pub async fn mute(&self, conversation_id: &str, until_ms: i64) -> Result<(), Error> {
        self.set_mute(conversation_id, until_ms, false).await
    }

    /// As [`Client::mute`], but messages that mention this user ("@" and
    /// the user id in the body) are still pushed.
    pub async fn mute_except_mentions(&self, conversation_id: &str, until_ms: i64) -> Result<(), Error> {
        self.set_mute(conversation_id, until_ms, true).await
    }

    async fn set_mute(&self, conversation_id: &str, until_ms: i64, mentions_only: bool) -> Result<(), Error> {
        let request = pb::MuteConversationRequest {
            conversation_id: conversation_id.to_owned(),
            muted_until_ms: until_ms,
            mentions_only,
        };
        self.api
            .retried(|mut api| {
                let request = request.clone();
                async move { api.mute_conversation(request).await }
            })
            .await?;
        Ok(())
    }

    /// This device's current view of a conversation.
    pub fn conversation_state(&self, conversation_id: &str) -> Option<ConversationState> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).conversations.get(conversation_id).cloned()
    }

    /// The last presence update received for `user_id` (None: none yet).
    pub fn presence(&self, user_id: &str) -> Option<PresenceUpdate> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).presence.get(user_id).cloned()
    }

    /// Members typing in a conversation right now.
    pub fn typing_in(&self, conversation_id: &str) -> Vec<String> {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).typing(conversation_id)
    }

    /// Closes the stream and stays offline (sends and reads queue up) until
    /// [`Client::go_online`]; what an app does when it moves to the background.
    pub async fn go_offline(&self) {
        let _ = self.commands.send(connection::Command::Offline).await;
    }

    /// Reconnects after [`Client::go_offline`] and resumes from the cursor.
    pub async fn go_online(&self) {
        let _ = self.commands.send(connection::Command::Online).await;
    }

    /// Closes the stream now (it also closes when every clone is dropped).
    pub async fn close(&self) {
        let _ = self.commands.send(connection::Command::Close).await;
    }
}
