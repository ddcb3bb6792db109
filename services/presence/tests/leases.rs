//! The presence service over gRPC, as gateways use it: leases renewed by
//! their gateway, lost ones restored, an unreachable Redis answered with
//! UNAVAILABLE, and Redis over mutual TLS. Real servers: presence on a
//! loopback port, `redis-server`.

use std::{path::Path, time::Duration};

use messenger_platform::{server::ServerOptions, tls::BackendTls};
use messenger_presence::{Backend, Options, RedisOptions};
use messenger_proto::v1::{self as pb, presence_service_client::PresenceServiceClient};
use messenger_testkit::{RedisServer, tls::TestCa};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

struct Running {
    client: PresenceServiceClient<Channel>,
    shutdown: CancellationToken,
}

async fn start(options: Options) -> Running {
    let deps = messenger_presence::Deps { server: ServerOptions::default(), tls: None };
    let server = messenger_presence::Server::build(options, deps).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    Running { client: PresenceServiceClient::new(channel), shutdown }
}

fn redis_options(redis: &RedisServer, ttl: Duration) -> Options {
    Options {
        backend: Backend::Redis,
        session_ttl: ttl,
        redis: RedisOptions {
            url: redis.url(),
            command_timeout: Duration::from_millis(300),
            ..RedisOptions::default()
        },
        ..Options::default()
    }
}

fn session(user: &str, id: &str, gateway: &str) -> pb::Session {
    pb::Session {
        user_id: user.into(),
        device_id: format!("{id}-device"),
        session_id: id.into(),
        gateway_id: gateway.into(),
        gateway_addr: format!("{gateway}:7701"),
        connected_at_ms: 1,
    }
}

fn refs(sessions: &[(&str, &str)]) -> Vec<pb::SessionRef> {
    sessions.iter().map(|(user, id)| pb::SessionRef { user_id: (*user).into(), session_id: (*id).into() }).collect()
}

