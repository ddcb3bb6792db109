//! Background tasks that cannot die quietly.
//!
//! A service's long-lived tasks (the SQLite writer thread, fan-out workers,
//! the gateway's send pipes, lease renewal, ack flushes) are started through
//! one [`Supervisor`] per process. A panic in any of them is a process
//! failure: it is logged with the task's name, every server turns its health
//! NOT_SERVING at once (the supervisor cancels the process's shutdown token,
//! which starts the drain), and the process exits non-zero so the
//! orchestrator starts a fresh one. Restarting a task in place was rejected:
//! a writer or a pipe that panicked mid-batch leaves state nobody can vouch
//! for, and a fresh process rebuilds all of it from the store.
//!
//! Per-request tasks (a session, a stream) are not supervised: a panic there
//! ends that one call.

use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, OnceLock},
};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// Starts background tasks and stops the process when one of them panics.
#[derive(Clone, Debug)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    stop: CancellationToken,
    failure: OnceLock<String>,
}

impl Supervisor {
    /// A supervisor that cancels `stop` (the process's shutdown token) on the
    /// first failure.
    pub fn new(stop: CancellationToken) -> Self {
        Self { inner: Arc::new(Inner { stop, failure: OnceLock::new() }) }
    }

    /// For components used outside a service process (tools, unit tests):
    /// failures are logged and recorded in [`Supervisor::failure`], and stop
    /// only this supervisor's own token.
    pub fn detached() -> Self {
        Self::new(CancellationToken::new())
    }

    /// Records that `task` failed, logs it and stops the process. Only the
    /// first failure is kept; later ones are logged.
    pub fn fail(&self, task: &str, reason: &str) {
        let text = format!("background task {task} failed: {reason}");
        error!(task, reason, "background task failed; the process stops so that a fresh one takes over");
        let _ = self.inner.failure.set(text);
        self.inner.stop.cancel();
    }

    /// The first failure, if any task failed.
    pub fn failure(&self) -> Option<&str> {
        self.inner.failure.get().map(String::as_str)
    }

    /// Cancelled once any task failed (or the process is stopping).
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// Runs `future` on the runtime; a panic in it fails the process.
    pub fn spawn<F>(&self, task: &'static str, future: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            if let Err(panic) = AssertUnwindSafe(future).catch_unwind().await {
                supervisor.fail(task, &panic_message(&*panic));
            }
        })
    }

    /// Runs `body` on a thread of its own named `name`; a panic in it fails
    /// the process. Everything the body owned is dropped (unwound) before the
    /// failure is reported, so callers waiting on it have their answer.
    pub fn thread<F>(&self, name: &str, body: F) -> std::io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let supervisor = self.clone();
        let task = name.to_owned();
        std::thread::Builder::new().name(task.clone()).spawn(move || {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(body)) {
                supervisor.fail(&task, &panic_message(&*panic));
            }
        })
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        format!("panicked: {text}")
    } else if let Some(text) = panic.downcast_ref::<String>() {
        format!("panicked: {text}")
    } else {
        "panicked".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panicking_task_or_thread_stops_the_process_and_a_finished_one_does_not() {
        let stop = CancellationToken::new();
        let supervisor = Supervisor::new(stop.clone());
        supervisor.spawn("finishes", async {}).await.unwrap();
        supervisor.thread("finishes-too", || {}).unwrap().join().unwrap();
        assert!(!stop.is_cancelled() && supervisor.failure().is_none());

        supervisor.thread("writer", || panic!("injected")).unwrap().join().unwrap();
        tokio::time::timeout(Duration::from_secs(1), stop.cancelled()).await.expect("the stop token was not cancelled");
        assert_eq!(supervisor.failure(), Some("background task writer failed: panicked: injected"));

        // Only the first failure is kept.
        let index = 3;
        supervisor.spawn("worker", async move { panic!("worker {index} broke") }).await.unwrap();
        assert_eq!(supervisor.failure(), Some("background task writer failed: panicked: injected"));

        let other = Supervisor::detached();
        other.spawn("worker", async move { panic!("worker {index} broke") }).await.unwrap();
        assert_eq!(other.failure(), Some("background task worker failed: panicked: worker 3 broke"));
        assert!(other.stopping().is_cancelled());
    }
}
