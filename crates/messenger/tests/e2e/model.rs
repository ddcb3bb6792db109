//! Model-based test: random sequences of send / retry / edit / react / delete
//! / disconnect / reconnect / read across three users with two devices each,
//! checked against a simple reference model. After quiescence every device's
//! SDK state equals the model; no message is lost or shown twice; order per
//! conversation is kept; read cursors only move forward.
//!
//! Seeds: `MESSENGER_MODEL_SEED=N` replays one seed; `MESSENGER_MODEL_SEEDS=K`
//! runs K seeds (default 6). Every run prints its seeds, so a failure names the
//! seed that reproduces it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use messenger_client::{Client, Event};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

use crate::support::*;

const USERS: [&str; 3] = ["ann", "ben", "cat"];
const DEVICES: [&str; 2] = ["phone", "laptop"];
const EMOJI: [&str; 3] = ["👍", "❤️", "😂"];
const STEPS: usize = 60;

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
}

struct Device {
    user: &'static str,
    name: &'static str,
    client: Client,
    online: bool,
    /// (conversation, seq) of every Message event, in arrival order.
    seen: Arc<Mutex<Vec<(String, u64)>>>,
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("MESSENGER_MODEL_SEED") {
        return vec![seed.parse().expect("MESSENGER_MODEL_SEED is a number")];
    }
    let count: u64 = std::env::var("MESSENGER_MODEL_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(6);
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

async fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let system = TestSystem::start().await;
    let mut devices = Vec::new();
    for user in USERS {
        for device in DEVICES {
            let (client, mut events) = system.connect(user, device).await;
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    if let Event::Message(message) = event {
                        sink.lock().unwrap().push((message.conversation_id, message.seq));
                    }
                }
            });
            devices.push(Device { user, name: device, client, online: true, seen });
        }
    }
    let group = devices[0].client.create_group("model", &USERS[1..]).await.unwrap().conversation_id;
    let direct = devices[0].client.direct(USERS[1]).await.unwrap().conversation_id;
    let mut model: HashMap<String, ConversationModel> = HashMap::new();
    model.entry(group.clone()).or_default().head = 1;
    model.entry(direct.clone()).or_default();
    let members = |conversation: &str| -> Vec<&'static str> {
        if *conversation == group { USERS.to_vec() } else { USERS[..2].to_vec() }
    };

    for step in 0..STEPS {
        let conversation = if rng.random_bool(0.6) { group.clone() } else { direct.clone() };
        let participants = members(&conversation);
        let online: Vec<usize> =
            (0..devices.len()).filter(|&i| devices[i].online && participants.contains(&devices[i].user)).collect();
        let op = rng.random_range(0..100);
        let context = format!("seed {seed} step {step} op {op}");
        if op < 12 {
            // Disconnect or reconnect a random device (keep at least one online per user).
            let index = rng.random_range(0..devices.len());
            let device = &mut devices[index];
            if device.online {
                device.client.go_offline().await;
            } else {
                device.client.go_online().await;
            }
            device.online = !device.online;
            continue;
        }
        let Some(&actor) = online.get(rng.random_range(0..online.len().max(1))) else { continue };
        let user = devices[actor].user.to_owned();
        let client = devices[actor].client.clone();
        let state = model.get_mut(&conversation).unwrap();
        let own_text: Vec<u64> = state.messages.iter().filter(|(_, m)| m.sender == user).map(|(seq, _)| *seq).collect();
        let any_text: Vec<u64> = state.messages.keys().copied().collect();
        match op {
            12..=44 => {
                let client_msg_id = format!("{user}-{step}");
                let body = format!("message {step} from {user}");
                let ack = client.send_with_id(&conversation, &client_msg_id, &body).await.expect(&context);
                assert_eq!(ack.seq, state.head + 1, "{context}: seq not dense");
                state.head = ack.seq;
                state.messages.insert(
                    ack.seq,
                    Expected { sender: user.clone(), body, edited: false, deleted: false, reactions: BTreeMap::new() },
                );
                state.read.insert(user.clone(), ack.seq);
                state.sent.push((user, client_msg_id, ack.seq));
            }
            45..=54 => {
                // Retry an earlier send of this user, with a different body.
                let earlier: Vec<&(String, String, u64)> = state.sent.iter().filter(|(u, _, _)| *u == user).collect();
                let Some((_, client_msg_id, seq)) = earlier.get(rng.random_range(0..earlier.len().max(1))).copied()
                else {
                    continue;
                };
                let ack = client.send_with_id(&conversation, client_msg_id, "retried body").await.expect(&context);
                assert_eq!(ack.seq, *seq, "{context}: retry got a new seq");
            }
            55..=66 => {
                // Edit: one's own message succeeds unless deleted; someone else's is refused.
                let Some(&seq) = any_text.get(rng.random_range(0..any_text.len().max(1))) else { continue };
                let body = format!("edited at {step}");
                let result = client.edit(&conversation, seq, &body).await;
                let expected = &state.messages[&seq];
                if expected.sender != user {
                    assert_eq!(result.unwrap_err().code(), Code::PermissionDenied, "{context}");
                } else if expected.deleted {
                    assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition, "{context}");
                } else {
                    let entry = result.expect(&context).expect("an edit makes an entry");
                    assert_eq!(entry.seq, state.head + 1, "{context}");
                    state.head = entry.seq;
                    let message = state.messages.get_mut(&seq).unwrap();
                    message.body = body;
                    message.edited = true;
                }
            }
            67..=80 => {
                let Some(&seq) = any_text.get(rng.random_range(0..any_text.len().max(1))) else { continue };
                let emoji = if rng.random_bool(0.25) { "" } else { EMOJI[rng.random_range(0..EMOJI.len())] };
                let result = client.react(&conversation, seq, emoji).await;
                let message = state.messages.get_mut(&seq).unwrap();
                if message.deleted {
                    assert_eq!(result.unwrap_err().code(), Code::FailedPrecondition, "{context}");
                    continue;
                }
                let current = message.reactions.get(&user).cloned().unwrap_or_default();
                let entry = result.expect(&context);
                if current == emoji {
                    assert!(entry.is_none(), "{context}: an unchanged reaction made an entry");
                } else {
                    assert_eq!(entry.expect("a reaction entry").seq, state.head + 1, "{context}");
                    state.head += 1;
                    if emoji.is_empty() {
                        message.reactions.remove(&user);
                    } else {
                        message.reactions.insert(user.clone(), emoji.to_owned());
                    }
                }
            }
            81..=88 => {
                let Some(&seq) = own_text.get(rng.random_range(0..own_text.len().max(1))) else { continue };
                let entry = client.delete(&conversation, seq).await.expect(&context);
                let message = state.messages.get_mut(&seq).unwrap();
                if message.deleted {
                    assert!(entry.is_none(), "{context}: deleting twice made an entry");
                } else {
                    assert_eq!(entry.expect("a delete entry").seq, state.head + 1, "{context}");
                    state.head += 1;
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
    }

    // Quiescence: everyone online, every device caught up with every head.
    for device in devices.iter_mut().filter(|d| !d.online) {
        device.client.go_online().await;
        device.online = true;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let caught_up = devices.iter().all(|device| {
            model.iter().filter(|(id, _)| members(id).contains(&device.user)).all(|(id, expected)| {
                device.client.conversation_state(id).is_some_and(|state| {
                    state.last_seq == expected.head
                        && USERS.iter().all(|u| {
                            state.read_seq.get(*u).copied().unwrap_or(0) >= expected.read.get(*u).copied().unwrap_or(0)
                        })
                })
            })
        });
        if caught_up {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let mut report = Vec::new();
            for device in &devices {
                for (id, expected) in model.iter().filter(|(id, _)| members(id).contains(&device.user)) {
                    let state = device.client.conversation_state(id);
                    report.push(format!(
                        "{} {} in {}: last_seq {:?} of {}, read {:?} want {:?}",
                        device.user,
                        device.name,
                        if *id == group { "group" } else { "direct" },
                        state.as_ref().map(|s| s.last_seq),
                        expected.head,
                        state.as_ref().map(|s| s.read_seq.clone()),
                        expected.read
                    ));
                }
            }
            panic!("seed {seed}: devices did not catch up:\n{}", report.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for device in &devices {
        let label = format!("seed {seed}, {} {}", device.user, device.name);
        let seen = device.seen.lock().unwrap().clone();
        for (id, expected) in &model {
            if !members(id).contains(&device.user) {
                assert!(device.client.conversation_state(id).is_none(), "{label}: sees a conversation it is not in");
                continue;
            }
            // Exactly once, in order: every entry 1..=head (the group's creation included).
            let order: Vec<u64> = seen.iter().filter(|(c, _)| c == id).map(|(_, s)| *s).collect();
            assert!(
                order.iter().copied().eq(1..=expected.head),
                "{label}: entries {order:?}, expected 1..={}",
                expected.head
            );
            let state = device.client.conversation_state(id).unwrap();
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
    // Server-side read cursors equal the model's (and so never moved back).
    for (id, expected) in &model {
        let conversation = devices[0].client.get_conversation(id).await.unwrap();
        for member in &conversation.members {
            let wanted = expected.read.get(&member.user_id).copied().unwrap_or(0);
            assert_eq!(
                member.read_seq,
                wanted.max(if *id == group { 1 } else { 0 }),
                "seed {seed}: {}'s read cursor",
                member.user_id
            );
        }
    }
}
