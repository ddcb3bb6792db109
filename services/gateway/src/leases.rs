//! Keeps the presence leases of this gateway's sessions alive.
//!
//! Presence forgets a session `session_ttl` after its registration unless its
//! gateway renews it, so the sessions of a gateway that died stop receiving
//! fan-out by themselves. Every `presence_renew_interval` this task sends one
//! `Renew` naming every session in the registry (split only past
//! `MAX_SESSIONS_PER_RENEW`). Sessions presence reports unknown (it lost them,
//! they expired while presence was unreachable, or a newer connection of the
//! device replaced them) are registered again with `restore`; presence
//! refuses a restore that a newer session of the device supersedes or that
//! the user's session limit no longer allows, and such a session is closed so
//! the device reconnects instead of waiting for deliveries that never come.
//! A failed renewal is logged and retried sooner than the interval.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use messenger_proto::v1 as pb;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::Context;

/// Sessions named in one `Renew` (keeps a huge gateway's messages bounded;
/// presence refuses more than its `max_users_per_call`, 10,000 by default).
const MAX_SESSIONS_PER_RENEW: usize = 5_000;
/// Restores in flight at once after presence lost many sessions.
const CONCURRENT_RESTORES: usize = 32;

/// Renews until shutdown. The first renewal is one interval after the start:
/// a session's registration is its first lease.
pub(crate) async fn run(context: Arc<Context>) {
    let interval = context.options.presence_renew_interval;
    let retry = (interval / 4).max(Duration::from_millis(10));
    let mut wait = interval;
    let mut failures = 0u32;
    let mut warned = false;
    loop {
        tokio::select! {
            () = context.shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let outcome = renew(&context, &mut warned).await;
        renewals().add(
            1,
            &[messenger_platform::metrics::KeyValue::new("outcome", if outcome.is_ok() { "ok" } else { "failed" })],
        );
        wait = match outcome {
            Ok(()) => {
                if failures > 0 {
                    info!(failures, "presence leases renewed again");
                }
                failures = 0;
                interval
            }
            Err(status) => {
                failures += 1;
                warn!(code = ?status.code(), message = status.message(), failures, "presence lease renewal failed; retrying");
                retry
            }
        };
    }
}

/// Renewal rounds of this gateway's presence leases, by outcome.
fn renewals() -> &'static messenger_platform::metrics::Counter<u64> {
    static RENEWALS: std::sync::OnceLock<messenger_platform::metrics::Counter<u64>> = std::sync::OnceLock::new();
    RENEWALS.get_or_init(|| {
        messenger_platform::metrics::meter()
            .u64_counter("messenger.gateway.lease_renewals")
            .with_description("Rounds renewing this gateway's presence leases, by outcome (ok, failed)")
            .build()
    })
}

/// One renewal of every session held now, then the restores it calls for.
async fn renew(context: &Context, warned: &mut bool) -> Result<(), Status> {
    let held = context.registry.leases();
    let mut unknown = Vec::new();
    // A failed chunk does not cost the others their restores: it is reported
    // after them, and retried at the next renewal.
    let mut failed = None;
    for chunk in held.chunks(MAX_SESSIONS_PER_RENEW) {
        let request = pb::RenewRequest {
            gateway_id: context.gateway_id.clone(),
            sessions: chunk
                .iter()
                .map(|s| pb::SessionRef { user_id: s.user_id.clone(), session_id: s.session_id.clone() })
                .collect(),
        };
        let response = match context.presence.clone().renew(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                failed = Some(status);
                continue;
            }
        };
        if !*warned {
            *warned = !interval_fits(context, response.session_ttl_ms);
        }
        unknown.extend(response.unknown_session_ids);
    }
    if unknown.is_empty() {
        return failed.map_or(Ok(()), Err);
    }
    let by_id: HashMap<&str, &Arc<pb::Session>> = held.iter().map(|s| (s.session_id.as_str(), s)).collect();
    let lost: Vec<Arc<pb::Session>> =
        unknown.iter().filter_map(|id| by_id.get(id.as_str()).copied().cloned()).collect();
    info!(sessions = lost.len(), "presence no longer knew some sessions; registering them again");
    futures::stream::iter(lost).for_each_concurrent(CONCURRENT_RESTORES, |session| restore(context, session)).await;
    failed.map_or(Ok(()), Err)
}

/// Registers a session presence reported unknown, if this gateway still holds it.
async fn restore(context: &Context, session: Arc<pb::Session>) {
    let id = session.session_id.as_str();
    if !context.registry.contains(id) {
        return;
    }
    let request = pb::RegisterRequest { session: Some((*session).clone()), restore: true };
    match context.presence.clone().register(request).await {
        Ok(_) => {
            // While presence did not know it, fan-out skipped it: catch up
            // from the cursor. And the session may have ended while it was
            // being restored; its own unregister may have come first, so
            // repeat it.
            if !context.registry.resync(id) {
                let request = pb::UnregisterRequest { user_id: session.user_id.clone(), session_id: id.to_owned() };
                let _ = context.presence.clone().unregister(request).await;
            }
        }
        Err(status) if matches!(status.code(), Code::FailedPrecondition | Code::ResourceExhausted) => {
            info!(session_id = %id, code = ?status.code(), message = status.message(), "session cannot be registered again; closing it");
            context.registry.remove(id);
        }
        Err(status) => {
            warn!(session_id = %id, code = ?status.code(), message = status.message(), "session not registered again; retrying at the next renewal");
        }
    }
}

/// False (after a warning) when the renewal interval is not below the lease
/// presence applies: healthy sessions would expire between renewals.
fn interval_fits(context: &Context, session_ttl_ms: i64) -> bool {
    let interval = context.options.presence_renew_interval;
    let ttl = Duration::from_millis(u64::try_from(session_ttl_ms).unwrap_or_default());
    if ttl.is_zero() || interval < ttl {
        return true;
    }
    warn!(
        renew_interval_ms = interval.as_millis() as u64,
        session_ttl_ms,
        "gateway.presence_renew_interval is not shorter than presence.session_ttl; sessions will expire"
    );
    false
}
