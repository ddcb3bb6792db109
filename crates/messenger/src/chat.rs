//! `messenger chat`: an interactive terminal client built on the SDK.
//!
//! Lines starting with `/` are commands (`/help` lists them); any other line
//! is sent to the current conversation. Incoming messages print as they arrive.

use std::{collections::HashMap, io::Write};

use messenger_client::{Client, Event, Message, Options};
use tokio::io::{AsyncBufReadExt, BufReader};

const HELP: &str = "commands:
  /to USER        chat with USER (creates the conversation, shows recent history)
  /list           your conversations, most recent first
  /history [N]    the last N messages of the current conversation (default 20)
  /help           this text
  /quit           leave
anything else is sent to the current conversation";

pub struct ChatOptions {
    pub client: Options,
    pub peer: Option<String>,
}

struct State {
    client: Client,
    current: Option<(String, String)>,
    /// conversation id -> label (the peer) for printing.
    labels: HashMap<String, String>,
}

fn print_message(state: &State, message: &Message) {
    let label = state.labels.get(&message.conversation_id).cloned().unwrap_or_else(|| short(&message.conversation_id));
    let who = if message.sender_id == state.client.user_id() { "me" } else { message.sender_id.as_str() };
    println!("[{label} #{}] {who}: {}", message.seq, message.body);
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
    Ok(())
}

/// Fetches the inbox and remembers a label (the other members) per conversation.
async fn label_conversations(state: &mut State) -> anyhow::Result<Vec<(String, u64)>> {
    let page = state.client.conversations("", 200).await?;
    let me = state.client.user_id().to_owned();
    let mut listed = Vec::with_capacity(page.conversations.len());
    for conversation in page.conversations {
        let peers: Vec<&str> = conversation.member_ids.iter().filter(|m| **m != me).map(String::as_str).collect();
        let label = peers.join(", ");
        state.labels.insert(conversation.conversation_id.clone(), label.clone());
        listed.push((label, conversation.last_seq));
    }
    Ok(listed)
}

async fn list(state: &mut State) -> anyhow::Result<()> {
    let listed = label_conversations(state).await?;
    if listed.is_empty() {
        println!("no conversations yet; use /to USER");
    }
    for (label, messages) in listed {
        println!("{label}: {messages} messages");
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
    let mut state = State { client, current: None, labels: HashMap::new() };
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
                    // Our own sends come back too (other devices need them); the ack already showed it.
                    if message.sender_id != state.client.user_id() {
                        print_message(&state, &message);
                    }
                }
                Some(Event::Disconnected { reason, will_retry }) => {
                    println!("-- disconnected: {reason}{} --", if will_retry { "; reconnecting" } else { "" });
                    if !will_retry {
                        break;
                    }
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
