//! Model-based test: random sequences of send / bursts of concurrent sends /
//! retry / edit / react / delete / read, group membership changes (add, remove, re-add, leave) during the
//! traffic, devices going offline and back, and a broken link to the gateway
//! (its `Deliver` calls fail for a few steps), across four users with two
//! devices each, checked against a reference model.
//!
//! After every step: no device holds an entry outside its user's visibility
//! ranges (DESIGN section 4), nor text or a reaction that an entry outside
//! them wrote. After the last step: the devices that stayed online hold
//! exactly what their user may see, once each and in order, within the
//! repair bound and without reconnecting; then the others too, once back
//! online. Devices of users whose membership never changed equal the model,
//! and read cursors only moved forward.
//!
//! Seeds: 50 per run on SQLite, 10 on the CQL node; `MESSENGER_MODEL_SEEDS=K`
//! runs K, `MESSENGER_MODEL_SEED=N` replays one. Every run prints its seeds,
//! so a failure names the seed that reproduces it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use messenger_client::{Client, Event};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

use crate::support::*;

const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
/// Creates the group and adds and removes the others; never leaves it.
const ADMIN: &str = "ann";
const DEVICES: [&str; 2] = ["phone", "laptop"];
const EMOJI: [&str; 3] = ["👍", "❤️", "😂"];
const STEPS: usize = 80;

/// What a TEXT message should look like once everything has been applied.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    sender: String,
    body: String,
    edited: bool,
    deleted: bool,
    reactions: BTreeMap<String, String>,
}

#[derive(Default)]
struct ConversationModel {
    head: u64,
    messages: BTreeMap<u64, Expected>,
    /// Per user: highest read (own sends count as read).
    read: BTreeMap<String, u64>,
    /// (sender, client_msg_id) -> seq, for retries.
    sent: Vec<(String, String, u64)>,
    /// Per user: its memberships as (from, to) seqs, `to` None while it lasts.
    ranges: BTreeMap<String, Vec<(u64, Option<u64>)>>,
    /// Users added, removed or gone since the conversation began.
    changed: HashSet<String>,
    /// The entry that wrote each text (every body is unique).
    bodies: HashMap<String, u64>,
    /// (message, reactor, emoji) -> the reaction entries that set it.
    reactions: HashMap<(u64, String, String), Vec<u64>>,
}

impl ConversationModel {
    fn starting_with(head: u64, members: &[&str]) -> Self {
        let ranges = members.iter().map(|user| (user.to_string(), vec![(head.min(1), None)])).collect();
        Self { head, ranges, ..Self::default() }
    }

    fn visible(&self, user: &str, seq: u64) -> bool {
        self.ranges
            .get(user)
            .is_some_and(|ranges| ranges.iter().any(|&(from, to)| seq >= from && to.is_none_or(|to| seq <= to)))
    }

    fn is_member(&self, user: &str) -> bool {
        self.ranges.get(user).and_then(|ranges| ranges.last()).is_some_and(|(_, to)| to.is_none())
    }

    /// Every seq `user` may see, ascending.
    fn visible_seqs(&self, user: &str) -> Vec<u64> {
        (1..=self.head).filter(|&seq| self.visible(user, seq)).collect()
    }

    /// The members now, in `USERS` order.
    fn members(&self) -> Vec<&'static str> {
        USERS.iter().copied().filter(|user| self.is_member(user)).collect()
    }

    /// Takes the next seq for an entry `user` appended.
    fn append(&mut self, seq: u64, context: &str) {
        assert_eq!(seq, self.head + 1, "{context}: seq not dense");
        self.head = seq;
    }
}

