//! Keys, TLS, mutual TLS between services, and token lifetime on streams,
//! all through real sockets.

use std::{path::PathBuf, sync::Arc, time::Duration};

use messenger::{Config, certs, system};
use messenger_client::{Client, Error, Event, TlsOptions, TokenProvider};
use messenger_platform::{
    auth,
    discovery::{ChannelPool, DiscoveryOptions, Role},
};
use messenger_proto::v1::{
    self as pb, gateway_internal_service_client::GatewayInternalServiceClient,
    message_service_client::MessageServiceClient, presence_service_client::PresenceServiceClient,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::support::{RawClient, TestSystem, WAIT, messages, next_message, presence_update};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../platform/src/auth/testdata").join(name)
}

fn sign(algorithm: jsonwebtoken::Algorithm, kid: &str, private_pem: &str, user: &str) -> String {
    let pem = std::fs::read(testdata(private_pem)).unwrap();
    let key = match algorithm {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(algorithm);
    header.kid = Some(kid.into());
    let claims = auth::Claims {
        sub: user.into(),
        exp: (messenger_platform::ids::now_ms() / 1000 + 600) as u64,
        iat: None,
        iss: None,
        aud: None,
    };
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn start_error(config: Config, roles: &[Role]) -> String {
    match system::start(config, roles).await {
        Ok(_) => panic!("started, but should have refused"),
        Err(error) => error.to_string(),
    }
}

#[tokio::test]
async fn serve_refuses_without_keys_with_the_published_secret_and_with_exposed_plaintext_internal_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut no_keys = Config::for_loopback(dir.path());
    no_keys.auth.development = false;
    let error = start_error(no_keys.clone(), &[Role::Gateway]).await;
    assert!(error.contains("auth.jwks_file") && error.contains("auth.development"), "{error}");

    let mut published = no_keys.clone();
    published.auth.hs256_secret = Some(auth::DEV_SECRET.into());
    let error = start_error(published, &[Role::Gateway]).await;
    assert!(error.contains("published development secret"), "{error}");

    // Development mode (what `messenger up` uses without keys) only on loopback.
    let mut development = Config::for_loopback(dir.path());
    development.gateway.listen = "0.0.0.0:0".into();
    let error = start_error(development, &[Role::Gateway]).await;
    assert!(error.contains("not on loopback") && error.contains("published development secret"), "{error}");

    // Keys are fine; an internal port on every interface without mutual TLS is not.
    let mut exposed = Config::for_loopback(dir.path());
    exposed.message.listen = "0.0.0.0:0".into();
    let error = start_error(exposed.clone(), &[Role::Message]).await;
    assert!(error.contains("mutual TLS is off") && error.contains("tls.insecure_cluster_plaintext"), "{error}");
    exposed.tls.insecure_cluster_plaintext = true;
    system::start(exposed, &[Role::Message]).await.unwrap().stop().await.unwrap();
}

#[tokio::test]
async fn configured_jwks_replaces_the_development_secret_and_rotates_without_restart() {
    let keys = tempfile::tempdir().unwrap();
    let jwks = keys.path().join("jwks.json");
    std::fs::copy(testdata("jwks.json"), &jwks).unwrap();
    let system = TestSystem::start_with(|config| {
        // Development mode stays on, as on a laptop that then configures a
        // JWKS: the published secret must still stop working.
        config.auth.development = true;
        config.auth.jwks_file = Some(jwks.clone());
        config.auth.reload_interval = Duration::from_millis(100);
    })
    .await;
    // Options by hand: with a JWKS configured there is no secret to mint with.
    let connect =
        |token: String| Client::connect(messenger_client::Options::new(system.endpoint.clone(), token, "phone"));
    let dev_token =
        auth::mint_hs256(&auth::AuthOptions::default().or_development(), "dave", Duration::from_secs(60)).unwrap();
    assert!(matches!(connect(dev_token).await, Err(Error::Unauthenticated(_))), "development secret accepted");
    let rsa = sign(jsonwebtoken::Algorithm::RS256, "test-rsa-1", "rs256_private.pem", "dave");
    let ec = sign(jsonwebtoken::Algorithm::ES256, "test-ec-2", "es256_private.pem", "dave");
    connect(rsa.clone()).await.expect("a JWKS key verifies");
    assert!(matches!(connect(ec.clone()).await, Err(Error::Unauthenticated(_))));

    std::fs::copy(testdata("jwks_rotated.json"), &jwks).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect(ec.clone()).await {
            Ok(_) => break,
            Err(Error::Unauthenticated(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(other) => panic!("rotated key never accepted: {other:?}"),
        }
    }
    assert!(matches!(connect(rsa).await, Err(Error::Unauthenticated(_))), "the retired key still verifies");
}

/// A system with TLS on the public port and mutual TLS on every internal one
/// (which its own calls skip when `in_process`: `platform/src/local.rs`).
async fn tls_system(certs: &certs::Generated, in_process: bool) -> TestSystem {
    let (cert, key) = certs.role("all").unwrap();
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    TestSystem::start_with(|config| {
        config.discovery.in_process = in_process;
        config.tls.public_cert_file = Some(certs.public.0.clone());
        config.tls.public_key_file = Some(certs.public.1.clone());
        config.tls.cluster_ca_file = Some(certs.ca.clone());
        config.tls.cluster_cert_file = Some(cert);
        config.tls.cluster_key_file = Some(key);
    })
    .await
}

/// A channel to an internal port made with tonic's own TLS client (not the
/// project's connector), presenting `identity` if given.
async fn internal_channel(
    certs: &certs::Generated,
    address: std::net::SocketAddr,
    server_role: &str,
    identity: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
        .domain_name(format!("{server_role}.messenger.internal"));
    if let Some(name) = identity {
        let (cert, key) = certs.role(name).unwrap();
        tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
    }
    Endpoint::from_shared(format!("https://{address}")).unwrap().tls_config(tls).unwrap().connect().await
}

fn deliver_request() -> pb::DeliverRequest {
    pb::DeliverRequest { deliveries: Vec::new() }
}

#[tokio::test]
async fn internal_ports_take_only_cluster_certificates_whose_role_may_make_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        certs::generate(dir.path(), "messenger.internal", &["localhost".into(), "127.0.0.1".into()], 1).unwrap();
    let system = tls_system(&certs, true).await;
    let addresses = system.running.as_ref().unwrap().addresses.clone();
    let (gateway_internal, message, presence) =
        (addresses.gateway_internal.unwrap(), addresses.message.unwrap(), addresses.presence.unwrap());

    // No certificate at all: the handshake is refused, so no call gets through.
    let anonymous = match internal_channel(&certs, message, "message", None).await {
        Ok(channel) => MessageServiceClient::new(channel)
            .list_conversations(pb::MessageListConversationsRequest { user_id: "alice".into(), ..Default::default() })
            .await
            .map(|_| ()),
        Err(_) => Err(tonic::Status::unavailable("handshake refused")),
    };
    assert!(anonymous.is_err(), "a caller without a certificate reached the message service");
    // Plaintext is not spoken at all.
    let plain = Endpoint::from_shared(format!("http://{presence}")).unwrap().connect().await;
    if let Ok(channel) = plain {
        let call = PresenceServiceClient::new(channel).status(pb::StatusRequest::default()).await;
        assert!(call.is_err(), "a plaintext caller reached presence");
    }

    // A gateway's certificate may not deliver; a message instance's may.
    let as_gateway = internal_channel(&certs, gateway_internal, "gateway", Some("gateway")).await.unwrap();
    let refused = GatewayInternalServiceClient::new(as_gateway).deliver(deliver_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let as_message = internal_channel(&certs, gateway_internal, "gateway", Some("message")).await.unwrap();
    GatewayInternalServiceClient::new(as_message).deliver(deliver_request()).await.unwrap();

    // Presence: sessions are registered by gateways, members located by message instances.
    let session = pb::Session { user_id: "mallory".into(), session_id: "s".into(), ..Default::default() };
    let register = pb::RegisterRequest { session: Some(session), restore: false };
    let as_message = internal_channel(&certs, presence, "presence", Some("message")).await.unwrap();
    let refused = PresenceServiceClient::new(as_message.clone()).register(register).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    PresenceServiceClient::new(as_message).locate(pb::LocateRequest::default()).await.unwrap();
    let as_gateway = internal_channel(&certs, presence, "presence", Some("gateway")).await.unwrap();
    let refused = PresenceServiceClient::new(as_gateway).locate(pb::LocateRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The message service serves gateways only.
    let as_presence = internal_channel(&certs, message, "message", Some("presence")).await.unwrap();
    let refused = MessageServiceClient::new(as_presence)
        .list_conversations(pb::MessageListConversationsRequest { user_id: "alice".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}

#[tokio::test]
async fn calls_within_the_process_skip_the_network_but_not_authorization() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        certs::generate(dir.path(), "messenger.internal", &["localhost".into(), "127.0.0.1".into()], 1).unwrap();
    let system = tls_system(&certs, true).await;
    let gateway_internal = system.running.as_ref().unwrap().addresses.gateway_internal.unwrap().to_string();
    // A channel to the gateway's internal port as `identity` would open it.
    let channel = |identity: &str, in_process: bool| {
        let (cert, key) = certs.role(identity).unwrap();
        let tls = messenger_platform::tls::TlsOptions {
            cluster_ca_file: Some(certs.ca.clone()),
            cluster_cert_file: Some(cert.to_path_buf()),
            cluster_key_file: Some(key.to_path_buf()),
            ..Default::default()
        };
        let tls = messenger_platform::tls::ClientTls::cluster(&tls).unwrap();
        let options = DiscoveryOptions { tls, in_process, ..Default::default() };
        ChannelPool::new(options, Role::Gateway).get(&gateway_internal).unwrap()
    };
    // In process (once the port is served), the caller is still known by
    // its certificate's roles.
    let deadline = tokio::time::Instant::now() + WAIT;
    let as_gateway = loop {
        let channel = channel("gateway", true);
        if format!("{channel:?}").contains("Local") {
            break channel;
        }
        assert!(tokio::time::Instant::now() < deadline, "the gateway's internal port never served in process");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let refused = GatewayInternalServiceClient::new(as_gateway).deliver(deliver_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    GatewayInternalServiceClient::new(channel("message", true)).deliver(deliver_request()).await.unwrap();
    // Turned off, the same call goes over mutual TLS.
    let over_network = channel("message", false);
    assert!(format!("{over_network:?}").contains("Network"), "{over_network:?}");
    GatewayInternalServiceClient::new(over_network).deliver(deliver_request()).await.unwrap();

    // The system's own hops are in process: a chat works end to end.
    chat_over_tls(&system, &certs).await;
}

/// Alice sends Bob a message through `system`'s TLS public port, the SDK
/// trusting the cluster CA.
async fn chat_over_tls(system: &TestSystem, certs: &certs::Generated) {
    let tls = TlsOptions { ca_pem: Some(std::fs::read(&certs.ca).unwrap()), server_name: None };
    let connect = |user: &str| {
        let mut options = system.options(user, "phone");
        options.tls = tls.clone();
        Client::connect(options)
    };
    let (alice, _alice_events) = connect("alice").await.unwrap();
    let (_bob, mut bob_events) = connect("bob").await.unwrap();
    let direct = alice.direct("bob").await.unwrap().conversation_id;
    alice.send(&direct, "over tls").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "over tls");
}

#[tokio::test]
async fn the_public_port_speaks_tls_to_the_sdk_and_to_an_independent_client() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        certs::generate(dir.path(), "messenger.internal", &["localhost".into(), "127.0.0.1".into()], 1).unwrap();
    // Every internal call over the network, as between pods.
    let system = tls_system(&certs, false).await;
    assert!(system.endpoint.starts_with("https://"), "{}", system.endpoint);
    // Every hop behind the gateway is mutual TLS too: send, fan-out, deliver.
    chat_over_tls(&system, &certs).await;

    // Without the CA the SDK refuses the server.
    let mut untrusting = system.options("alice", "laptop");
    untrusting.tls = TlsOptions::default();
    assert!(Client::connect(untrusting).await.is_err());

    // curl (OpenSSL, nghttp2) verifying with the CA: a real gRPC health check.
    let address = system.running.as_ref().unwrap().addresses.gateway.unwrap();
    // tokio's process API: the server runs on this test's one runtime thread.
    let mut curl = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--http2", "--cacert"])
        .arg(&certs.ca)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-", "--output", "-"])
        .arg(format!("https://localhost:{}/grpc.health.v1.Health/Check", address.port()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs (scripts/setup.sh installs it)");
    {
        use tokio::io::AsyncWriteExt as _;
        // An empty HealthCheckRequest: uncompressed, length 0.
        let mut stdin = curl.stdin.take().unwrap();
        stdin.write_all(&[0, 0, 0, 0, 0]).await.unwrap();
    }
    let output = curl.wait_with_output().await.unwrap();
    assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
    // One message of 2 bytes: field 1 (status) = 1 (SERVING).
    assert_eq!(output.stdout, [0, 0, 0, 0, 2, 0x08, 0x01], "{:?}", output.stdout);

    // The browser port has the same certificate, on HTTP/1.1 (what a
    // WebSocket upgrade needs): curl offering only http/1.1 in ALPN.
    let web = system.running.as_ref().unwrap().addresses.web.unwrap();
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--http1.1", "--fail", "--cacert"])
        .arg(&certs.ca)
        .args(["--output", "/dev/null", "--write-out", "%{http_version} %{http_code}"])
        .arg(format!("https://localhost:{}/", web.port()))
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "1.1 200");
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires_and_the_sdk_resumes_with_a_fresh_one() {
    let system = TestSystem::start_with(|config| config.auth.leeway = Duration::ZERO).await;
    let auth_options = system.config.auth.clone();
    let fetched = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut options = system.options("alice", "phone");
    options.token = auth::mint_hs256(&auth_options, "alice", Duration::from_secs(2)).unwrap();
    let counter = fetched.clone();
    options.token_provider = Some(TokenProvider::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let token = auth::mint_hs256(&auth_options, "alice", Duration::from_secs(3600)).map_err(|e| e.to_string());
        Box::pin(async move { token })
    }));
    let (alice, mut alice_events) = Client::connect(options).await.unwrap();
    let (bob, _bob_events) = system.connect("bob", "phone").await;
    let direct = bob.direct("alice").await.unwrap().conversation_id;
    bob.send(&direct, "before expiry").await.unwrap();
    assert_eq!(next_message(&mut alice_events).await.body, "before expiry");

    // The gateway ends the stream at `exp`; the SDK fetches a token and resumes.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut reconnected = false;
    while !reconnected {
        match tokio::time::timeout_at(deadline, alice_events.next()).await.expect("no reconnect after expiry") {
            Some(Event::Disconnected { will_retry, reason }) => {
                assert!(will_retry, "expiry ended the client: {reason}")
            }
            Some(Event::Connected { .. }) => reconnected = true,
            Some(Event::Message(message)) => panic!("shown twice or out of place: {message:?}"),
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), 1);
    bob.send(&direct, "after expiry").await.unwrap();
    let sent = alice.send(&direct, "alice after expiry").await.unwrap();
    // Each exactly once, her own send included (it reaches her devices too).
    let received = messages(&mut alice_events, 2).await;
    assert_eq!(received.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(), ["after expiry", "alice after expiry"]);
    assert_eq!(sent.seq, 3);
    crate::support::assert_quiet(&mut alice_events).await;

    // Without a provider the client ends, saying why.
    let mut raw_options = system.options("carol", "phone");
    raw_options.token = auth::mint_hs256(&system.config.auth, "carol", Duration::from_secs(1)).unwrap();
    let (_carol, mut carol_events) = Client::connect(raw_options).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, carol_events.next()).await.expect("no end after expiry") {
            Some(Event::Disconnected { will_retry: false, reason }) => {
                assert!(reason.contains("token expired"), "{reason}");
                break;
            }
            Some(_) => {}
            None => panic!("events ended without a reason"),
        }
    }
}

/// A client never learns the cluster's internal addresses: when the message
/// service cannot be reached, unary calls and the stream answer UNAVAILABLE
/// naming the role and an error id (the log has the address).
#[tokio::test]
async fn unreachable_instances_are_not_named_to_clients() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_loopback(dir.path());
    config.discovery.message = vec![dead.to_string()];
    let running = system::start(config.clone(), &[Role::Gateway, Role::Presence]).await.unwrap();
    let token = auth::mint_hs256(&config.auth, "alice", Duration::from_secs(600)).unwrap();
    fn authorized<T>(token: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }
    let channel = Endpoint::from_shared(running.endpoint()).unwrap().connect().await.unwrap();
    let mut gateway = pb::gateway_service_client::GatewayServiceClient::new(channel);
    let leaks = |status: &tonic::Status| {
        let text = status.message();
        text.contains(&dead.port().to_string()) || text.contains("127.0.0.1") || !text.contains("error id")
    };

    let unary =
        gateway.list_conversations(authorized(&token, pb::ListConversationsRequest::default())).await.unwrap_err();
    assert_eq!(unary.code(), Code::Unavailable, "{unary:?}");
    assert!(!leaks(&unary), "{}", unary.message());

    let hello = pb::ClientFrame {
        trace_context: Default::default(),
        frame: Some(pb::client_frame::Frame::Hello(pb::Hello { device_id: "phone".into(), ..Default::default() })),
    };
    let mut stream = gateway.connect(authorized(&token, futures::stream::iter([hello]))).await.unwrap().into_inner();
    let ended = loop {
        match tokio::time::timeout(WAIT, stream.message()).await.expect("the stream neither failed nor ended") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(!leaks(&ended), "{}", ended.message());
    running.stop().await.unwrap();
}

#[tokio::test]
async fn blocked_users_get_no_direct_conversation_no_sends_and_no_presence() {
    let system = TestSystem::start_with(|config| {
        config.message.max_blocked_users = 2;
        config.gateway.rate_limits.blocks = messenger_gateway::Rate { per_second: 1, burst: 6 };
    })
    .await;
    let (mallory, mut mallory_events) = system.connect("mallory", "phone").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    let stranger = mallory.direct("alice").await.unwrap().conversation_id;
    let with_bob = bob.direct("alice").await.unwrap().conversation_id;

    // A stranger who opened a conversation learns nothing until it is answered.
    let (alice, _alice_events) = system.connect("alice", "phone").await;
    alice.send(&with_bob, "hi bob").await.unwrap();
    alice.close().await;
    let offline = presence_update(&mut bob_events).await.expect("bob, answered, sees alice leave");
    assert_eq!((offline.user_id.as_str(), offline.online), ("alice", false));
    assert!(presence_update(&mut mallory_events).await.is_none(), "mallory was never answered");
    let (alice, alice_events) = system.connect("alice", "phone").await;
    assert!(presence_update(&mut bob_events).await.is_some_and(|update| update.online));
    assert!(presence_update(&mut mallory_events).await.is_none(), "mallory was never answered");
    alice.send(&stranger, "who are you?").await.unwrap();
    next_message(&mut mallory_events).await;

    // Alice blocks mallory: mallory can no longer write to her in any way.
    assert!(alice.block("mallory").await.unwrap());
    assert!(!alice.block("mallory").await.unwrap(), "blocking twice changes nothing");
    let listed: Vec<String> = alice.blocked_users().await.unwrap().into_iter().map(|b| b.user_id).collect();
    assert_eq!(listed, ["mallory"]);
    let error = mallory.send(&stranger, "let me in").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let error = mallory.react(&stranger, 1, "👍").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let error = mallory.direct("alice").await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let error = alice.send(&stranger, "one last word").await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "the blocker is told why: {error:?}");
    let history = alice.history(&stranger, 0, 50).await.unwrap().messages;
    let bodies: Vec<&str> = history.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["who are you?"], "nothing refused was stored");

    // Alice's presence reaches bob, never mallory, even after mallory was answered.
    alice.close().await;
    assert!(presence_update(&mut bob_events).await.is_some_and(|update| !update.online));
    assert!(presence_update(&mut mallory_events).await.is_none(), "mallory saw alice go offline");
    let (alice, mut alice_events_again) = system.connect("alice", "phone").await;
    assert!(presence_update(&mut bob_events).await.is_some_and(|update| update.online));
    assert!(presence_update(&mut mallory_events).await.is_none(), "mallory saw alice come online");
    drop(alice_events);

    // The block list has a size limit, and unblocking restores everything.
    assert!(alice.block("spammer").await.unwrap());
    let error = alice.block("another").await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "a third block passes max_blocked_users = 2: {error:?}");
    assert!(alice.unblock("mallory").await.unwrap());
    assert!(!alice.unblock("mallory").await.unwrap(), "unblocking twice changes nothing");
    mallory.send(&stranger, "sorry").await.unwrap();
    assert_eq!(next_message(&mut alice_events_again).await.body, "sorry");

    // Block list changes are rate limited like every public write: burst 6.
    let mut raw = RawClient::new(system.raw_channel().await);
    for round in 0..3 {
        let block = system.authorized("carol", pb::BlockUserRequest { user_id: "dave".into() });
        assert!(raw.block_user(block).await.unwrap().into_inner().changed, "round {round}");
        let unblock = system.authorized("carol", pb::UnblockUserRequest { user_id: "dave".into() });
        assert!(raw.unblock_user(unblock).await.unwrap().into_inner().changed, "round {round}");
    }
    let block = system.authorized("carol", pb::BlockUserRequest { user_id: "dave".into() });
    let status = raw.block_user(block).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "the seventh change: {status:?}");
}

