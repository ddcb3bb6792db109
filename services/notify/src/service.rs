//! The domain logic: registrations, mutes, turning committed entries into
//! push jobs, and what a read does to them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use messenger_platform::ids::{self, now_ms};
use messenger_proto::v1 as pb;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    guard::Guard,
    options::Options,
    providers::webhook,
    store::{Device, Job, JobKind, JobState, Mute, Platform, Preview, PushStore, Unread, WebPushKeys},
};

const MAX_DEVICE_ID_CHARS: usize = 128;
const MAX_APP_ID_CHARS: usize = 256;
const MAX_LOCALE_CHARS: usize = 35;
/// FCM registration tokens are ~160 characters today; their length is not
/// specified, so this leaves room.
const MAX_FCM_TOKEN_CHARS: usize = 4096;

pub struct Service {
    store: Arc<dyn PushStore>,
    options: Options,
    guard: Guard,
    wake: Arc<crate::worker::Wake>,
}

/// What a read did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    pub cancelled: usize,
    pub retracted: usize,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

fn check_user(user_id: &str) -> Result<()> {
    if user_id.is_empty() { Err(invalid("user_id is required")) } else { Ok(()) }
}

fn conversation(text: &str) -> Result<Uuid> {
    ids::parse(text).ok_or_else(|| invalid(format!("conversation_id {text:?} is not a conversation id")))
}

fn bounded(name: &str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(invalid(format!("{name} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{name} may not contain control characters")));
    }
    Ok(())
}

/// Base64url (padded or not) of exactly `len` bytes.
fn key_bytes(name: &str, value: &str, len: usize) -> Result<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| invalid(format!("web_push.{name} is not base64url")))?;
    if bytes.len() != len {
        return Err(invalid(format!("web_push.{name} must be {len} bytes, not {}", bytes.len())));
    }
    Ok(bytes)
}

/// Whether `body` mentions `user_id`: "@" and the id, not followed by
/// another character an id may hold.
fn mentions(body: &str, user_id: &str) -> bool {
    let mention = format!("@{user_id}");
    body.match_indices(&mention).any(|(at, _)| {
        let after = body[at + mention.len()..].chars().next();
        !after.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
            || after == Some('.') && !body[at + mention.len() + 1..].starts_with(|c: char| c.is_alphanumeric())
    })
}