struct Device {
    user: &'static str,
    name: &'static str,
    client: Client,
    online: bool,
    /// (conversation, seq) of every Message event, in arrival order.
    seen: Arc<Mutex<Vec<(String, u64)>>>,
    /// Streams opened (the first included).
    connects: Arc<AtomicUsize>,
    /// Times the test brought it online (the first connect included): it
    /// opens no stream beyond these, or it reconnected to catch up.
    brought_online: usize,
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("MESSENGER_MODEL_SEED") {
        return vec![seed.parse().expect("MESSENGER_MODEL_SEED is a number")];
    }
    let default = if on_scylla() { 10 } else { 50 };
    let count: u64 = std::env::var("MESSENGER_MODEL_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(default);
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    (0..count).map(|i| base.wrapping_mul(31).wrapping_add(i)).collect()
}

#[tokio::test]
async fn random_operations_converge_to_the_model() {
    for seed in seeds() {
        eprintln!("model seed {seed} (replay with MESSENGER_MODEL_SEED={seed})");
        run(seed).await;
    }
}

/// No device holds an entry, a text or a reaction outside its user's ranges.
fn check_visibility(devices: &[Device], model: &HashMap<String, ConversationModel>, context: &str) {
    for device in devices {
        let label = format!("{context}, {} {}", device.user, device.name);
        for (id, seq) in device.seen.lock().unwrap().iter() {
            assert!(model[id].visible(device.user, *seq), "{label}: received seq {seq}, outside its ranges");
        }
        for (id, expected) in model {
            let Some(state) = device.client.conversation_state(id) else { continue };
            assert!(expected.ranges.contains_key(device.user), "{label}: sees a conversation it was never in");
            for (seq, message) in &state.messages {
                assert!(expected.visible(device.user, *seq), "{label}: holds message {seq}, outside its ranges");
                if !message.body.is_empty() {
                    let written = expected.bodies.get(&message.body).expect("every text the model wrote");
                    assert!(
                        expected.visible(device.user, *written),
                        "{label}: message {seq} shows the text of entry {written}, outside its ranges"
                    );
                }
                for (reactor, emoji) in &message.reactions {
                    let sources = expected.reactions.get(&(*seq, reactor.clone(), emoji.clone()));
                    assert!(
                        sources.is_some_and(|seqs| seqs.iter().any(|s| expected.visible(device.user, *s))),
                        "{label}: message {seq} shows {reactor}'s {emoji}, set by no entry it may see"
                    );
                }
            }
        }
    }
}

/// Whether `device` holds everything its user may see (and the receipts of
/// the members whose membership never changed).
fn caught_up(device: &Device, model: &HashMap<String, ConversationModel>) -> bool {
    model.iter().all(|(id, expected)| {
        if !expected.ranges.contains_key(device.user) {
            return true;
        }
        let visible = expected.visible_seqs(device.user);
        device.client.conversation_state(id).is_some_and(|state| {
            state.last_seq == visible.last().copied().unwrap_or(0)
                && (expected.changed.contains(device.user)
                    || USERS.iter().filter(|u| expected.is_member(u) && !expected.changed.contains(**u)).all(|u| {
                        state.read_seq.get(*u).copied().unwrap_or(0) >= expected.read.get(*u).copied().unwrap_or(0)
                    }))
        })
    })
}

async fn wait_until_caught_up(
    devices: &[&Device],
    model: &HashMap<String, ConversationModel>,
    within: Duration,
    context: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !devices.iter().all(|device| caught_up(device, model)) {
        if tokio::time::Instant::now() >= deadline {
            let mut report = Vec::new();
            for device in devices {
                for (id, expected) in model.iter().filter(|(_, m)| m.ranges.contains_key(device.user)) {
                    let state = device.client.conversation_state(id);
                    report.push(format!(
                        "{} {} in {id}: last_seq {:?}, may see {:?}, read {:?} want {:?}",
                        device.user,
                        device.name,
                        state.as_ref().map(|s| s.last_seq),
                        expected.visible_seqs(device.user).last(),
                        state.as_ref().map(|s| s.read_seq.clone()),
                        expected.read
                    ));
                }
            }
            panic!("{context}: devices did not catch up within {within:?}:\n{}", report.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let link = DeliveryLink::bind().await;
    let system = TestSystem::start_with(|config| {
        link.route(config);
        // The model acts faster than a person: no rate limit is what it tests.
        let limits = &mut config.gateway.rate_limits;
        for rate in
            [&mut limits.group_changes, &mut limits.modifications, &mut limits.reads, &mut limits.connects_per_user]
        {
            (rate.per_second, rate.burst) = (100_000, 100_000);
        }
    })
    .await;
    link.lead_to(&system);
    let fanout = &system.config.message.fanout;
    let repair_bound = fanout.redeliver_backoff * (2u32.pow(fanout.redeliver_attempts) - 1);
    let mut devices = Vec::new();
    for user in USERS {
        for device in DEVICES {
            let (client, mut events) = system.connect(user, device).await;
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connects = Arc::new(AtomicUsize::new(0));
            let (sink, opened) = (seen.clone(), connects.clone());
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    match event {
                        Event::Message(message) => sink.lock().unwrap().push((message.conversation_id, message.seq)),
                        Event::Connected { .. } => {
                            opened.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            });
            devices.push(Device { user, name: device, client, online: true, seen, connects, brought_online: 1 });
        }
    }
    let group = devices[0].client.create_group("model", &["ben", "cat"]).await.unwrap().conversation_id;
    let direct = devices[0].client.direct("ben").await.unwrap().conversation_id;
    let mut model: HashMap<String, ConversationModel> = HashMap::new();
    model.insert(group.clone(), ConversationModel::starting_with(1, &["ann", "ben", "cat"]));
    model.insert(direct.clone(), ConversationModel::starting_with(0, &["ann", "ben"]));
    let mut cut_until = None;

    for step in 0..STEPS {
        if cut_until.is_some_and(|until| step >= until) {
            link.set_cut(false);
            cut_until = None;
        }
        let op = rng.random_range(0..100);
        let conversation = if (14..22).contains(&op) || rng.random_bool(0.6) { group.clone() } else { direct.clone() };
        let context = format!("seed {seed} step {step} op {op}");
        let participants = model[&conversation].members();
        let online: Vec<usize> =
            (0..devices.len()).filter(|&i| devices[i].online && participants.contains(&devices[i].user)).collect();
        if op < 10 {
            // Disconnect or reconnect a random device.
            let device = &mut devices[rng.random_range(0..8)];
            if device.online {
                device.client.go_offline().await;
            } else {
                device.client.go_online().await;
                device.brought_online += 1;
            }
            device.online = !device.online;
            continue;
        }
        if op < 14 {
            // The link to the gateway breaks for one to three steps: Deliver calls fail.
            if cut_until.is_none() {
                link.set_cut(true);
                cut_until = Some(step + rng.random_range(1..=3));
            }
            continue;
        }
        let state = model.get_mut(&conversation).unwrap();
        if op < 22 {
            // A membership change: the admin adds or removes someone, or they leave.
            let user = ["ben", "cat", "dan"][rng.random_range(0..3)];
            let Some(admin) = devices.iter().find(|d| d.online && d.user == ADMIN).map(|d| d.client.clone()) else {
                continue;
            };
            let own = devices.iter().find(|d| d.online && d.user == user).map(|d| d.client.clone());
            let event = if !state.is_member(user) {
                admin.add_members(&conversation, &[user]).await
            } else if let Some(own) = own.filter(|_| rng.random_bool(0.5)) {
                own.leave(&conversation).await
            } else {
                admin.remove_member(&conversation, user).await
            };
            let seq = event.expect(&context).expect("a membership change makes an entry").seq;
            state.append(seq, &context);
            let ranges = state.ranges.entry(user.to_owned()).or_default();
            match ranges.last_mut() {
                Some((_, to @ None)) => *to = Some(seq),
                _ => ranges.push((seq, None)),
            }
            state.changed.insert(user.to_owned());
            check_visibility(&devices, &model, &context);
            continue;
        }
        let Some(&actor) = online.get(rng.random_range(0..online.len().max(1))) else { continue };
        let user = devices[actor].user.to_owned();
        let client = devices[actor].client.clone();
        let visible_text: Vec<u64> = state.messages.keys().copied().filter(|&seq| state.visible(&user, seq)).collect();
        let own_text: Vec<u64> =
            visible_text.iter().copied().filter(|seq| state.messages[seq].sender == user).collect();
        match op {
            22..=48 => {
                // A send; from op 42 on, a burst of sends from up to four
                // devices at once (on the CQL node a burst's rows may become
                // readable out of order: no device may be pushed past a gap).
                let mut senders = vec![actor];
                if op >= 42 {
                    senders.extend(online.iter().copied().filter(|&other| other != actor).take(3));
                }
                let sends = senders.iter().enumerate().map(|(i, &index)| {
                    let (user, client, conversation) =
                        (devices[index].user, devices[index].client.clone(), &conversation);
                    let (client_msg_id, body) =
                        (format!("{user}-{step}-{i}"), format!("message {step}.{i} from {user}"));
                    async move {
                        let ack = client.send_with_id(conversation, &client_msg_id, &body).await;
                        (ack, user, client_msg_id, body)
                    }
                });
                let mut sent: Vec<(u64, &str, String, String)> = Vec::new();
                for (ack, user, client_msg_id, body) in futures::future::join_all(sends).await {
                    sent.push((ack.expect(&context).seq, user, client_msg_id, body));
                }
                sent.sort();
                for (seq, user, client_msg_id, body) in sent {
                    state.append(seq, &context);
                    state.bodies.insert(body.clone(), seq);
                    let expected = Expected {
                        sender: user.to_owned(),
                        body,
                        edited: false,
                        deleted: false,
                        reactions: BTreeMap::new(),
                    };
                    state.messages.insert(seq, expected);
                    state.read.insert(user.to_owned(), seq);
                    state.sent.push((user.to_owned(), client_msg_id, seq));
                }
            }
            49..=56 => {
                // Retry an earlier send of this user, with a different body.
                let earlier: Vec<&(String, String, u64)> = state.sent.iter().filter(|(u, _, _)| *u == user).collect();
                let Some((_, client_msg_id, seq)) = earlier.get(rng.random_range(0..earlier.len().max(1))).copied()
                else {
                    continue;
                };
                let ack = client.send_with_id(&conversation, client_msg_id, "retried body").await.expect(&context);
                assert_eq!(ack.seq, *seq, "{context}: retry got a new seq");
            }
            57..=67 => {
                // Edit: one's own message succeeds unless deleted; someone else's is refused.
                let Some(&seq) = visible_text.get(rng.random_range(0..visible_text.len().max(1))) else { continue };
                let body = format!("edited at {step}");
                let result = client.edit(&conversation, seq, &body).await;
                let expected = &state.messages[&seq];
                if expected.sender != user {
                    assert_eq!(result.unwrap_err().code(), Code::PermissionDenied, "{context}");
                } else if expected.deleted {
                    assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition, "{context}");
                } else {
                    let entry = result.expect(&context).expect("an edit makes an entry");
                    state.append(entry.seq, &context);
                    state.bodies.insert(body.clone(), entry.seq);
                    let message = state.messages.get_mut(&seq).unwrap();
                    message.body = body;
                    message.edited = true;
                }
            }
            68..=79 => {
                let Some(&seq) = visible_text.get(rng.random_range(0..visible_text.len().max(1))) else { continue };
                let emoji = if rng.random_bool(0.25) { "" } else { EMOJI[rng.random_range(0..EMOJI.len())] };
                let result = client.react(&conversation, seq, emoji).await;
                if state.messages[&seq].deleted {
                    assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition, "{context}");
                    continue;
                }
                let current = state.messages[&seq].reactions.get(&user).cloned().unwrap_or_default();
                let entry = result.expect(&context);
                if current == emoji {
                    assert!(entry.is_none(), "{context}: an unchanged reaction made an entry");
                    continue;
                }
                let entry_seq = entry.expect("a reaction entry").seq;
                state.append(entry_seq, &context);
                let message = state.messages.get_mut(&seq).unwrap();
                if emoji.is_empty() {
                    message.reactions.remove(&user);
                } else {
                    message.reactions.insert(user.clone(), emoji.to_owned());
                    state.reactions.entry((seq, user, emoji.to_owned())).or_default().push(entry_seq);
                }
            }
            80..=87 => {
                let Some(&seq) = own_text.get(rng.random_range(0..own_text.len().max(1))) else { continue };
                let entry = client.delete(&conversation, seq).await.expect(&context);
                if state.messages[&seq].deleted {
                    assert!(entry.is_none(), "{context}: deleting twice made an entry");
                } else {
                    state.append(entry.expect("a delete entry").seq, &context);
                    let message = state.messages.get_mut(&seq).unwrap();
                    message.deleted = true;
                    message.body.clear();
                    message.reactions.clear();
                }
            }
            _ => {
                let upto = rng.random_range(0..=state.head);
                client.mark_read(&conversation, upto).await.expect(&context);
                let read = state.read.entry(user).or_default();
                *read = (*read).max(upto);
            }
        }
        check_visibility(&devices, &model, &context);
    }

    // The link mends; the devices that stayed online catch up within the
    // repair bound (a margin for the calls themselves), without reconnecting.
    link.set_cut(false);
    let online: Vec<&Device> = devices.iter().filter(|device| device.online).collect();
    let margin = if on_scylla() { Duration::from_secs(6) } else { Duration::from_secs(2) };
    wait_until_caught_up(&online, &model, repair_bound + margin, &format!("seed {seed}, online devices")).await;
    for device in devices.iter().filter(|device| device.online) {
        let opened = device.connects.load(Ordering::SeqCst);
        assert!(
            opened <= device.brought_online,
            "seed {seed}: {} {} reconnected to catch up",
            device.user,
            device.name
        );
    }
    // Then everyone else, once back online.
    for device in devices.iter_mut().filter(|d| !d.online) {
        device.client.go_online().await;
        device.online = true;
    }
    wait_until_caught_up(&devices.iter().collect::<Vec<_>>(), &model, WAIT, &format!("seed {seed}, all devices")).await;
    check_visibility(&devices, &model, &format!("seed {seed}, at the end"));

    for device in &devices {
        let label = format!("seed {seed}, {} {}", device.user, device.name);
        let seen = device.seen.lock().unwrap().clone();
        for (id, expected) in &model {
            if !expected.ranges.contains_key(device.user) {
                assert!(device.client.conversation_state(id).is_none(), "{label}: sees a conversation it was never in");
                continue;
            }
            // Exactly once, in order: every entry it may see (the group's creation included).
            let order: Vec<u64> = seen.iter().filter(|(c, _)| c == id).map(|(_, s)| *s).collect();
            let visible = expected.visible_seqs(device.user);
            assert_eq!(order, visible, "{label}: entries received, against those it may see");
            let state = device.client.conversation_state(id).unwrap();
            let texts: Vec<u64> =
                expected.messages.keys().copied().filter(|&seq| expected.visible(device.user, seq)).collect();
            assert_eq!(state.messages.keys().copied().collect::<Vec<_>>(), texts, "{label}: messages held");
            if expected.changed.contains(device.user) {
                continue;
            }
            let actual: BTreeMap<u64, Expected> = state
                .messages
                .iter()
                .map(|(seq, m)| {
                    (
                        *seq,
                        Expected {
                            sender: m.sender_id.clone(),
                            body: m.body.clone(),
                            edited: m.edited,
                            deleted: m.deleted,
                            reactions: m.reactions.clone(),
                        },
                    )
                })
                .collect();
            assert_eq!(actual, expected.messages, "{label}: state differs from the model");
            for message in state.messages.values() {
                assert_eq!(message.own, message.sender_id == device.user, "{label}: own flag");
            }
        }
    }
    // Server-side read cursors: the model's for members whose membership
    // never changed (and so never moved back); a re-added member's starts
    // past what was sent while it was out, so at least the model's.
    for (id, expected) in &model {
        let conversation = devices[0].client.get_conversation(id).await.unwrap();
        for member in &conversation.members {
            let wanted = expected.read.get(&member.user_id).copied().unwrap_or(0).max(if *id == group { 1 } else { 0 });
            if expected.changed.contains(&member.user_id) {
                assert!(member.read_seq >= wanted, "seed {seed}: {}'s read cursor moved back", member.user_id);
            } else {
                assert_eq!(member.read_seq, wanted, "seed {seed}: {}'s read cursor", member.user_id);
            }
        }
    }
}
