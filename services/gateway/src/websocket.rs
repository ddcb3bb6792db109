//! One session over a WebSocket: the same session as a `Connect` stream
//! (`session.rs`), framed for browsers.
//!
//! Each binary message is one protobuf `ClientFrame` or `ServerFrame`. The
//! first client frame is `Hello` carrying `access_token` (a browser cannot
//! set headers on a WebSocket, and a token in the URL would land in logs).
//! When the session ends for an error the server sends that `Error` frame,
//! then closes with code 4000 + the gRPC status code (4016: sign in again;
//! 4008: slow down, `retry_after_ms`; 4014: reconnect).

use std::{net::SocketAddr, sync::Arc};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use messenger_platform::auth::{TokenExpiry, Verifier};
use messenger_proto::v1::{ClientFrame, client_frame::Frame as In};
use prost::Message as _;
use tonic::Status;
use tracing::debug;

use crate::{
    Context,
    session::{self, Inbound},
};

/// Close reasons are at most 123 bytes (RFC 6455, 5.5).
const MAX_CLOSE_REASON: usize = 123;

type Sink = SplitSink<WebSocket, Message>;

/// Serves one upgraded connection until either side ends it.
pub(crate) async fn run(context: Arc<Context>, verifier: Verifier, peer: SocketAddr, socket: WebSocket) {
    let (mut sink, mut source) = socket.split();
    let hello = {
        // Waiting for the Hello counts toward the address's pre-Hello cap,
        // as on the gRPC port.
        let _waiting = match context.limits.pre_hello.take(peer.ip()) {
            Ok(waiting) => waiting,
            Err(status) => return close(&mut sink, &status).await,
        };
        tokio::time::timeout(context.options.hello_timeout, source.next()).await
    };
    let first = match hello {
        Err(_) => return close(&mut sink, &Status::deadline_exceeded("no Hello received in time")).await,
        Ok(None) => return,
        Ok(Some(message)) => match client_frame(message) {
            Some(Ok(frame)) => frame,
            Some(Err(status)) => return close(&mut sink, &status).await,
            None => return,
        },
    };
    let (user, expiry, hello) = match authenticate(&context, &verifier, peer, first) {
        Ok(authenticated) => authenticated,
        Err(status) => return close(&mut sink, &status).await,
    };
    let rest = source.filter_map(|message| std::future::ready(client_frame(message)));
    let inbound: Inbound = futures::stream::once(std::future::ready(Ok(hello))).chain(rest).boxed();
    let mut frames = match session::open(&context, user, Some(expiry), Some(peer.ip()), inbound) {
        Ok(frames) => frames,
        Err(status) => return close(&mut sink, &status).await,
    };
    while let Some(outbound) = frames.recv().await {
        match outbound {
            Ok(frame) => {
                if sink.send(Message::Binary(frame.encode_to_vec().into())).await.is_err() {
                    return;
                }
            }
            Err(status) => return close(&mut sink, &status).await,
        }
    }
    let _ = sink.send(Message::Close(Some(CloseFrame { code: 1000, reason: "".into() }))).await;
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
fn client_frame(message: Result<Message, axum::Error>) -> Option<Result<ClientFrame, Status>> {
    match message {
        Ok(Message::Binary(bytes)) => Some(
            ClientFrame::decode(bytes)
                .map_err(|error| Status::invalid_argument(format!("a message is not a ClientFrame: {error}"))),
        ),
        Ok(Message::Text(_)) => {
            Some(Err(Status::invalid_argument("this stream carries binary protobuf frames (ClientFrame), not text")))
        }
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => None,
        Err(error) => {
            let too_large = std::error::Error::source(&error)
                .and_then(|source| source.downcast_ref::<tokio_tungstenite::tungstenite::Error>())
                .is_some_and(|error| matches!(error, tokio_tungstenite::tungstenite::Error::Capacity(_)));
            debug!(%error, "websocket read failed");
            // Out of range is what tonic reports for an oversized frame: the
            // session answers it the same way on both transports.
            too_large.then(|| Err(Status::out_of_range(error.to_string())))
        }
    }
}

/// Tells the client why its stream ends: the Error frame, then a close with
/// code 4000 + the gRPC code.
async fn close(sink: &mut Sink, status: &Status) {
    let frame = session::status_frame(status, "", "");
    let _ = sink.send(Message::Binary(frame.encode_to_vec().into())).await;
    let mut reason = status.message();
    if reason.len() > MAX_CLOSE_REASON {
        let mut end = MAX_CLOSE_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    let code = 4000 + status.code() as u16;
    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}
