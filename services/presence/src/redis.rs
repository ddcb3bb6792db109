//! Presence in Redis (`fred`), shared by every presence instance.
//!
//! Keys, all under `key_prefix`, with the user id as hash tag so a user's
//! keys share a cluster slot:
//! - `sessions:{<user>}`: hash, session id -> `"<expires_at_ms> <json>"`
//!   (device, gateway, gateway address, connect time). The key's TTL is kept
//!   at least as long as its newest lease, so a user whose gateways all died
//!   disappears on their own; expired fields of a user still connected
//!   elsewhere are dropped by the next write to that user and skipped by reads.
//! - `last_seen:{<user>}`: the last registration, renewal or unregistration
//!   time; no TTL (it is what remains once the sessions are gone).
//!
//! Writes are small Lua scripts (`redis/*.lua`, run with `EVALSHA`, loaded
//! again after a `NOSCRIPT` because a restarted Redis forgets them): register
//! has to count the user's live sessions and add one atomically, or two
//! presence instances registering one user at once could both take the last
//! slot; renew has to check a session's gateway and extend it atomically, or
//! an unregister landing between the two would be undone. A script is one
//! round trip with nothing to retry, where `WATCH`/`MULTI` needs a dedicated
//! connection and a retry loop under contention. Calls for many users (renew,
//! locate, status) go as one pipeline: one round trip per call.
//!
//! Expiry compares `expires_at_ms` with this process's clock, so presence
//! instances sharing a Redis need roughly synchronised clocks (NTP); skew
//! shifts when a lease ends by that much. Any Redis failure or a call slower
//! than `command_timeout` is [`Error::Unavailable`].

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use fred::{
    clients::{Client, Pipeline},
    interfaces::{ClientLike, HashesInterface, KeysInterface},
    types::{ClusterHash, CustomCommand, Value},
};
use messenger_platform::{ids, redis::RedisOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::store::{Error, Mode, PresenceStore, Session, SessionRef, Transition, UserStatus, ttl_ms};

#[cfg(test)]
mod tests;

/// A Lua script run by its SHA; loaded on first use and after `NOSCRIPT`.
struct Script {
    lua: &'static str,
    sha: OnceCell<String>,
}

impl Script {
    const fn new(lua: &'static str) -> Self {
        Self { lua, sha: OnceCell::const_new() }
    }

    async fn load(&self, client: &Client) -> Result<String, fred::error::Error> {
        client.custom(CustomCommand::new_static("SCRIPT", ClusterHash::Random, false), vec!["LOAD", self.lua]).await
    }

    async fn sha(&self, client: &Client) -> Result<&str, fred::error::Error> {
        self.sha.get_or_try_init(|| self.load(client)).await.map(String::as_str)
    }
}

/// One script call: its keys and its arguments.
type Call = ([String; 2], Vec<String>);

/// What a sessions hash stores per session besides its expiry.
#[derive(Serialize, Deserialize)]
struct Stored {
    device_id: String,
    gateway_id: String,
    gateway_addr: String,
    connected_at_ms: i64,
}

fn encode(session: &Session, expires_at_ms: i64) -> String {
    let stored = Stored {
        device_id: session.device_id.clone(),
        gateway_id: session.gateway_id.clone(),
        gateway_addr: session.gateway_addr.clone(),
        connected_at_ms: session.connected_at_ms,
    };
    // Serializing plain strings and an integer cannot fail.
    let json = serde_json::to_string(&stored).unwrap_or_default();
    format!("{expires_at_ms} {json}")
}

/// The JSON part of a stored session whose lease is live at `now_ms`.
fn live_body(value: &str, now_ms: i64) -> Option<&str> {
    let (expires_at, json) = value.split_once(' ')?;
    (expires_at.parse::<i64>().ok()? > now_ms).then_some(json)
}

/// The session if its lease is live at `now_ms`; None when expired or unreadable.
fn decode_live(user_id: &str, session_id: &str, value: &str, now_ms: i64) -> Option<Session> {
    let stored: Stored = serde_json::from_str(live_body(value, now_ms)?).ok()?;
    Some(Session {
        user_id: user_id.to_owned(),
        device_id: stored.device_id,
        session_id: session_id.to_owned(),
        gateway_id: stored.gateway_id,
        gateway_addr: stored.gateway_addr,
        connected_at_ms: stored.connected_at_ms,
    })
}

fn unavailable(error: fred::error::Error) -> Error {
    Error::Unavailable(format!("redis: {error}"))
}

// Each script is loaded with the shared helpers (`redis/lease.lua`) in front.
static REGISTER: Script = Script::new(concat!(include_str!("redis/lease.lua"), include_str!("redis/register.lua")));
static RENEW: Script = Script::new(concat!(include_str!("redis/lease.lua"), include_str!("redis/renew.lua")));
static UNREGISTER: Script = Script::new(concat!(include_str!("redis/lease.lua"), include_str!("redis/unregister.lua")));

pub struct RedisStore {
    client: Client,
    prefix: String,
    ttl: Duration,
}

impl RedisStore {
    /// Connects to Redis. An unreachable Redis is not an error here: the
    /// client keeps reconnecting and calls answer UNAVAILABLE until it is back.
    pub async fn connect(options: &RedisOptions, session_ttl: Duration) -> Result<Self, Error> {
        let client = options.client().map_err(|error| Error::InvalidConfig(format!("presence.redis: {error}")))?;
        match tokio::time::timeout(options.connect_timeout, client.wait_for_connect()).await {
            Ok(Ok(())) => info!(prefix = %options.key_prefix, "presence uses redis"),
            Ok(Err(error)) => warn!(%error, "redis not reachable yet; presence answers UNAVAILABLE until it is"),
            Err(_) => warn!("redis not reachable yet; presence answers UNAVAILABLE until it is"),
        }
        Ok(Self { client, prefix: options.key_prefix.clone(), ttl: session_ttl })
    }

    fn keys(&self, user_id: &str) -> [String; 2] {
        [format!("{}sessions:{{{user_id}}}", self.prefix), format!("{}last_seen:{{{user_id}}}", self.prefix)]
    }

    /// Runs `script` once per call, all in one pipeline; every call's result
    /// in order. A `NOSCRIPT` (Redis restarted and forgot the script) loads
    /// it and runs the pipeline once more: every script here can be repeated.
    async fn eval(&self, script: &Script, calls: Vec<Call>) -> Result<Vec<Value>, Error> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        for attempt in 0..2 {
            let sha = script.sha(&self.client).await.map_err(unavailable)?;
            let pipeline = self.client.pipeline();
            for (keys, args) in &calls {
                let mut command = Vec::with_capacity(4 + args.len());
                command.extend([sha.to_owned(), "2".to_owned(), keys[0].clone(), keys[1].clone()]);
                command.extend(args.iter().cloned());
                queue(&pipeline, CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false), command).await?;
            }
            let results = pipeline.try_all::<Value>().await;
            let missing =
                results.iter().any(|result| result.as_ref().is_err_and(|e| e.details().starts_with("NOSCRIPT")));
            if missing && attempt == 0 {
                script.load(&self.client).await.map_err(unavailable)?;
                continue;
            }
            return results.into_iter().map(|result| result.map_err(unavailable)).collect();
        }
        Err(Error::Unavailable("redis: script missing after loading it".into()))
    }
}

