//! One session over a WebSocket: the same session as a `Connect` stream
//! (`session.rs`), framed for browsers.
//!
//! Each binary message is one protobuf `ClientFrame` or `ServerFrame`. The
//! first client frame is `Hello` carrying `access_token` (a browser cannot
//! set headers on a WebSocket, and a token in the URL would land in logs).
//! When the session ends for an error the server sends that `Error` frame,
//! then closes with code 4000 + the gRPC status code (4016: sign in again;
//! 4008: slow down, `retry_after_ms`; 4014: reconnect).
//!
//! The server pings every `server.keepalive_interval`; a client from which
//! nothing arrives for that plus `server.keepalive_timeout`, or that takes
//! longer than `gateway.slow_consumer_timeout` to take a frame, is dropped
//! and its session ends (it resumes when it comes back).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use messenger_platform::auth::{TokenExpiry, Verifier};
use messenger_proto::v1::{ClientFrame, client_frame::Frame as In, server_frame::Frame as Out};
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::debug;

use crate::{
    Context,
    session::{self, Inbound, Unreadable},
};

/// Close reasons are at most 123 bytes (RFC 6455, 5.5).
const MAX_CLOSE_REASON: usize = 123;

type Sink = SplitSink<WebSocket, Message>;

/// How a connection is kept honest once its session runs.
#[derive(Clone, Copy)]
pub(crate) struct Liveness {
    /// A Ping goes out this often (`server.keepalive_interval`); a client
    /// from which nothing arrived for this plus `answer_within` is gone.
    pub ping_every: Duration,
    pub answer_within: Duration,
    /// Longest a frame may take to be written (`gateway.slow_consumer_timeout`):
    /// a client that stops reading is cut off, not waited for.
    pub write_within: Duration,
}

/// Serves one upgraded connection until either side ends it.
pub(crate) async fn run(
    context: Arc<Context>,
    verifier: Verifier,
    liveness: Liveness,
    peer: SocketAddr,
    socket: WebSocket,
) {
    let (mut sink, mut source) = socket.split();
    let hello = {
        // Waiting for the Hello counts toward the address's pre-Hello cap,
        // as on the gRPC port.
        let _waiting = match context.limits.pre_hello.take(peer.ip()) {
            Ok(waiting) => waiting,
            Err(status) => return close(&mut sink, &status, liveness).await,
        };
        tokio::time::timeout(context.options.hello_timeout, source.next()).await
    };
    let first = match hello {
        Err(_) => return close(&mut sink, &Status::deadline_exceeded("no Hello received in time"), liveness).await,
        Ok(None) => return,
        Ok(Some(message)) => match client_frame(message) {
            Some(Ok(frame)) => frame,
            Some(Err(unreadable)) => match unreadable.refusal() {
                Some(refusal) => return close(&mut sink, &refusal, liveness).await,
                None => return,
            },
            None => return,
        },
    };
    let (user, expiry, hello) = match authenticate(&context, &verifier, peer, first) {
        Ok(authenticated) => authenticated,
        Err(status) => return close(&mut sink, &status, liveness).await,
    };
    // Anything the client sends (a Pong too) shows it is there. When the
    // writer gives up on the client, the session's side ends as well.
    // When the client was last heard, in milliseconds since `opened`: an
    // atomic, not a lock, on every received message.
    let opened = Instant::now();
    let heard = Arc::new(AtomicU64::new(0));
    let writer_gone = CancellationToken::new();
    let hearing = heard.clone();
    let rest = source
        .inspect(move |_| hearing.store(opened.elapsed().as_millis() as u64, Ordering::Relaxed))
        .filter_map(|message| std::future::ready(client_frame(message)));
    let inbound: Inbound = futures::stream::once(std::future::ready(Ok(hello)))
        .chain(rest)
        .take_until(writer_gone.clone().cancelled_owned())
        .boxed();
    let mut frames = match session::open(&context, user, Some(expiry), Some(peer.ip()), inbound) {
        Ok(frames) => frames,
        Err(status) => return close(&mut sink, &status, liveness).await,
    };
    let mut ping = tokio::time::interval_at(Instant::now() + liveness.ping_every, liveness.ping_every);
    // The code of an Error frame that ends the stream (a drain's UNAVAILABLE),
    // for the close that follows it.
    let mut ending: Option<i32> = None;
    let end = loop {
        tokio::select! {
            outbound = frames.recv() => match outbound {
                Some(Ok(frame)) => {
                    ending = match &frame.frame {
                        Some(Out::Error(error)) if error.client_msg_id.is_empty() && error.conversation_id.is_empty() => {
                            Some(error.code)
                        }
                        _ => None,
                    };
                    if !write(&mut sink, Message::Binary(frame.encode_to_vec().into()), liveness).await {
                        break End::Gone;
                    }
                }
                Some(Err(status)) => break End::Refused(*status),
                None => break End::Finished(ending),
            },
            _ = ping.tick() => {
                let silent = opened.elapsed().saturating_sub(Duration::from_millis(heard.load(Ordering::Relaxed)));
                if silent > liveness.ping_every + liveness.answer_within {
                    debug!(%peer, ?silent, "websocket client gone: no answer to pings");
                    break End::Gone;
                }
                if !write(&mut sink, Message::Ping(Default::default()), liveness).await {
                    break End::Gone;
                }
            }
        }
    };
    writer_gone.cancel();
    match end {
        End::Gone => {}
        End::Refused(status) => close(&mut sink, &status, liveness).await,
        End::Finished(code) => {
            let code = code.map_or(1000, |code| 4000 + code as u16);
            let close = Message::Close(Some(CloseFrame { code, reason: "".into() }));
            write(&mut sink, close, liveness).await;
        }
    }
}