/// `messenger config --check`, what a deployment (the Helm chart's tests)
/// runs over a rendered configuration: a verdict, and the key at fault.
#[test]
fn config_check_accepts_a_valid_file_and_names_what_is_wrong_in_others() {
    let dir = tempfile::tempdir().unwrap();
    let check = |toml: &str| {
        let path = dir.path().join("messenger.toml");
        std::fs::write(&path, toml).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_messenger"))
            .arg("--config")
            .arg(&path)
            .args(["config", "--check"])
            .env_remove("MESSENGER_TEST_STORE")
            .env_remove("MESSENGER_TEST_SCYLLA")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (ok, text) = check("[message]\nstore = \"scylla\"\n[media]\nstore = \"scylla\"\n");
    assert!(ok && text.contains("configuration is valid"), "{text}");
    let (ok, text) = check("[gateway]\nlisten = \"127.0.0.1:7700\"\nlisen = \"typo\"\n");
    assert!(!ok && text.contains("lisen"), "an unknown key is refused by name: {text}");
    // The media tables live on the shared cluster: its settings are checked
    // whichever store uses it, and the message store's against it.
    let (ok, text) = check("[media]\nstore = \"scylla\"\n[scylla]\nkeyspace = \"Messenger\"\n");
    assert!(!ok && text.contains("scylla.keyspace"), "{text}");
    let (ok, text) = check("[message]\nstore = \"scylla\"\n[scylla]\nrequest_timeout = \"10s\"\n");
    assert!(!ok && text.contains("lock_timeout"), "{text}");
}

/// `messenger up` as a newcomer runs it, on free ports: its internal hops use
/// mutual TLS with a CA made at start, so a plaintext caller can neither send
/// as another user on the message port nor fake a `Deliver` on the gateway's
/// internal port, while the public port chats as before.
#[tokio::test]
async fn a_default_messenger_up_refuses_forged_internal_calls() {
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let port = || messenger_testkit::free_port().to_string();
    let (public, internal, message) = (port(), port(), port());
    let listeners = [
        ("MESSENGER_GATEWAY__LISTEN", public.clone()),
        ("MESSENGER_GATEWAY__INTERNAL_LISTEN", internal.clone()),
        ("MESSENGER_MESSAGE__LISTEN", message.clone()),
        ("MESSENGER_PRESENCE__LISTEN", port()),
        ("MESSENGER_MEDIA__LISTEN", port()),
        ("MESSENGER_NOTIFY__LISTEN", port()),
        ("MESSENGER_ADMIN__LISTEN", port()),
        ("MESSENGER_MEDIA__S3__EMBEDDED_LISTEN", port()),
    ];
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    // Started with a low soft open-file limit, as many systems set it.
    let mut command = Command::new("sh");
    command
        .args(["-c", "ulimit -Sn 1024 && exec \"$0\" up", env!("CARGO_BIN_EXE_messenger")])
        .env_remove("RUST_LOG")
        .env_remove("MESSENGER_TEST_STORE")
        .env_remove("MESSENGER_TEST_SCYLLA")
        .env("MESSENGER_DATA_DIR", dir.path().join("data"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log));
    for (name, port) in &listeners {
        command.env(name, format!("127.0.0.1:{port}"));
    }
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let up = Killed(command.spawn().expect("cannot start messenger up"));

    // The public port works: two users chat through every internal hop.
    let development = Config::default().auth.or_development();
    let token = |user: &str| auth::mint_hs256(&development, user, Duration::from_secs(600)).unwrap();
    let endpoint = format!("http://127.0.0.1:{public}");
    let connect = |user: &'static str| {
        let options = messenger_client::Options::new(endpoint.clone(), token(user), "phone");
        async move {
            let deadline = tokio::time::Instant::now() + WAIT * 2;
            loop {
                match Client::connect(options.clone()).await {
                    Ok(connected) => return connected,
                    Err(error) if tokio::time::Instant::now() < deadline => {
                        let _ = error;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(error) => panic!("messenger up did not come up: {error}"),
                }
            }
        }
    };
    let (alice, _alice_events) = connect("alice").await;
    let (_bob, mut bob_events) = connect("bob").await;
    let direct = alice.direct("bob").await.unwrap();
    alice.send(&direct.conversation_id, "over mutual TLS").await.unwrap();
    assert_eq!(next_message(&mut bob_events).await.body, "over mutual TLS");
    let ca = dir.path().join("data").join(certs::EPHEMERAL_DIR).join("ca.pem");
    assert!(ca.exists(), "the cluster CA made at start");

    // A plaintext caller on the internal ports gets nothing done.
    let forged = async {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{message}")).unwrap().connect().await?;
        let send = pb::SendRequest {
            sender_id: "bob".into(),
            device_id: "forged".into(),
            conversation_id: direct.conversation_id.clone(),
            client_msg_id: "forged-1".into(),
            body: "sent as bob by someone else".into(),
            reply_to_seq: 0,
            media_ids: Vec::new(),
        };
        MessageServiceClient::new(channel).send(send).await.map(|_| ()).map_err(|status| status.to_string().into())
    };
    let forged: Result<(), Box<dyn std::error::Error>> = forged.await;
    assert!(forged.is_err(), "a forged send on the message port was accepted");
    let fake = async {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{internal}")).unwrap().connect().await?;
        GatewayInternalServiceClient::new(channel)
            .deliver(deliver_request())
            .await
            .map(|_| ())
            .map_err(|status| status.to_string().into())
    };
    let fake: Result<(), Box<dyn std::error::Error>> = fake.await;
    assert!(fake.is_err(), "a fake Deliver on the gateway's internal port was accepted");
    let history = alice.history(&direct.conversation_id, 0, 10).await.unwrap();
    assert!(history.messages.iter().all(|m| m.body != "sent as bob by someone else"));

    // It raised its open-file limit to the hard one: a socket per client.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", up.0.id())).unwrap();
    let files: Vec<&str> =
        limits.lines().find(|line| line.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(files[3], files[4], "soft open-file limit not raised to the hard one: {files:?}");
}

/// 2,000 sockets that never send a byte and 500 that stall in their TLS
/// handshake, all from one address, cannot keep an honest client on another
/// address out: it connects over TLS and has its send acknowledged within
/// a second. The flood's address holds at most its share of connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_and_stalled_socket_flood_does_not_keep_an_honest_client_out() {
    use tokio::io::AsyncWriteExt as _;

    let dir = tempfile::tempdir().unwrap();
    let certs =
        certs::generate(dir.path(), "messenger.internal", &["localhost".into(), "127.0.0.1".into()], 1).unwrap();
    let system = tls_system(&certs, true).await;
    let address = system.running.as_ref().unwrap().addresses.gateway.unwrap();

    let mut flood = Vec::with_capacity(2_500);
    for _ in 0..2_000 {
        flood.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    for _ in 0..500 {
        let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
        // A TLS record header announcing a ClientHello that never comes.
        let _ = stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
        flood.push(stalled);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = tokio::time::Instant::now();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", address.port()))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the honest client could not connect");
    let direct = alice_and_bob(&system, &channel).await;
    let (frames, mut stream) = system.raw_stream(channel, "alice", "honest").await;
    send_and_await_ack(&frames, &mut stream, &direct, "honest-1").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the honest client took {took:?}");
    drop(flood);
}

/// Alice's direct conversation with Bob, made on `channel` without the SDK.
async fn alice_and_bob(system: &TestSystem, channel: &Channel) -> String {
    RawClient::new(channel.clone())
        .get_or_create_direct(system.authorized("alice", pb::GetOrCreateDirectRequest { peer_id: "bob".into() }))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .conversation_id
}

/// Sends `client_msg_id` on a raw stream and waits for its SendAck.
async fn send_and_await_ack(
    frames: &tokio::sync::mpsc::Sender<pb::ClientFrame>,
    stream: &mut tonic::Streaming<pb::ServerFrame>,
    conversation_id: &str,
    client_msg_id: &str,
) {
    let send = pb::SendRequestFrame {
        conversation_id: conversation_id.into(),
        client_msg_id: client_msg_id.into(),
        body: "still here".into(),
        reply_to_seq: 0,
        media_ids: Vec::new(),
    };
    frames
        .send(pb::ClientFrame { trace_context: Default::default(), frame: Some(pb::client_frame::Frame::Send(send)) })
        .await
        .unwrap();
    loop {
        let frame = stream.message().await.unwrap().expect("the stream ended");
        if let Some(pb::server_frame::Frame::SendAck(ack)) = frame.frame {
            assert_eq!(ack.client_msg_id, client_msg_id);
            return;
        }
    }
}

/// An HTTP/2 connection to the public port that opens no stream after its
/// preface (and answers every PING) is closed after `server.idle_timeout`; a
/// connection holding a Connect stream is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_call_open_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let system = TestSystem::start_with(|config| config.server.idle_timeout = idle).await;
    let address = system.running.as_ref().unwrap().addresses.gateway.unwrap();

    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (_requests, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 preface and settings");
    let opened = tokio::time::Instant::now();
    let silent = tokio::spawn(async move {
        let _ = connection.await;
        opened.elapsed()
    });

    let channel = system.raw_channel().await;
    let direct = alice_and_bob(&system, &channel).await;
    let (frames, mut stream) = system.raw_stream(channel, "alice", "phone").await;
    send_and_await_ack(&frames, &mut stream, &direct, "before").await;

    let closed_after =
        tokio::time::timeout(WAIT, silent).await.expect("the streamless connection stayed open").unwrap();
    assert!(closed_after >= idle.mul_f32(0.9), "closed after {closed_after:?}, before the idle timeout");
    // Three idle timeouts later the stream's connection still carries the send.
    tokio::time::sleep(idle * 3).await;
    send_and_await_ack(&frames, &mut stream, &direct, "after").await;
    let (bob, mut bob_events) = system.connect("bob", "phone").await;
    assert_eq!(messages(&mut bob_events, 2).await.len(), 2);
    drop(bob);
}
