//! The notify service's configuration.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    guard::EgressOptions,
    providers::{apns::ApnsOptions, fcm::FcmOptions, web_push::WebPushOptions},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Internal gRPC address (never exposed to clients).
    pub listen: String,
    /// Where devices, mutes and the outbox live.
    pub store: StoreBackend,
    /// SQLite file of devices, mutes and the outbox; empty means
    /// `<data_dir>/notify.db`. One notify instance per file.
    pub database: Option<PathBuf>,
    /// How long a push waits before it leaves: a read on another device
    /// within it cancels the push (a user active on the desktop is not
    /// buzzed on the phone).
    #[serde(with = "humantime_serde")]
    pub read_grace: Duration,
    /// How often the workers look for due jobs when nothing woke them: jobs
    /// of other instances (leases of a stopped one, its queue). Jobs this
    /// instance stores wake it when they are due.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Jobs one claim takes.
    pub claim_batch: usize,
    /// Pushes in flight at once, over every provider.
    pub max_in_flight: usize,
    /// How long a claimed job is this worker's; one not finished by then
    /// (its process died) is claimed again.
    #[serde(with = "humantime_serde")]
    pub claim_lease: Duration,
    /// Attempts before a job is dead-lettered.
    pub max_attempts: u32,
    /// Backoff after the first failure, doubled per attempt (with jitter) up
    /// to `retry_max_delay`; a provider's Retry-After is honoured when longer.
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Pushes one device may get per minute (a burst of this many); more
    /// wait their turn, and a conversation's waiting pushes collapse into one.
    pub pushes_per_device_per_minute: u32,
    /// Devices one user may register.
    pub max_devices_per_user: usize,
    /// Entries one Enqueue call may carry, and recipients per entry.
    pub max_entries_per_call: usize,
    pub max_recipients_per_entry: usize,
    /// Characters of a message body a preview keeps (previews only go to
    /// devices that allow them).
    pub preview_chars: usize,
    /// Sent, cancelled and retracted jobs are kept this long (a read within
    /// it retracts what was shown), dead-lettered ones `dead_letter_retention`;
    /// then the outbox forgets them.
    #[serde(with = "humantime_serde")]
    pub finished_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub dead_letter_retention: Duration,
    /// How often the outbox gauges are updated and old jobs purged.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Calls out to providers, webhooks and WebPush endpoints.
    pub egress: EgressOptions,
    /// How often credential files are compared with what was loaded (a
    /// change, or SIGHUP, reloads them without a restart).
    #[serde(with = "humantime_serde")]
    pub credentials_reload_interval: Duration,
    /// Pushes in a row an endpoint (a webhook's or Web Push service's host,
    /// or APNs / FCM) may fail (timeout, refused connection, 5xx, 429)
    /// before it gets none for `circuit_open`; its jobs wait, not counted
    /// as attempts, and then one push tries it again.
    pub circuit_failures: u32,
    #[serde(with = "humantime_serde")]
    pub circuit_open: Duration,
    pub apns: ApnsOptions,
    pub fcm: FcmOptions,
    pub web_push: WebPushOptions,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file (`database`): the embedded default, one notify instance.
    #[default]
    Sqlite,
    /// The ScyllaDB cluster and keyspace of `message.scylla`, for several
    /// notify instances.
    Scylla,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7740".into(),
            store: StoreBackend::default(),
            database: None,
            read_grace: Duration::from_secs(3),
            poll_interval: Duration::from_secs(2),
            claim_batch: 256,
            max_in_flight: 64,
            claim_lease: Duration::from_secs(60),
            max_attempts: 8,
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(300),
            pushes_per_device_per_minute: 30,
            max_devices_per_user: 20,
            max_entries_per_call: 512,
            max_recipients_per_entry: 2048,
            preview_chars: 180,
            finished_retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
            maintenance_interval: Duration::from_secs(15),
            egress: EgressOptions::default(),
            credentials_reload_interval: Duration::from_secs(10),
            circuit_failures: 5,
            circuit_open: Duration::from_secs(30),
            apns: ApnsOptions::default(),
            fcm: FcmOptions::default(),
            web_push: WebPushOptions::default(),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("claim_batch", self.claim_batch),
            ("max_in_flight", self.max_in_flight),
            ("max_attempts", self.max_attempts as usize),
            ("circuit_failures", self.circuit_failures as usize),
            ("pushes_per_device_per_minute", self.pushes_per_device_per_minute as usize),
            ("max_devices_per_user", self.max_devices_per_user),
            ("max_entries_per_call", self.max_entries_per_call),
            ("max_recipients_per_entry", self.max_recipients_per_entry),
            ("egress.max_response_bytes", self.egress.max_response_bytes),
            ("egress.max_url_bytes", self.egress.max_url_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("notify.{name} must be positive"));
        }
        let durations = [
            ("poll_interval", self.poll_interval),
            ("claim_lease", self.claim_lease),
            ("retry_initial_delay", self.retry_initial_delay),
            ("circuit_open", self.circuit_open),
            ("egress.request_timeout", self.egress.request_timeout),
            ("egress.connect_timeout", self.egress.connect_timeout),
            ("credentials_reload_interval", self.credentials_reload_interval),
            ("finished_retention", self.finished_retention),
            ("dead_letter_retention", self.dead_letter_retention),
            ("maintenance_interval", self.maintenance_interval),
        ];
        if let Some((name, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err(format!("notify.{name} must be positive"));
        }
        if self.retry_max_delay < self.retry_initial_delay {
            return Err("notify.retry_max_delay must be at least notify.retry_initial_delay".into());
        }
        // A job must finish (one request, bounded by its timeout) within its lease,
        // or a slow push would be claimed and sent again.
        if self.claim_lease <= self.egress.request_timeout * 2 {
            return Err("notify.claim_lease must be more than twice notify.egress.request_timeout".into());
        }
        self.validate_providers()
    }

    fn validate_providers(&self) -> Result<(), String> {
        let endpoint = |name: &str, text: &str| match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "https" | "http") && url.host().is_some() => Ok(()),
            _ => Err(format!("notify.{name}.endpoint {text:?} is not an http(s) URL")),
        };
        endpoint("apns", &self.apns.endpoint)?;
        endpoint("fcm", &self.fcm.endpoint)?;
        let mut seen = std::collections::HashSet::new();
        for app in &self.apns.apps {
            if app.bundle_id.is_empty() || app.team_id.is_empty() || app.key_id.is_empty() {
                return Err("notify.apns.apps: bundle_id, team_id and key_id are required".into());
            }
            if !seen.insert(("apns", app.bundle_id.as_str())) {
                return Err(format!("notify.apns.apps: bundle_id {:?} appears twice", app.bundle_id));
            }
        }
        for app in &self.fcm.apps {
            if app.project_id.is_empty() || app.service_account_file.as_os_str().is_empty() {
                return Err("notify.fcm.apps: project_id and service_account_file are required".into());
            }
            if !seen.insert(("fcm", app.project_id.as_str())) {
                return Err(format!("notify.fcm.apps: project_id {:?} appears twice", app.project_id));
            }
        }
        if self.web_push.vapid_key_file.is_some()
            && !(self.web_push.subject.starts_with("mailto:") || self.web_push.subject.starts_with("https://"))
        {
            return Err("notify.web_push.subject must be a mailto: or https: URL (push services contact it)".into());
        }
        Ok(())
    }
}