/// How the writer stopped.
enum End {
    /// The client stopped reading or answering: nothing more is written.
    Gone,
    /// The session ended for this status: its Error frame and close code.
    Refused(Status),
    /// The session ended; the code of the Error frame that ended it, if any.
    Finished(Option<i32>),
}

/// Writes one message within `write_within`; false when the client did not take it.
async fn write(sink: &mut Sink, message: Message, liveness: Liveness) -> bool {
    matches!(tokio::time::timeout(liveness.write_within, sink.send(message)).await, Ok(Ok(())))
}

/// The caller of the first frame, which must be a Hello with a valid token;
/// the token is taken out before the session sees the frame. The address's
/// call limit is checked first, as for every call (`api::interceptor`).
fn authenticate(
    context: &Context,
    verifier: &Verifier,
    peer: SocketAddr,
    mut first: ClientFrame,
) -> Result<(String, TokenExpiry, ClientFrame), Status> {
    context.limits.calls_per_address.check(&peer.ip().to_string())?;
    let Some(In::Hello(hello)) = &mut first.frame else {
        return Err(Status::failed_precondition("the first frame must be Hello"));
    };
    let token = std::mem::take(&mut hello.access_token);
    if token.is_empty() {
        return Err(Status::unauthenticated("Hello carries no access_token"));
    }
    let claims = verifier.verify(&token).map_err(Status::from)?;
    Ok((claims.sub, TokenExpiry(claims.exp), first))
}

/// One WebSocket message as a client frame: None for control messages (and
/// a close, which ends the stream after it), an error the session reports
/// for what it cannot read.
fn client_frame(message: Result<Message, axum::Error>) -> Option<Result<ClientFrame, Unreadable>> {
    match message {
        Ok(Message::Binary(bytes)) => Some(
            ClientFrame::decode(bytes)
                .map_err(|error| Unreadable::NotAFrame(format!("a message is not a ClientFrame: {error}"))),
        ),
        Ok(Message::Text(_)) => Some(Err(Unreadable::NotAFrame(
            "this stream carries binary protobuf frames (ClientFrame), not text".into(),
        ))),
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => None,
        Err(error) => {
            let too_large = std::error::Error::source(&error)
                .and_then(|source| source.downcast_ref::<tokio_tungstenite::tungstenite::Error>())
                .is_some_and(|error| matches!(error, tokio_tungstenite::tungstenite::Error::Capacity(_)));
            debug!(%error, "websocket read failed");
            Some(Err(if too_large { Unreadable::TooLarge(error.to_string()) } else { Unreadable::Gone }))
        }
    }
}

/// Tells the client why its stream ends: the Error frame, then a close with
/// code 4000 + the gRPC code (each write bounded like every other).
async fn close(sink: &mut Sink, status: &Status, liveness: Liveness) {
    let frame = session::status_frame(status, "", "");
    if !write(sink, Message::Binary(frame.encode_to_vec().into()), liveness).await {
        return;
    }
    let mut reason = status.message();
    if reason.len() > MAX_CLOSE_REASON {
        let mut end = MAX_CLOSE_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    let code = 4000 + status.code() as u16;
    write(sink, Message::Close(Some(CloseFrame { code, reason: reason.into() })), liveness).await;
}