/// A script's `{code, time}` answer, from the one call made.
fn answer(results: Vec<Value>) -> Result<(i64, i64), Error> {
    let Some(value) = results.into_iter().next() else {
        return Err(Error::Unavailable("redis: no script answer".into()));
    };
    let pair: Vec<i64> = value.convert().map_err(unavailable)?;
    match pair.as_slice() {
        [code, at_ms] => Ok((*code, *at_ms)),
        other => Err(Error::Unavailable(format!("redis: unexpected script answer {other:?}"))),
    }
}

async fn queue(pipeline: &Pipeline<Client>, command: CustomCommand, args: Vec<String>) -> Result<(), Error> {
    pipeline.custom::<(), _>(command, args).await.map_err(unavailable)
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Ends the client's connection and reconnect task with the store.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

#[async_trait]
impl PresenceStore for RedisStore {
    async fn register(&self, session: Session, max_per_user: usize, mode: Mode) -> Result<Transition, Error> {
        let now = ids::now_ms();
        let ttl = ttl_ms(self.ttl);
        let args = vec![
            session.session_id.clone(),
            session.device_id.clone(),
            encode(&session, now.saturating_add(ttl)),
            now.to_string(),
            ttl.to_string(),
            max_per_user.to_string(),
            if mode == Mode::Restore { "1" } else { "0" }.to_owned(),
            session.connected_at_ms.to_string(),
        ];
        let result = self.eval(&REGISTER, vec![(self.keys(&session.user_id), args)]).await?;
        match answer(result)? {
            (1, at_ms) => Ok(Transition { changed: false, at_ms }),
            (2, at_ms) => Ok(Transition { changed: true, at_ms }),
            (-1, _) => Err(Error::TooManySessions { user: session.user_id, limit: max_per_user }),
            (-2, _) => Err(Error::Superseded { session: session.session_id }),
            other => Err(Error::Unavailable(format!("redis: unexpected register answer {other:?}"))),
        }
    }

    async fn renew(&self, gateway_id: &str, sessions: &[SessionRef]) -> Result<Vec<String>, Error> {
        let now = ids::now_ms();
        let ttl = ttl_ms(self.ttl);
        let mut by_user: HashMap<&str, Vec<String>> = HashMap::new();
        for reference in sessions {
            by_user.entry(&reference.user_id).or_default().push(reference.session_id.clone());
        }
        let calls = by_user
            .into_iter()
            .map(|(user_id, session_ids)| {
                let mut args = vec![gateway_id.to_owned(), now.to_string(), now.saturating_add(ttl).to_string()];
                args.push(ttl.to_string());
                args.extend(session_ids);
                (self.keys(user_id), args)
            })
            .collect();
        let mut unknown = Vec::new();
        for value in self.eval(&RENEW, calls).await? {
            let ids: Vec<String> = value.convert().map_err(unavailable)?;
            unknown.extend(ids);
        }
        // In the order asked, whatever order the users' calls ran in.
        let position: HashMap<&str, usize> =
            sessions.iter().enumerate().map(|(i, reference)| (reference.session_id.as_str(), i)).collect();
        unknown.sort_by_key(|id| position.get(id.as_str()).copied().unwrap_or(usize::MAX));
        Ok(unknown)
    }

    async fn unregister(&self, user_id: &str, session_id: &str) -> Result<Transition, Error> {
        let args = vec![session_id.to_owned(), ids::now_ms().to_string()];
        let (offline, at_ms) = answer(self.eval(&UNREGISTER, vec![(self.keys(user_id), args)]).await?)?;
        Ok(Transition { changed: offline == 1, at_ms })
    }

    async fn locate(&self, user_ids: &[String]) -> Result<Vec<Session>, Error> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.client.pipeline();
        for user_id in user_ids {
            let [sessions, _] = self.keys(user_id);
            pipeline.hgetall::<(), _>(sessions).await.map_err(unavailable)?;
        }
        let hashes = pipeline.try_all::<Value>().await;
        let now = ids::now_ms();
        let mut located = Vec::new();
        for (user_id, hash) in user_ids.iter().zip(hashes) {
            let hash: HashMap<String, String> = hash.and_then(Value::convert).map_err(unavailable)?;
            located.extend(
                hash.into_iter().filter_map(|(session_id, value)| decode_live(user_id, &session_id, &value, now)),
            );
        }
        Ok(located)
    }

    async fn status(&self, user_ids: &[String]) -> Result<Vec<UserStatus>, Error> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.client.pipeline();
        for user_id in user_ids {
            let [sessions, last_seen] = self.keys(user_id);
            pipeline.hvals::<(), _>(sessions).await.map_err(unavailable)?;
            pipeline.get::<(), _>(last_seen).await.map_err(unavailable)?;
        }
        let mut values = pipeline.try_all::<Value>().await.into_iter();
        let now = ids::now_ms();
        let mut statuses = Vec::with_capacity(user_ids.len());
        for user_id in user_ids {
            let (Some(sessions), Some(last_seen)) = (values.next(), values.next()) else {
                return Err(Error::Unavailable("redis: short status pipeline answer".into()));
            };
            let sessions: Vec<String> = sessions.and_then(Value::convert).map_err(unavailable)?;
            let last_seen: Option<i64> = last_seen.and_then(Value::convert).map_err(unavailable)?;
            statuses.push(UserStatus {
                user_id: user_id.clone(),
                online: sessions.iter().any(|value| live_body(value, now).is_some()),
                last_seen_ms: last_seen.unwrap_or_default(),
            });
        }
        Ok(statuses)
    }

    fn session_ttl(&self) -> Duration {
        self.ttl
    }
}
