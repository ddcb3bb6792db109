//! Where pushes go: one thin client per platform, each returning what the
//! worker does next ([`Outcome`]).
//!
//! [`apns`], [`fcm`] and [`web_push`] push through their platform when its
//! credentials are configured ([`build`]); a platform without credentials
//! goes to the [`LogProvider`] (what `messenger up` runs), which logs ids,
//! never a token or a body. [`webhook`] is always on. Credentials are read
//! from files at start (a bad one stops the start) and read again when a
//! file changes or on SIGHUP (a bad one then keeps the previous set).

pub mod apns;
pub mod fcm;
pub mod web_push;
pub mod webhook;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_trait::async_trait;
use reqwest::{StatusCode, header::HeaderMap};
use tokio_util::sync::CancellationToken;
use tracing::info;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    guard::{EgressOptions, Guard},
    store::{Device, JobKind, Platform, Preview},
};

/// One push as a provider sends it.
#[derive(Clone, Debug)]
pub struct Push {
    /// The job id: the idempotency key every attempt carries.
    pub id: Uuid,
    pub kind: JobKind,
    pub conversation_id: Uuid,
    pub seq: u64,
    /// Only for devices that allow previews.
    pub preview: Option<Preview>,
    /// The user's unread count: entries that notified and that no device
    /// of the user has read yet.
    pub badge: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth another attempt (5xx, 429, timeouts), not before `after` when
    /// the provider said so (Retry-After).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The token or URL is dead for good: the registration goes.
    Gone(String),
    /// Refused for good (a 4xx other than the above): dead-lettered.
    Refused(String),
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The metric label.
    fn name(&self) -> &'static str;

    async fn send(&self, device: &Device, push: &Push) -> Outcome;
}

/// Credentials read from files, replaced whole when they are read again.
pub struct Credential<T> {
    current: RwLock<Option<Arc<T>>>,
}

impl<T> Credential<T> {
    pub fn new(value: T) -> Self {
        Self { current: RwLock::new(Some(Arc::new(value))) }
    }

    pub fn get(&self) -> Option<Arc<T>> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(value));
    }
}

/// The credentials for a device's app id; a device that names none uses
/// the only app configured, if there is exactly one.
pub fn app_entry<'a, T>(apps: &'a HashMap<String, T>, app_id: &str) -> Option<&'a T> {
    match apps.get(app_id) {
        Some(entry) => Some(entry),
        None if app_id.is_empty() && apps.len() == 1 => apps.values().next(),
        None => None,
    }
}

/// What an HTTP answer means, for providers that signal by status:
/// `gone` lists the statuses that mean the token or URL is dead.
pub fn classify(status: StatusCode, headers: &HeaderMap, gone: &[StatusCode]) -> Outcome {
    if status.is_success() {
        Outcome::Delivered
    } else if gone.contains(&status) {
        Outcome::Gone(format!("HTTP {}", status.as_u16()))
    } else if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        Outcome::Retry { after: retry_after(headers), reason: format!("HTTP {}", status.as_u16()) }
    } else {
        Outcome::Refused(format!("HTTP {}", status.as_u16()))
    }
}

/// `Retry-After`: delay seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// Sends `request` and reads what its status means (`gone`: the statuses
/// that mean the URL is dead), reading a bounded part of the body so the
/// connection can be reused.
pub async fn send_for_status(
    request: reqwest::RequestBuilder,
    gone: &[StatusCode],
    max_response_bytes: usize,
) -> Outcome {
    match request.send().await {
        Ok(response) => {
            let outcome = classify(response.status(), response.headers(), gone);
            crate::guard::bounded_body(response, max_response_bytes).await;
            outcome
        }
        Err(error) => transport_failure(&error),
    }
}

/// What a failed request means: a connection that never got an answer is
/// retried.
pub fn transport_failure(error: &reqwest::Error) -> Outcome {
    let reason = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        // The guard's refusals surface here too (a name that resolves inside).
        format!("could not connect: {}", std::error::Error::source(error).map_or(error.to_string(), |s| s.to_string()))
    } else {
        "request failed".to_owned()
    };
    Outcome::Retry { after: None, reason }
}

/// Stands in for a platform without credentials (what `messenger up` runs
/// for APNs, FCM and WebPush devices): logs that it would push.
pub struct LogProvider;

#[async_trait]
impl Provider for LogProvider {
    fn name(&self) -> &'static str {
        "log"
    }

    async fn send(&self, device: &Device, push: &Push) -> Outcome {
        info!(
            platform = device.platform.as_str(),
            push_id = %push.id,
            kind = ?push.kind,
            conversation_id = %push.conversation_id,
            seq = push.seq,
            device_id = device.device_id,
            "push (log provider: no credentials configured for this platform)"
        );
        Outcome::Delivered
    }
}

/// The provider for each platform.
pub struct Providers {
    pub apns: Box<dyn Provider>,
    pub fcm: Box<dyn Provider>,
    pub web_push: Box<dyn Provider>,
    pub webhook: Box<dyn Provider>,
}

impl Providers {
    pub fn for_platform(&self, platform: Platform) -> &dyn Provider {
        match platform {
            Platform::Apns => self.apns.as_ref(),
            Platform::Fcm => self.fcm.as_ref(),
            Platform::WebPush => self.web_push.as_ref(),
            Platform::Webhook => self.webhook.as_ref(),
        }
    }
}

