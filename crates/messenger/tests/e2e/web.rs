//! The gateway's browser port, spoken as a browser does: the session over a
//! WebSocket, the unary API over gRPC-Web, origin checks and CORS, and CORS
//! on the embedded object store. (`web/tests` drives the web app itself in
//! Chromium.)

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use messenger_proto::v1::{self as pb, client_frame::Frame as In, server_frame::Frame as Out};
use prost::Message as _;
use tokio_tungstenite::tungstenite::{
    Message,
    client::IntoClientRequest,
    http::{HeaderValue, StatusCode},
};

use crate::support::*;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn web_address(system: &TestSystem) -> String {
    system.running.as_ref().unwrap().addresses.web.expect("the browser port is on").to_string()
}

/// Opens `/v1/stream` with `origin` (None: no header, as a non-browser client).
async fn open(system: &TestSystem, origin: Option<&str>) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{}/v1/stream", web_address(system)).into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("messenger.v1"));
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    tokio_tungstenite::connect_async(request).await.map(|(socket, _)| socket)
}

async fn send(socket: &mut Socket, frame: In) {
    let frame = pb::ClientFrame { frame: Some(frame), trace_context: Default::default() };
    socket.send(Message::Binary(frame.encode_to_vec().into())).await.unwrap();
}

async fn hello(socket: &mut Socket, device: &str, token: &str) {
    send(socket, In::Hello(pb::Hello { device_id: device.into(), access_token: token.into() })).await;
}

