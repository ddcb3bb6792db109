//! Files read again when they change: JWT keys and TLS certificates rotate
//! without a restart.
//!
//! The files are polled (their contents compared every `interval`) rather
//! than watched with inotify: Kubernetes updates a mounted Secret by swapping
//! a `..data` symlink, which a watch on the file itself never sees, and
//! reading a few small files every few seconds costs nothing. SIGHUP reloads
//! at once. A reload that fails leaves what was loaded before in use.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::PathBuf,
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Calls `reload` whenever the contents of any of `paths` change (checked
/// every `interval`) or the process receives SIGHUP, until `shutdown`.
/// `reload` answers what it loaded (for the log) or why it could not.
pub fn watch<F>(what: &'static str, paths: Vec<PathBuf>, interval: Duration, shutdown: CancellationToken, reload: F)
where
    F: Fn() -> Result<String, String> + Send + 'static,
{
    if paths.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut seen = fingerprint(&paths);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = hangup_signal();
        loop {
            let by_signal = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                () = next(&mut hangup) => true,
            };
            let now = fingerprint(&paths);
            if !by_signal && now == seen {
                continue;
            }
            seen = now;
            match reload() {
                Ok(loaded) => info!(what, %loaded, by_signal, "reloaded"),
                Err(error) => warn!(what, %error, "reload failed; keeping what was loaded before"),
            }
        }
    });
}

/// A hash of every file's contents (a missing file hashes as missing).
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in paths {
        std::fs::read(path).ok().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn next(hangup: &mut Hangup) {
    match hangup {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
#[cfg(not(unix))]
async fn next(_: &mut Hangup) {
    std::future::pending::<()>().await;
}