async fn located(client: &mut PresenceServiceClient<Channel>, users: &[&str]) -> Vec<String> {
    let request = pb::LocateRequest { user_ids: users.iter().map(|u| (*u).to_owned()).collect() };
    let mut ids: Vec<String> =
        client.locate(request).await.unwrap().into_inner().sessions.into_iter().map(|s| s.session_id).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_sessions_expire_while_a_live_one_keeps_its_own() {
    let redis = RedisServer::start();
    let ttl = Duration::from_millis(800);
    let Running { mut client, shutdown } = start(redis_options(&redis, ttl)).await;
    for (user, id, gateway) in [("ann", "alive-1", "alive"), ("bob", "alive-2", "alive"), ("ann", "dead-1", "dead")] {
        let request = pb::RegisterRequest { session: Some(session(user, id, gateway)), restore: false };
        client.register(request).await.unwrap();
    }
    // The live gateway renews twice within what would have been the first lease.
    for _ in 0..3 {
        tokio::time::sleep(ttl / 2).await;
        let request =
            pb::RenewRequest { gateway_id: "alive".into(), sessions: refs(&[("ann", "alive-1"), ("bob", "alive-2")]) };
        let response = client.renew(request).await.unwrap().into_inner();
        assert!(response.unknown_session_ids.is_empty(), "{response:?}");
        assert_eq!(response.session_ttl_ms, 800);
    }
    assert_eq!(located(&mut client, &["ann", "bob"]).await, ["alive-1", "alive-2"]);
    let status = client.status(pb::StatusRequest { user_ids: vec!["ann".into()] }).await.unwrap().into_inner();
    assert!(status.statuses[0].online);

    // A gateway that claims sessions it does not hold cannot keep them.
    let request = pb::RenewRequest { gateway_id: "dead".into(), sessions: refs(&[("ann", "alive-1")]) };
    assert_eq!(client.renew(request).await.unwrap().into_inner().unknown_session_ids, ["alive-1"]);
    let request = pb::RenewRequest { gateway_id: String::new(), sessions: Vec::new() };
    assert_eq!(client.renew(request).await.unwrap_err().code(), Code::InvalidArgument);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_answers_unavailable_while_redis_is_unreachable() {
    let redis = RedisServer::start();
    let Running { mut client, shutdown } = start(redis_options(&redis, Duration::from_secs(30))).await;
    let register = |id: &str| pb::RegisterRequest { session: Some(session("cy", id, "g1")), restore: false };
    client.register(register("c1")).await.unwrap();
    redis.pause();
    let request = pb::RenewRequest { gateway_id: "g1".into(), sessions: refs(&[("cy", "c1")]) };
    assert_eq!(client.renew(request.clone()).await.unwrap_err().code(), Code::Unavailable);
    let refused = client.register(register("c2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    // A gateway passes this on to the device: no Redis text in it.
    assert!(!refused.message().to_lowercase().contains("redis"), "{refused:?}");
    assert!(refused.message().contains("error id"), "{refused:?}");
    let locate = pb::LocateRequest { user_ids: vec!["cy".into()] };
    assert_eq!(client.locate(locate).await.unwrap_err().code(), Code::Unavailable);
    redis.resume();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client.renew(request.clone()).await {
            Ok(response) => {
                assert!(response.into_inner().unknown_session_ids.is_empty());
                break;
            }
            Err(status) if status.code() == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("presence did not recover: {status}"),
        }
    }
    shutdown.cancel();
}

/// Presence on a Redis that serves only TLS and wants a client certificate:
/// sessions register and are located with Redis's CA trusted; the same
/// client trusting another CA gets UNAVAILABLE, so Redis's certificate is
/// verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_uses_redis_over_mutual_tls_and_verifies_its_certificate() {
    let redis = RedisServer::start_tls();
    let files = redis.client_tls().expect("started with TLS").clone();
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let trusting = |ca_file: &Path| {
        let mut options = redis_options(&redis, Duration::from_secs(30));
        options.redis.tls = BackendTls {
            ca_file: Some(ca_file.to_owned()),
            cert_file: Some(files.cert.clone()),
            key_file: Some(files.key.clone()),
            server_name: None,
        };
        options
    };
    let register = |id: &str| pb::RegisterRequest { session: Some(session("tia", id, "g1")), restore: false };

    let trusted = trusting(&files.ca_file);
    trusted.validate().unwrap();
    let Running { mut client, shutdown } = start(trusted).await;
    client.register(register("t1")).await.unwrap();
    assert_eq!(located(&mut client, &["tia"]).await, ["t1"]);
    shutdown.cancel();

    let other_dir = tempfile::tempdir().unwrap();
    let other = TestCa::new(other_dir.path(), "other");
    let Running { mut client, shutdown } = start(trusting(other.ca_file())).await;
    let refused = client.register(register("t2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_restore_superseded_by_a_newer_connection_is_refused() {
    let Running { mut client, shutdown } = start(Options::default()).await;
    let old = pb::Session { device_id: "phone".into(), ..session("dee", "old", "g1") };
    let new = pb::Session { device_id: "phone".into(), connected_at_ms: 2, ..session("dee", "new", "g2") };
    client.register(pb::RegisterRequest { session: Some(old.clone()), restore: false }).await.unwrap();
    client.register(pb::RegisterRequest { session: Some(new), restore: false }).await.unwrap();
    let request = pb::RenewRequest { gateway_id: "g1".into(), sessions: refs(&[("dee", "old")]) };
    assert_eq!(client.renew(request).await.unwrap().into_inner().unknown_session_ids, ["old"]);
    let refused = client.register(pb::RegisterRequest { session: Some(old), restore: true }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(located(&mut client, &["dee"]).await, ["new"]);
    shutdown.cancel();
}

/// A user's session ending while another starts, racing, on both stores:
/// the online / offline updates the answers imply, newest stamp first,
/// end at what presence says. (Deciding the transition apart from the write
/// could tell contacts "offline" about a connected user, for good.)
async fn racing_connect_and_disconnect_end_in_the_true_state(options: Options) {
    let running = start(options).await;
    for round in 0..60 {
        let user = format!("racer-{round}-{}", messenger_platform::ids::new_id().simple());
        let mut client = running.client.clone();
        let first = client
            .register(pb::RegisterRequest { session: Some(session(&user, "old", "g1")), restore: false })
            .await
            .unwrap()
            .into_inner();
        assert!(first.came_online && first.online_at_ms > 0, "{first:?}");
        let (mut a, mut b) = (client.clone(), client.clone());
        let unregister = pb::UnregisterRequest { user_id: user.clone(), session_id: "old".into() };
        let register = pb::RegisterRequest { session: Some(session(&user, "new", "g2")), restore: false };
        let (gone, came) = tokio::join!(a.unregister(unregister), b.register(register));
        let (gone, came) = (gone.unwrap().into_inner(), came.unwrap().into_inner());
        let mut told = vec![(first.online_at_ms, true)];
        if gone.went_offline {
            told.push((gone.last_seen_ms, false));
        }
        if came.came_online {
            told.push((came.online_at_ms, true));
        }
        let stamps: std::collections::HashSet<i64> = told.iter().map(|(at, _)| *at).collect();
        assert_eq!(stamps.len(), told.len(), "round {round}: two updates with one stamp: {told:?}");
        let shown = told.iter().max().unwrap().1;
        let status = client.status(pb::StatusRequest { user_ids: vec![user.clone()] }).await.unwrap().into_inner();
        assert!(status.statuses[0].online, "round {round}: the new session is live");
        assert!(shown, "round {round}: contacts were told offline about a connected user: {told:?}");
    }
    running.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_connect_and_disconnect_end_in_the_true_state_in_memory() {
    racing_connect_and_disconnect_end_in_the_true_state(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_connect_and_disconnect_end_in_the_true_state_on_redis() {
    let redis = RedisServer::start();
    racing_connect_and_disconnect_end_in_the_true_state(redis_options(&redis, Duration::from_secs(60))).await;
}
