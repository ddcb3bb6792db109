//! `messenger chat`: an interactive terminal client built on the SDK.
//!
//! Lines starting with `/` are commands (`/help` lists them); any other line
//! is sent to the current conversation. Incoming messages print as they arrive.

use std::{collections::HashMap, io::Write};

use messenger_client::{Client, Event, Message, MessageKind, Options, Role};
use tokio::io::{AsyncBufReadExt, BufReader};

const HELP: &str = "commands:
  /to USER                 chat with USER (creates the conversation, shows recent history)
  /group TITLE USER...     create a group (one-word title) and switch to it
  /open N                  switch to conversation N of /list
  /list                    your conversations, most recent first, with unread counts
  /history [N]             the last N messages of the current conversation (default 20)
  /members                 members and roles of the current conversation
  /add USER... | /remove USER | /leave | /rename TITLE | /admin USER
  /reply SEQ TEXT | /edit SEQ TEXT | /delete SEQ | /react SEQ EMOJI | /unreact SEQ
  /who SEQ                 who has received and read message SEQ
  /file PATH [CAPTION]     send a photo, video or file (its type from its bytes)
  /save SEQ [DIR]          save the attachments of message SEQ (default: this folder)
  /typing                  tell the others you are typing
  /block USER | /unblock USER | /blocked   your block list (blocked users cannot
                           message you nor see when you are online)
  /help                    this text
  /quit                    leave
anything else is sent to the current conversation";

pub struct ChatOptions {
    pub client: Options,
    pub peer: Option<String>,
}

struct State {
    client: Client,
    current: Option<(String, String)>,
    /// conversation id -> label (the peer, or the group title) for printing.
    labels: HashMap<String, String>,
    /// Conversation ids in the order /list printed them, for /open.
    listed: Vec<String>,
}

fn print_message(state: &State, message: &Message) {
    let label = state.labels.get(&message.conversation_id).cloned().unwrap_or_else(|| short(&message.conversation_id));
    let who = if message.sender_id == state.client.user_id() { "me" } else { message.sender_id.as_str() };
    let members = message.member_ids.join(", ");
    let text = match MessageKind::try_from(message.kind).unwrap_or(MessageKind::Text) {
        MessageKind::Text | MessageKind::Unspecified if message.deleted => "(deleted)".to_owned(),
        _ if message.withheld => format!("(withheld) #{}", message.seq),
        MessageKind::Text | MessageKind::Unspecified if message.reply_to_seq > 0 => {
            format!("(re #{}) {}{}", message.reply_to_seq, message.body, edited(message))
        }
        MessageKind::Text | MessageKind::Unspecified => format!("{}{}", message.body, edited(message)),
        MessageKind::Edit => format!("edited #{}: {}", message.target_seq, message.body),
        MessageKind::Delete => format!("deleted #{}", message.target_seq),
        MessageKind::Reaction if message.reaction.is_empty() => {
            format!("removed a reaction to #{}", message.target_seq)
        }
        MessageKind::Reaction => format!("reacted {} to #{}", message.reaction, message.target_seq),
        MessageKind::GroupCreated => format!("created {:?} with {members}", message.title),
        MessageKind::MembersAdded => format!("added {members}"),
        MessageKind::MemberRemoved => format!("removed {members}"),
        MessageKind::MemberLeft => "left".to_owned(),
        MessageKind::Renamed => format!("renamed the group to {:?}", message.title),
        MessageKind::RoleChanged => {
            format!("made {members} {:?}", Role::try_from(message.role).unwrap_or(Role::Member))
        }
    };
    println!("[{label} #{}] {who}: {text}", message.seq);
    for attachment in &message.attachments {
        let size = attachment.size as f64 / 1024.0;
        let dimensions =
            if attachment.width > 0 { format!(", {}x{}", attachment.width, attachment.height) } else { String::new() };
        println!(
            "    [file] {} ({}, {size:.0} KiB{dimensions}): /save {}",
            attachment.file_name, attachment.mime_type, message.seq
        );
    }
}

