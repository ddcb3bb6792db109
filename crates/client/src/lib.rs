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
pub use messenger_proto::v1::{Conversation, HistoryResponse, ListConversationsResponse, Message, SendAck};
pub use options::Options;

/// Something that happened on the connection.
#[derive(Debug, Clone)]
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

#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub(crate) type Api = GatewayServiceClient<InterceptedService<Channel, Bearer>>;

/// A connected device. Cheap to clone; the connection closes when every clone is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<connection::Command>,
    api: Api,
    user_id: String,
    options: std::sync::Arc<Options>,
}

impl Client {
    /// Connects and waits until the server has accepted the session.
    /// Fails at once on a refused token; later drops are retried in the background.
    pub async fn connect(options: Options) -> Result<(Client, Events), Error> {
        options.validate()?;
        let endpoint = Endpoint::from_shared(options.endpoint.clone())
            .map_err(|e| Error::InvalidArgument(format!("endpoint: {e}")))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(options.ping_interval)
            .keep_alive_timeout(options.connect_timeout)
            .keep_alive_while_idle(true);
        let bearer = format!("Bearer {}", options.token)
            .parse()
            .map_err(|_| Error::InvalidArgument("token contains invalid characters".into()))?;
        let api = GatewayServiceClient::with_interceptor(endpoint.connect_lazy(), Bearer(bearer))
            .max_decoding_message_size(options.max_response_bytes);
        let (commands, command_rx) = mpsc::channel(options.max_pending_sends);
        let (events_tx, receiver) = mpsc::channel(options.event_buffer);
        let (ready_tx, ready_rx) = oneshot::channel();
        let options = std::sync::Arc::new(options);
        let task = connection::Task::new(options.clone(), api.clone(), command_rx, events_tx);
        tokio::spawn(task.run(ready_tx));
        let user_id = ready_rx.await.map_err(|_| Error::Closed)??;
        Ok((Client { commands, api, user_id, options }, Events { receiver }))
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
        let (reply, answer) = oneshot::channel();
        let frame = pb::SendRequestFrame {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
            body: body.to_owned(),
        };
        let size =
            prost::Message::encoded_len(&pb::ClientFrame { frame: Some(pb::client_frame::Frame::Send(frame.clone())) });
        if size > self.options.max_frame_bytes {
            return Err(Error::InvalidArgument(format!(
                "send frame is {size} bytes; the limit is {} bytes",
                self.options.max_frame_bytes
            )));
        }
        self.commands.send(connection::Command::Send { frame, reply }).await.map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.options.send_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The 1:1 conversation with `peer_id`, created on first use.
    pub async fn direct(&self, peer_id: &str) -> Result<Conversation, Error> {
        let request = pb::GetOrCreateDirectRequest { peer_id: peer_id.to_owned() };
        let response = self.api.clone().get_or_create_direct(request).await?.into_inner();
        response.conversation.ok_or_else(|| Error::Protocol("response without conversation".into()))
    }

    /// Messages before `before_seq` (0: the newest), ascending.
    pub async fn history(&self, conversation_id: &str, before_seq: u64, limit: u32) -> Result<HistoryResponse, Error> {
        let request = pb::HistoryRequest { conversation_id: conversation_id.to_owned(), before_seq, limit };
        Ok(self.api.clone().history(request).await?.into_inner())
    }

    /// The inbox, most recent activity first; pass `next_page_token` for the next page.
    pub async fn conversations(&self, page_token: &str, limit: u32) -> Result<ListConversationsResponse, Error> {
        let request = pb::ListConversationsRequest { page_token: page_token.to_owned(), limit };
        Ok(self.api.clone().list_conversations(request).await?.into_inner())
    }

    /// Closes the stream now (it also closes when every clone is dropped).
    pub async fn close(&self) {
        let _ = self.commands.send(connection::Command::Close).await;
    }
}