/// A preview's body: at most `chars` characters, cut at a character boundary.
fn truncate(body: &str, chars: usize) -> String {
    match body.char_indices().nth(chars) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

/// The current call's W3C `traceparent` (empty when it is not traced).
fn traceparent() -> String {
    messenger_platform::trace::current().remove("traceparent").unwrap_or_default()
}

/// A device as the owner sees it: without its token or secret.
pub fn device_to_proto(device: &Device) -> pb::PushDevice {
    pb::PushDevice {
        device_id: device.device_id.clone(),
        platform: match device.platform {
            Platform::Apns => pb::PushPlatform::Apns,
            Platform::Fcm => pb::PushPlatform::Fcm,
            Platform::WebPush => pb::PushPlatform::WebPush,
            Platform::Webhook => pb::PushPlatform::Webhook,
        } as i32,
        token: String::new(),
        web_push: None,
        app_id: device.app_id.clone(),
        locale: device.locale.clone(),
        previews: device.previews,
        updated_at_ms: device.updated_at_ms,
    }
}

impl Service {
    pub fn new(store: Arc<dyn PushStore>, options: Options, wake: Arc<crate::worker::Wake>) -> Self {
        let guard = Guard::new(&options.egress);
        Self { store, options, guard, wake }
    }

    /// Checks a registration and turns it into a device.
    async fn device(&self, user_id: &str, request: pb::PushDevice) -> Result<Device> {
        if request.device_id.is_empty() {
            return Err(invalid("device.device_id is required"));
        }
        bounded("device.device_id", &request.device_id, MAX_DEVICE_ID_CHARS)?;
        bounded("device.app_id", &request.app_id, MAX_APP_ID_CHARS)?;
        bounded("device.locale", &request.locale, MAX_LOCALE_CHARS)?;
        let platform = match pb::PushPlatform::try_from(request.platform) {
            Ok(pb::PushPlatform::Apns) => Platform::Apns,
            Ok(pb::PushPlatform::Fcm) => Platform::Fcm,
            Ok(pb::PushPlatform::WebPush) => Platform::WebPush,
            Ok(pb::PushPlatform::Webhook) => Platform::Webhook,
            _ => return Err(invalid("device.platform must be APNS, FCM, WEB_PUSH or WEBHOOK")),
        };
        let (mut token, mut web_push, mut secret) = (request.token, None, String::new());
        match platform {
            Platform::Apns => {
                // A device token is 32 bytes today (64 hex digits); Apple
                // says it may grow, so up to 100 bytes are accepted.
                let hex = token.len() % 2 == 0 && token.chars().all(|c| c.is_ascii_hexdigit());
                if !hex || token.len() < 64 || token.len() > 200 {
                    return Err(invalid("device.token must be an APNs device token: 64 to 200 hex digits"));
                }
                token.make_ascii_lowercase();
            }
            Platform::Fcm => {
                let printable = token.chars().all(|c| c.is_ascii_graphic());
                if token.is_empty() || token.len() > MAX_FCM_TOKEN_CHARS || !printable {
                    return Err(invalid(format!(
                        "device.token must be an FCM registration token (1 to {MAX_FCM_TOKEN_CHARS} printable characters)"
                    )));
                }
            }
            Platform::WebPush => {
                let keys = request.web_push.ok_or_else(|| invalid("device.web_push is required for WEB_PUSH"))?;
                self.check_url("device.web_push.endpoint", &keys.endpoint).await?;
                let p256dh = key_bytes("p256dh", &keys.p256dh, 65)?;
                if p256dh[0] != 4 {
                    return Err(invalid("web_push.p256dh must be an uncompressed P-256 point"));
                }
                key_bytes("auth", &keys.auth, 16)?;
                web_push = Some(WebPushKeys { endpoint: keys.endpoint, p256dh: keys.p256dh, auth: keys.auth });
                token.clear();
            }
            Platform::Webhook => {
                self.check_url("device.token", &token).await?;
                secret = webhook::new_secret();
            }
        }
        Ok(Device {
            user_id: user_id.to_owned(),
            device_id: request.device_id,
            platform,
            token,
            web_push,
            app_id: request.app_id,
            locale: request.locale,
            previews: request.previews,
            secret,
            registration: ids::new_id(),
            updated_at_ms: now_ms(),
        })
    }

    /// A user-supplied URL: scheme, length and literal address here, and its
    /// name resolved now so a name that points inside is refused at once
    /// (it is resolved and checked again at every send).
    async fn check_url(&self, name: &str, text: &str) -> Result<()> {
        let url = self.guard.check_url(text).map_err(|refused| invalid(format!("{name}: {refused}")))?;
        if let Some(url::Host::Domain(host)) = url.host() {
            self.guard.resolve(host).await.map_err(|refused| invalid(format!("{name}: {refused}")))?;
        }
        Ok(())
    }

    pub async fn register(&self, user_id: &str, request: pb::PushDevice) -> Result<(Device, String)> {
        check_user(user_id)?;
        let device = self.device(user_id, request).await?;
        let existing = self.store.devices(user_id).await?;
        let known = existing.iter().any(|d| d.device_id == device.device_id);
        if !known && existing.len() >= self.options.max_devices_per_user {
            return Err(Error::ResourceExhausted(format!(
                "{} devices registered; the limit is {} (unregister one first)",
                existing.len(),
                self.options.max_devices_per_user
            )));
        }
        self.store.put_device(&device).await?;
        let secret = device.secret.clone();
        Ok((device, secret))
    }

    pub async fn unregister(&self, user_id: &str, device_id: &str) -> Result<bool> {
        check_user(user_id)?;
        self.store.remove_device(user_id, device_id).await
    }

    pub async fn devices(&self, user_id: &str) -> Result<Vec<Device>> {
        check_user(user_id)?;
        self.store.devices(user_id).await
    }

    pub async fn mute(&self, user_id: &str, conversation_id: &str, mute: Mute) -> Result<()> {
        check_user(user_id)?;
        self.store.set_mute(user_id, conversation(conversation_id)?, mute).await
    }

    /// Stores one job per offline, registered, unmuted device of each
    /// entry's recipients, due after `read_grace`; returns how many were new.
    pub async fn enqueue(&self, entries: Vec<pb::PushEntry>) -> Result<usize> {
        if entries.len() > self.options.max_entries_per_call {
            return Err(invalid(format!(
                "{} entries in one call; the limit is {}",
                entries.len(),
                self.options.max_entries_per_call
            )));
        }
        let now = now_ms();
        let due = now + self.options.read_grace.as_millis() as i64;
        let trace_context = traceparent();
        let (mut jobs, mut unread) = (Vec::new(), Vec::new());
        let mut devices: HashMap<String, Vec<Device>> = HashMap::new();
        for entry in entries {
            if entry.recipients.len() > self.options.max_recipients_per_entry {
                return Err(invalid(format!(
                    "{} recipients of one entry; the limit is {}",
                    entry.recipients.len(),
                    self.options.max_recipients_per_entry
                )));
            }
            let conversation_id = conversation(&entry.conversation_id)?;
            let users: Vec<String> = entry.recipients.iter().map(|r| r.user_id.clone()).collect();
            // Muted, unless only for what does not mention them and this does.
            let muted: HashSet<String> = self
                .store
                .mutes(&users, conversation_id)
                .await?
                .into_iter()
                .filter(|(user, mute)| {
                    let mentioned = entry.kind == pb::MessageKind::Text as i32 && mentions(&entry.body, user);
                    mute.until_ms > now && !(mute.mentions_only && mentioned)
                })
                .map(|(user, _)| user)
                .collect();
            let preview = Preview {
                sender_id: entry.sender_id.clone(),
                title: entry.title.clone(),
                body: truncate(&entry.body, self.options.preview_chars),
            };
            for recipient in &entry.recipients {
                if recipient.user_id.is_empty() || muted.contains(&recipient.user_id) {
                    continue;
                }
                if !devices.contains_key(&recipient.user_id) {
                    let found = self.store.devices(&recipient.user_id).await?;
                    devices.insert(recipient.user_id.clone(), found);
                }
                let registered = &devices[&recipient.user_id];
                if registered.is_empty() {
                    continue;
                }
                // Counted in the badge whether or not a device was online.
                unread.push(Unread { user_id: recipient.user_id.clone(), conversation_id, seq: entry.seq, at_ms: now });
                let online: HashSet<&str> = recipient.online_device_ids.iter().map(String::as_str).collect();
                for device in registered {
                    if online.contains(device.device_id.as_str()) {
                        continue;
                    }
                    jobs.push(Job {
                        id: Job::id_for(
                            JobKind::Notify,
                            &device.user_id,
                            &device.device_id,
                            conversation_id,
                            entry.seq,
                        ),
                        kind: JobKind::Notify,
                        user_id: device.user_id.clone(),
                        device_id: device.device_id.clone(),
                        conversation_id,
                        seq: entry.seq,
                        state: JobState::Queued,
                        due_at_ms: due,
                        attempts: 0,
                        created_at_ms: if entry.sent_at_ms > 0 { entry.sent_at_ms } else { now },
                        // Kept only for devices that allow previews.
                        preview: device.previews.then(|| preview.clone()),
                        last_error: String::new(),
                        trace_context: trace_context.clone(),
                    });
                }
            }
        }
        // Unread marks first: a push that leaves counts its own entry.
        self.store.add_unread(&unread).await?;
        if jobs.is_empty() {
            return Ok(0);
        }
        let stored = self.store.enqueue(&jobs).await?;
        match self.options.read_grace.is_zero() {
            true => self.wake.now(),
            false => self.wake.at(due),
        }
        Ok(stored)
    }

    /// A read through `read_seq`: the entries leave the badge, waiting
    /// pushes are cancelled, and each device that showed one gets a silent
    /// retraction. The badge is cleared before the retractions are queued
    /// (a worker may send one at once, with the badge it reads then), and
    /// they are queued before the shown jobs are marked retracted, so a
    /// crash on the way loses nothing: a retried read finds them again.
    pub async fn read(&self, user_id: &str, conversation_id: &str, read_seq: u64) -> Result<ReadOutcome> {
        check_user(user_id)?;
        let conversation_id = conversation(conversation_id)?;
        let shown = self.store.shown_through(user_id, conversation_id, read_seq).await?;
        self.store.clear_unread(user_id, conversation_id, read_seq).await?;
        let now = now_ms();
        let retractions: Vec<Job> = shown
            .iter()
            .map(|shown| Job {
                id: Job::id_for(JobKind::Retract, user_id, &shown.device_id, conversation_id, shown.seq),
                kind: JobKind::Retract,
                user_id: user_id.to_owned(),
                device_id: shown.device_id.clone(),
                conversation_id,
                seq: shown.seq,
                state: JobState::Queued,
                due_at_ms: now,
                attempts: 0,
                created_at_ms: now,
                preview: None,
                last_error: String::new(),
                trace_context: traceparent(),
            })
            .collect();
        if !retractions.is_empty() {
            self.store.enqueue(&retractions).await?;
            self.wake.now();
        }
        let cancelled = self.store.read_through(user_id, conversation_id, read_seq).await?;
        Ok(ReadOutcome { cancelled, retracted: retractions.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mention_is_the_whole_user_id_after_an_at_sign() {
        assert!(mentions("@bob look", "bob"));
        assert!(mentions("hey @bob.", "bob"), "punctuation ends it");
        assert!(mentions("cc @alice, @bob", "bob"));
        assert!(!mentions("@bobby look", "bob"), "another user's id");
        assert!(!mentions("@bob.smith look", "bob"), "a longer id with a dot");
        assert!(!mentions("bob look", "bob"), "no at sign");
        assert!(!mentions("mail bob@example.com", "example"), "not after an at sign of its own");
        assert!(mentions("@bob.smith look", "bob.smith"));
    }

    #[test]
    fn previews_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("hello", 5), "hello");
        assert_eq!(truncate("hello!", 5), "hello…");
        assert_eq!(truncate("héllo wörld", 7), "héllo w…");
        assert_eq!(truncate("👋👋👋", 2), "👋👋…");
    }
}