/// The MIME type of a file to send: from its bytes, else from its extension.
fn mime_of(path: &std::path::Path, bytes: &[u8]) -> String {
    if let Some(kind) = infer::get(bytes) {
        return kind.mime_type().to_owned();
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match extension.as_str() {
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
    .to_owned()
}

/// A one-line progress bar on stderr.
fn progress_bar(progress: messenger_client::Progress) {
    let fraction = progress.sent_bytes as f64 / progress.total_bytes.max(1) as f64;
    let filled = (fraction * 30.0) as usize;
    eprint!(
        "\r[{}{}] {:>3.0}% of {} KiB",
        "#".repeat(filled),
        ".".repeat(30 - filled.min(30)),
        fraction * 100.0,
        progress.total_bytes / 1024
    );
    if progress.sent_bytes >= progress.total_bytes {
        eprintln!();
    }
}

async fn send_file(state: &State, id: &str, path: &str, caption: &str) -> anyhow::Result<()> {
    let path = std::path::Path::new(path);
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file").to_owned();
    let file = messenger_client::File::new(mime_of(path, &bytes), name, bytes);
    let ack = state.client.send_file(id, caption, file, progress_bar).await?;
    println!("(sent #{})", ack.seq);
    Ok(())
}

async fn save(state: &State, id: &str, seq: u64, dir: &str) -> anyhow::Result<()> {
    let page = state.client.history(id, seq + 1, 1).await?;
    let Some(message) = page.messages.into_iter().find(|m| m.seq == seq) else {
        println!("no message #{seq} here");
        return Ok(());
    };
    if message.attachments.is_empty() {
        println!("message #{seq} carries no file");
    }
    for attachment in &message.attachments {
        let bytes = state.client.download(id, seq, &attachment.media_id, false).await?;
        // The name is the sender's: keep only its last component.
        let name = std::path::Path::new(&attachment.file_name).file_name().map_or("file".into(), |n| n.to_owned());
        let target = std::path::Path::new(dir).join(name);
        std::fs::write(&target, &bytes).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", target.display()))?;
        println!("saved {} ({} bytes)", target.display(), bytes.len());
    }
    Ok(())
}

fn edited(message: &Message) -> &'static str {
    if message.edited_at_ms != 0 { " (edited)" } else { "" }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

async fn open(state: &mut State, peer: &str, history: u32) -> anyhow::Result<()> {
    let conversation = state.client.direct(peer).await?;
    let id = conversation.conversation_id.clone();
    state.labels.insert(id.clone(), peer.to_owned());
    state.current = Some((id.clone(), peer.to_owned()));
    println!("-- chatting with {peer} --");
    show_history(state, history).await
}

async fn show_history(state: &State, limit: u32) -> anyhow::Result<()> {
    let Some((id, _)) = &state.current else {
        println!("no conversation selected; use /to USER");
        return Ok(());
    };
    let page = state.client.history(id, 0, limit).await?;
    for message in &page.messages {
        print_message(state, message);
    }
    if let Some(last) = page.messages.last() {
        state.client.mark_read(id, last.seq).await?;
    }
    Ok(())
}

/// Fetches the inbox and remembers a label (the other members) per conversation.
async fn label_conversations(state: &mut State) -> anyhow::Result<Vec<(String, u64)>> {
    let page = state.client.conversations("", 200).await?;
    let me = state.client.user_id().to_owned();
    let mut listed = Vec::with_capacity(page.conversations.len());
    state.listed.clear();
    for conversation in page.conversations {
        let label = if conversation.title.is_empty() {
            let peers: Vec<&str> = conversation.member_ids.iter().filter(|m| **m != me).map(String::as_str).collect();
            peers.join(", ")
        } else {
            conversation.title.clone()
        };
        state.labels.insert(conversation.conversation_id.clone(), label.clone());
        state.listed.push(conversation.conversation_id.clone());
        listed.push((label, conversation.unread_count));
    }
    Ok(listed)
}

async fn list(state: &mut State) -> anyhow::Result<()> {
    let listed = label_conversations(state).await?;
    if listed.is_empty() {
        println!("no conversations yet; use /to USER");
    }
    for (index, (label, unread)) in listed.into_iter().enumerate() {
        println!("{}. {label}{}", index + 1, if unread > 0 { format!(" ({unread} unread)") } else { String::new() });
    }
    Ok(())
}

async fn handle_line(state: &mut State, line: &str) -> anyhow::Result<bool> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(true);
    }
    let mut words = line.split_whitespace();
    match words.next() {
        Some("/quit") | Some("/exit") => return Ok(false),
        Some("/help") => println!("{HELP}"),
        Some("/to") => match words.next() {
            Some(peer) => open(state, peer, 20).await?,
            None => println!("usage: /to USER"),
        },
        Some("/list") => list(state).await?,
        Some(command @ ("/block" | "/unblock")) => match words.next() {
            Some(user) => {
                let changed = match command {
                    "/block" => state.client.block(user).await?,
                    _ => state.client.unblock(user).await?,
                };
                let done = if command == "/block" { "blocked" } else { "unblocked" };
                println!("{user} {}", if changed { done } else { "unchanged" });
            }
            None => println!("usage: {command} USER"),
        },
        Some("/blocked") => {
            let blocked = state.client.blocked_users().await?;
            if blocked.is_empty() {
                println!("you have blocked nobody");
            }
            for entry in blocked {
                println!("  {}", entry.user_id);
            }
        }
        Some("/open") => {
            let index: Option<usize> = words.next().and_then(|n| n.parse().ok());
            match index.and_then(|n| state.listed.get(n.wrapping_sub(1)).cloned()) {
                Some(id) => {
                    let label = state.labels.get(&id).cloned().unwrap_or_default();
                    println!("-- {label} --");
                    state.current = Some((id, label));
                    show_history(state, 20).await?;
                }
                None => println!("usage: /open N (a number from /list)"),
            }
        }
        Some("/group") => {
            let Some(title) = words.next() else {
                println!("usage: /group TITLE USER...");
                return Ok(true);
            };
            let members: Vec<&str> = words.collect();
            let group = state.client.create_group(title, &members).await?;
            state.labels.insert(group.conversation_id.clone(), title.to_owned());
            state.current = Some((group.conversation_id, title.to_owned()));
            println!("-- group {title} --");
        }
        Some(command @ ("/add" | "/remove" | "/leave" | "/rename" | "/admin" | "/members" | "/typing")) => {
            let Some((id, _)) = state.current.clone() else {
                println!("no conversation selected");
                return Ok(true);
            };
            let rest: Vec<&str> = words.collect();
            match command {
                "/add" => drop(state.client.add_members(&id, &rest).await?),
                "/remove" => drop(state.client.remove_member(&id, rest.first().copied().unwrap_or_default()).await?),
                "/leave" => drop(state.client.leave(&id).await?),
                "/rename" => drop(state.client.rename(&id, &rest.join(" ")).await?),
                "/admin" => {
                    let user = rest.first().copied().unwrap_or_default();
                    drop(state.client.set_role(&id, user, Role::Admin).await?)
                }
                "/typing" => state.client.typing(&id, true).await?,
                _ => {
                    let conversation = state.client.get_conversation(&id).await?;
                    for member in conversation.members {
                        let role = Role::try_from(member.role).unwrap_or(Role::Member);
                        println!("  {} ({role:?}, read up to #{})", member.user_id, member.read_seq);
                    }
                }
            }
        }
        Some(command @ ("/reply" | "/edit" | "/delete" | "/react" | "/unreact" | "/who")) => {
            let Some((id, _)) = state.current.clone() else {
                println!("no conversation selected");
                return Ok(true);
            };
            let Some(seq) = words.next().and_then(|n| n.parse::<u64>().ok()) else {
                println!("usage: {command} SEQ ...");
                return Ok(true);
            };
            let rest = words.collect::<Vec<_>>().join(" ");
            match command {
                "/reply" => println!("(sent #{})", state.client.reply(&id, seq, &rest).await?.seq),
                "/edit" => drop(state.client.edit(&id, seq, &rest).await?),
                "/delete" => drop(state.client.delete(&id, seq).await?),
                "/react" => drop(state.client.react(&id, seq, &rest).await?),
                "/unreact" => drop(state.client.react(&id, seq, "").await?),
                _ => {
                    let receipts = state.client.receipts(&id, seq).await?;
                    println!("  received by: {}", receipts.delivered_to.join(", "));
                    println!("  read by: {}", receipts.read_by.join(", "));
                }
            }
        }
        Some(command @ ("/file" | "/save")) => {
            let Some((id, _)) = state.current.clone() else {
                println!("no conversation selected");
                return Ok(true);
            };
            match (command, words.next()) {
                ("/file", Some(path)) => send_file(state, &id, path, &words.collect::<Vec<_>>().join(" ")).await?,
                ("/save", Some(seq)) => match seq.parse() {
                    Ok(seq) => save(state, &id, seq, words.next().unwrap_or(".")).await?,
                    Err(_) => println!("usage: /save SEQ [DIR]"),
                },
                _ => println!("usage: /file PATH [CAPTION] | /save SEQ [DIR]"),
            }
        }
        Some("/history") => {
            let limit = words.next().and_then(|n| n.parse().ok()).unwrap_or(20);
            show_history(state, limit).await?;
        }
        Some(command) if command.starts_with('/') => {
            println!("unknown command {command}; /help lists them")
        }
        _ => match &state.current {
            Some((id, _)) => {
                let ack = state.client.send(id, line).await?;
                println!("(sent #{})", ack.seq);
            }
            None => println!("no conversation selected; use /to USER"),
        },
    }
    Ok(true)
}

