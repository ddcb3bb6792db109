//! What SREs watch of the sessions: how many are open, why they end, how
//! full their queues run, how long a commit takes to reach a device.

use messenger_platform::metrics;

/// What SREs watch of the sessions: how many are open, why they end.
pub(super) struct SessionMetrics {
    pub(super) open: metrics::UpDownCounter<i64>,
    pub(super) ended: metrics::Counter<u64>,
    /// Frames waiting in a session's queue (`gateway.session_queue_depth`).
    pub(super) queue_depth: metrics::Histogram<u64>,
    /// From a message's commit (its server time) to its live frame.
    pub(super) commit_to_deliver: metrics::Histogram<f64>,
}

/// One open session in `messenger.gateway.sessions`, while it lives.
pub(super) struct OpenSession;

impl OpenSession {
    pub(super) fn count() -> OpenSession {
        session_metrics().open.add(1, &[]);
        OpenSession
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        session_metrics().open.add(-1, &[]);
    }
}

pub(super) fn session_metrics() -> &'static SessionMetrics {
    static METRICS: std::sync::OnceLock<SessionMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = metrics::meter();
        SessionMetrics {
            open: meter
                .i64_up_down_counter("messenger.gateway.sessions")
                .with_description("Connect streams past their Hello, open now")
                .build(),
            ended: meter
                .u64_counter("messenger.gateway.sessions.ended")
                .with_description("Sessions ended, by reason (slow_consumer: cut off for not reading)")
                .build(),
            queue_depth: meter
                .u64_histogram("messenger.gateway.session_queue_depth")
                .with_description("Frames already waiting for the device when a session queues one")
                .with_boundaries(vec![0.0, 1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 1024.0])
                .build(),
            commit_to_deliver: meter
                .f64_histogram("messenger.gateway.commit_to_deliver")
                .with_unit("s")
                .with_description("From a message's commit to its live frame being queued to a device")
                .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0])
                .build(),
        }
    })
}