/// The client for a platform's own endpoints (not user-supplied URLs):
/// HTTP/2 where the server offers it, no redirects, the egress timeouts,
/// and `ca_file`'s root trusted besides the public ones.
fn platform_client(egress: &EgressOptions, ca_file: Option<&PathBuf>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(egress.request_timeout)
        .connect_timeout(egress.connect_timeout)
        .user_agent(concat!("messenger-notify/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|error| Error::Config(format!("{}: {error}", path.display())))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .map_err(|error| Error::Config(format!("{}: not a PEM certificate: {error}", path.display())))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().map_err(|error| Error::Config(format!("HTTP client: {error}")))
}

/// Every app's loaded credentials by app id, swapped whole on reload.
pub type Apps<T> = Arc<Credential<HashMap<String, T>>>;

/// An app's credentials as configured: read from one file.
pub trait App: Clone + Send + Sync + 'static {
    type Loaded: Send + Sync + 'static;
    /// The app id devices name (`app_id`).
    fn id(&self) -> &str;
    fn file(&self) -> &PathBuf;
    fn parse(&self, text: &str) -> std::result::Result<Self::Loaded, String>;
}

/// Reads every app's file and parses it; the first failure names its file.
fn load<A: App>(apps: &[A]) -> std::result::Result<HashMap<String, A::Loaded>, String> {
    let mut loaded = HashMap::new();
    for app in apps {
        let path = app.file();
        let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
        let entry = app.parse(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        loaded.insert(app.id().to_owned(), entry);
    }
    Ok(loaded)
}

/// Loads `apps` now and again whenever one of their files changes.
fn reloaded<A: App>(
    what: &'static str,
    apps: &[A],
    reload_interval: std::time::Duration,
    shutdown: &CancellationToken,
) -> Result<Apps<A::Loaded>> {
    let credential = Arc::new(Credential::new(load(apps).map_err(Error::Config)?));
    let paths = apps.iter().map(|app| app.file().clone()).collect();
    let (reloading, apps) = (credential.clone(), apps.to_vec());
    messenger_platform::reload::watch(what, paths, reload_interval, shutdown.clone(), move || {
        let loaded = load(&apps)?;
        let count = loaded.len();
        reloading.set(loaded);
        Ok(format!("{count} apps"))
    });
    Ok(credential)
}

/// What the providers are built from: the notify options' egress and
/// provider sections, and how often credential files are looked at.
pub struct Settings<'a> {
    pub egress: &'a EgressOptions,
    pub apns: &'a apns::ApnsOptions,
    pub fcm: &'a fcm::FcmOptions,
    pub web_push: &'a web_push::WebPushOptions,
    pub reload_interval: std::time::Duration,
}

/// The providers `options` configure: a platform's own client where its
/// credentials are set, the log provider where they are not.
pub fn build(options: &Settings<'_>, shutdown: &CancellationToken) -> Result<Providers> {
    let guard = Guard::new(options.egress);
    let max_response = options.egress.max_response_bytes;
    let apns: Box<dyn Provider> = if options.apns.apps.is_empty() {
        Box::new(LogProvider)
    } else {
        let keys = reloaded("APNs keys", &options.apns.apps, options.reload_interval, shutdown)?;
        let client = platform_client(options.egress, options.apns.ca_file.as_ref())?;
        info!(apps = options.apns.apps.len(), endpoint = %options.apns.endpoint, "APNs pushes on");
        Box::new(apns::Apns::new(client, options.apns, keys, max_response))
    };
    let fcm: Box<dyn Provider> = if options.fcm.apps.is_empty() {
        Box::new(LogProvider)
    } else {
        let accounts = reloaded("FCM service accounts", &options.fcm.apps, options.reload_interval, shutdown)?;
        let client = platform_client(options.egress, options.fcm.ca_file.as_ref())?;
        info!(apps = options.fcm.apps.len(), endpoint = %options.fcm.endpoint, "FCM pushes on");
        Box::new(fcm::Fcm::new(client, options.fcm, accounts, max_response))
    };
    let web_push: Box<dyn Provider> = match &options.web_push.vapid_key_file {
        None => Box::new(LogProvider),
        Some(path) => {
            let read = {
                let path = path.clone();
                move || {
                    let text =
                        std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))?;
                    web_push::VapidKey::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
                }
            };
            let key = Arc::new(Credential::new(read().map_err(Error::Config)?));
            info!(public_key = key.get().map(|k| k.public_key().to_owned()).unwrap_or_default(), "Web Push on (VAPID)");
            let reloading = key.clone();
            messenger_platform::reload::watch(
                "VAPID key",
                vec![path.clone()],
                options.reload_interval,
                shutdown.clone(),
                move || {
                    reloading.set(read()?);
                    Ok("1 key".into())
                },
            );
            Box::new(web_push::WebPush::new(guard.clone(), options.egress, options.web_push, key))
        }
    };
    let webhook = Box::new(webhook::Webhook::new(guard, options.egress));
    Ok(Providers { apns, fcm, web_push, webhook })
}

#[cfg(test)]
mod tests {
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    use super::*;

    #[test]
    fn statuses_mean_what_providers_say() {
        let mut headers = HeaderMap::new();
        let gone = [StatusCode::GONE, StatusCode::NOT_FOUND];
        assert_eq!(classify(StatusCode::NO_CONTENT, &headers, &gone), Outcome::Delivered);
        assert_eq!(classify(StatusCode::GONE, &headers, &gone), Outcome::Gone("HTTP 410".into()));
        assert_eq!(classify(StatusCode::BAD_REQUEST, &headers, &gone), Outcome::Refused("HTTP 400".into()));
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &headers, &gone),
            Outcome::Retry { after: None, reason: "HTTP 500".into() }
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &headers, &gone),
            Outcome::Retry { after: Some(Duration::from_secs(7)), reason: "HTTP 429".into() }
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let after = retry_after(&headers).unwrap();
        assert!(after > Duration::from_secs(110) && after <= Duration::from_secs(120), "{after:?}");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None, "unreadable: the worker's own backoff");
    }
}