/// Runs the chat until `/quit` or end of input.
pub async fn run(options: ChatOptions) -> anyhow::Result<()> {
    let (client, mut events) = Client::connect(options.client).await?;
    println!("connected as {}. /help lists commands.", client.user_id());
    let mut state = State { client, current: None, labels: HashMap::new(), listed: Vec::new() };
    // Name conversations before the backlog prints, so missed messages show who they are from.
    label_conversations(&mut state).await?;
    if let Some(peer) = &options.peer {
        open(&mut state, peer, 20).await?;
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let _ = std::io::stdout().flush();
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => match handle_line(&mut state, &line).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(error) => println!("error: {error}"),
                },
                None => break,
            },
            event = events.next() => match event {
                Some(Event::Message(message)) => {
                    if !state.labels.contains_key(&message.conversation_id) {
                        // A conversation that started after this chat did: learn its name.
                        let _ = label_conversations(&mut state).await;
                    }
                    let kind = MessageKind::try_from(message.kind);
                    if matches!(kind, Ok(MessageKind::GroupCreated | MessageKind::Renamed)) {
                        state.labels.insert(message.conversation_id.clone(), message.title.clone());
                    }
                    // Our own sends come back too (other devices need them); the ack already showed it.
                    let text = kind == Ok(MessageKind::Text);
                    if message.sender_id != state.client.user_id() || !text {
                        print_message(&state, &message);
                    }
                    let current = state.current.as_ref().is_some_and(|(id, _)| *id == message.conversation_id);
                    if current && message.sender_id != state.client.user_id() {
                        state.client.mark_read(&message.conversation_id, message.seq).await?;
                    }
                }
                Some(Event::Receipt(receipt)) => {
                    let current = state.current.as_ref().is_some_and(|(id, _)| *id == receipt.conversation_id);
                    if current && receipt.read_seq > 0 && receipt.user_id != state.client.user_id() {
                        println!("({} read up to #{})", receipt.user_id, receipt.read_seq);
                    }
                }
                Some(Event::Typing(typing)) => {
                    let current = state.current.as_ref().is_some_and(|(id, _)| *id == typing.conversation_id);
                    if current && typing.typing {
                        println!("({} is typing...)", typing.user_id);
                    }
                }
                Some(Event::Disconnected { reason, will_retry }) => {
                    println!("-- disconnected: {reason}{} --", if will_retry { "; reconnecting" } else { "" });
                    if !will_retry {
                        break;
                    }
                }
                Some(Event::Presence(update)) => {
                    let state = if update.online { "online" } else { "offline" };
                    println!("({} is {state})", update.user_id);
                }
                Some(Event::Connected { .. }) => {}
                Some(Event::ServerError { code, message }) => println!("server error {code:?}: {message}"),
                None => break,
            },
        }
    }
    state.client.close().await;
    Ok(())
}