/// The next server frame; panics on a close or after `WAIT`.
async fn next_frame(socket: &mut Socket) -> Out {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next()).await.expect("no frame in time");
        match message.expect("stream ended").unwrap() {
            Message::Binary(bytes) => return pb::ServerFrame::decode(bytes).unwrap().frame.unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The Error frame and the close code that end a refused stream.
async fn refusal(socket: &mut Socket) -> (pb::Error, u16) {
    let Out::Error(error) = next_frame(socket).await else { panic!("expected an Error frame") };
    let message = tokio::time::timeout(WAIT, socket.next()).await.expect("no close in time");
    match message {
        Some(Ok(Message::Close(Some(close)))) => (error, u16::from(close.code)),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_browser_session_chats_with_a_grpc_one_over_the_websocket() {
    let system = TestSystem::start().await;
    let (bob, mut bob_events) = system.connect("bob", "bob-phone").await;
    let conversation = bob.direct("alice").await.unwrap();

    let mut alice = open(&system, None).await.unwrap();
    hello(&mut alice, "alice-browser", &system.token("alice")).await;
    let Out::Ready(ready) = next_frame(&mut alice).await else { panic!("expected Ready") };
    assert_eq!(ready.user_id, "alice");

    bob.send(&conversation.conversation_id, "hi from grpc").await.unwrap();
    let Out::Message(message) = next_frame(&mut alice).await else { panic!("expected the message") };
    assert_eq!((message.body.as_str(), message.sender_id.as_str()), ("hi from grpc", "bob"));

    let send_frame = pb::SendRequestFrame {
        conversation_id: conversation.conversation_id.clone(),
        client_msg_id: "browser-1".into(),
        body: "hi from the browser".into(),
        ..Default::default()
    };
    send(&mut alice, In::Send(send_frame)).await;
    let ack = loop {
        match next_frame(&mut alice).await {
            Out::SendAck(ack) => break ack,
            _ => continue,
        }
    };
    assert_eq!(ack.client_msg_id, "browser-1");
    // Bob's devices get his own message too; the next one is alice's.
    let own = next_message(&mut bob_events).await;
    assert_eq!((own.sender_id.as_str(), own.body.as_str()), ("bob", "hi from grpc"));
    let reply = next_message(&mut bob_events).await;
    assert_eq!((reply.sender_id.as_str(), reply.body.as_str()), ("alice", "hi from the browser"));
}

/// A system whose browser port also serves pages of https://chat.example.com.
async fn allowing_chat_example_com() -> TestSystem {
    TestSystem::start_with(|config| config.gateway.web.allowed_origins = vec!["https://chat.example.com".into()]).await
}

#[tokio::test]
async fn a_stream_from_an_origin_not_allowed_is_refused_before_the_upgrade() {
    let system = allowing_chat_example_com().await;
    let own = format!("http://{}", web_address(&system));
    for refused in ["https://evil.example.com", "null", "http://chat.example.com"] {
        match open(&system, Some(refused)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::FORBIDDEN, "{refused}")
            }
            other => panic!("{refused}: expected 403, got {:?}", other.map(|_| "an open stream")),
        }
    }
    for allowed in [own.as_str(), "https://chat.example.com", "HTTPS://Chat.Example.com"] {
        let mut socket = open(&system, Some(allowed)).await.unwrap_or_else(|error| panic!("{allowed}: {error}"));
        hello(&mut socket, "d", &system.token("alice")).await;
        assert!(matches!(next_frame(&mut socket).await, Out::Ready(_)), "{allowed}");
    }
}

#[tokio::test]
async fn a_hello_without_a_valid_token_ends_the_stream_unauthenticated() {
    let system = TestSystem::start().await;
    for token in ["", "not-a-jwt"] {
        let mut socket = open(&system, None).await.unwrap();
        hello(&mut socket, "d", token).await;
        let (error, close) = refusal(&mut socket).await;
        assert_eq!((error.code, close), (tonic::Code::Unauthenticated as i32, 4016), "{token:?}");
    }
    // A first frame that is not Hello is refused as on the gRPC port.
    let mut socket = open(&system, None).await.unwrap();
    send(&mut socket, In::Ping(pb::Ping { nonce: 1 })).await;
    let (error, close) = refusal(&mut socket).await;
    assert_eq!((error.code, close), (tonic::Code::FailedPrecondition as i32, 4009));
}

#[tokio::test]
async fn frames_it_cannot_read_end_the_stream_with_the_reason() {
    let system = TestSystem::start().await;
    let max = system.config.server.max_message_bytes;
    // One byte over server.max_message_bytes: RESOURCE_EXHAUSTED, 4008.
    let mut socket = open(&system, None).await.unwrap();
    hello(&mut socket, "d", &system.token("alice")).await;
    assert!(matches!(next_frame(&mut socket).await, Out::Ready(_)));
    socket.send(Message::Binary(vec![0u8; max + 1].into())).await.unwrap();
    let (error, close) = refusal(&mut socket).await;
    assert_eq!((error.code, close), (tonic::Code::ResourceExhausted as i32, 4008), "{}", error.message);
    // At the limit it is read (and is not a frame: 0x00 bytes are no valid field).
    let mut socket = open(&system, None).await.unwrap();
    hello(&mut socket, "d", &system.token("alice")).await;
    assert!(matches!(next_frame(&mut socket).await, Out::Ready(_)));
    socket.send(Message::Binary(vec![0u8; max].into())).await.unwrap();
    let (error, close) = refusal(&mut socket).await;
    assert_eq!((error.code, close), (tonic::Code::InvalidArgument as i32, 4003), "{}", error.message);
    // Text is not a frame either.
    let mut socket = open(&system, None).await.unwrap();
    hello(&mut socket, "d", &system.token("alice")).await;
    assert!(matches!(next_frame(&mut socket).await, Out::Ready(_)));
    socket.send(Message::Text("{\"hello\":{}}".into())).await.unwrap();
    let (error, close) = refusal(&mut socket).await;
    assert_eq!((error.code, close), (tonic::Code::InvalidArgument as i32, 4003));
}

#[tokio::test]
async fn a_browser_that_stops_answering_is_dropped_and_its_session_slot_freed() {
    let system = TestSystem::start_with(|config| {
        config.gateway.max_sessions = 1;
        config.server.keepalive_interval = Duration::from_millis(200);
        config.server.keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    // It takes the only session, then reads nothing more: no Pong answers the server's Pings.
    let mut silent = open(&system, None).await.unwrap();
    hello(&mut silent, "silent", &system.token("alice")).await;
    assert!(matches!(next_frame(&mut silent).await, Out::Ready(_)));
    let mut refused = open(&system, None).await.unwrap();
    hello(&mut refused, "second", &system.token("bob")).await;
    let (error, close) = refusal(&mut refused).await;
    assert_eq!((error.code, close), (tonic::Code::ResourceExhausted as i32, 4008), "{}", error.message);
    // Within a ping and its answer time the silent one is dropped and its place is free.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut next = open(&system, None).await.unwrap();
        hello(&mut next, "second", &system.token("bob")).await;
        match next_frame(&mut next).await {
            Out::Ready(_) => break,
            other => assert!(tokio::time::Instant::now() < deadline, "the silent session was never dropped: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(silent);
}

/// A unary call as grpc-web sends it: one length-prefixed message.
fn grpc_web_body(message: &impl prost::Message) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    body
}

/// The `grpc-status` of a grpc-web answer: in the headers (trailers-only) or
/// in the trailer frame (flag 0x80) after the messages.
fn grpc_web_status(headers: &reqwest::header::HeaderMap, body: &[u8]) -> String {
    if let Some(status) = headers.get("grpc-status") {
        return status.to_str().unwrap().to_owned();
    }
    let mut rest = body;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let (flag, payload) = (rest[0], &rest[5..5 + length]);
        if flag & 0x80 != 0 {
            let trailers = String::from_utf8_lossy(payload);
            let status = trailers.lines().find_map(|line| line.strip_prefix("grpc-status:"));
            return status.expect("trailers carry grpc-status").trim().to_owned();
        }
        rest = &rest[5 + length..];
    }
    panic!("no grpc-status in the answer");
}

#[tokio::test]
async fn unary_calls_answer_grpc_web_with_the_same_token_check_and_cors_for_allowed_origins() {
    let system = allowing_chat_example_com().await;
    let url = format!("http://{}/messenger.v1.GatewayService/GetOrCreateDirect", web_address(&system));
    let http = reqwest::Client::new();
    let call = |token: Option<String>| {
        let mut request = http
            .post(&url)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(grpc_web_body(&pb::GetOrCreateDirectRequest { peer_id: "bob".into() }));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.send()
    };
    let answer = call(Some(system.token("alice"))).await.unwrap();
    assert_eq!(answer.status(), 200);
    let headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap();
    assert_eq!(grpc_web_status(&headers, &body), "0");
    let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    let direct = pb::GetOrCreateDirectResponse::decode(&body[5..5 + length]).unwrap();
    assert_eq!(direct.conversation.unwrap().member_ids.len(), 2);

    let refused = call(None).await.unwrap();
    let headers = refused.headers().clone();
    assert_eq!(grpc_web_status(&headers, &refused.bytes().await.unwrap()), "16");

    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type,x-grpc-web")
            .send()
    };
    let allowed = preflight("https://chat.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://chat.example.com");
    assert_eq!(preflight("https://evil.example.com").await.unwrap().status(), 403);
}

#[tokio::test]
async fn development_tokens_are_minted_by_user_id_for_the_web_app() {
    let system = TestSystem::start().await;
    let url = format!("http://{}/v1/dev-token", web_address(&system));
    let http = reqwest::Client::new();
    let answer =
        http.post(&url).header("content-type", "application/json").body(r#"{"user_id":"carol"}"#).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let token = serde_json::from_slice::<serde_json::Value>(&answer.bytes().await.unwrap()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut socket = open(&system, None).await.unwrap();
    hello(&mut socket, "d", &token).await;
    let Out::Ready(ready) = next_frame(&mut socket).await else { panic!("expected Ready") };
    assert_eq!(ready.user_id, "carol");
    let empty =
        http.post(&url).header("content-type", "application/json").body(r#"{"user_id":" "}"#).send().await.unwrap();
    assert_eq!(empty.status(), 400);
    // A page whose name was re-pointed at this machine (DNS rebinding) is
    // same-origin with itself, and gets none.
    let port = system.running.as_ref().unwrap().addresses.web.unwrap().port();
    let rebound = http
        .post(&url)
        .header("host", format!("evil.example.com:{port}"))
        .header("origin", format!("http://evil.example.com:{port}"))
        .header("content-type", "application/json")
        .body(r#"{"user_id":"carol"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    // The app is served beside it, with a policy that keeps scripts to its own.
    let page = http.get(format!("http://{}/", web_address(&system))).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
}

#[tokio::test]
async fn the_embedded_object_store_answers_cors_for_presigned_browser_requests() {
    let system = TestSystem::start().await;
    let objects = system.running.as_ref().unwrap().addresses.objects.clone().expect("embedded store");
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{objects}/media/uploads/some-object"))
        .header("origin", "http://127.0.0.1:7780")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "content-type,x-amz-checksum-sha256")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    let methods = preflight.headers()["access-control-allow-methods"].to_str().unwrap().to_owned();
    assert!(methods.contains("PUT"), "{methods}");
}
