//! The write operations, each run by the writer thread inside a savepoint.
//! Authorization uses `policy.rs` on state read in the same transaction.

use r2d2_sqlite::rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::rows::{self, MESSAGE_COLUMNS, join_ids, row_to_message, uuid_column};
use crate::{
    error::{Error, Result},
    policy,
    store::{
        Appended, Attachment, Change, ChangeRequest, ConversationKind, Kind, Member, NewGroup, NewMessage, Role,
        SendOutcome, StoredMessage,
    },
    visibility,
};

pub(super) fn storage(error: r2d2_sqlite::rusqlite::Error) -> Error {
    Error::Storage(error.to_string())
}

/// `entries` with their audiences, from the memberships as this
/// transaction leaves them.
fn with_audiences(tx: &Connection, conversation: &str, entries: Vec<StoredMessage>) -> Result<Vec<Appended>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let roster = rows::roster(tx, conversation).map_err(storage)?;
    Ok(entries.into_iter().map(|entry| visibility::appended(entry, &roster)).collect())
}

fn with_audience(tx: &Connection, conversation: &str, entry: StoredMessage) -> Result<Appended> {
    let mut appended = with_audiences(tx, conversation, vec![entry])?;
    appended.pop().ok_or_else(|| Error::Storage("an entry without its audience".into()))
}

/// Appends an entry with the conversation's next seq; returns it with the seq set.
fn append(tx: &Connection, mut entry: StoredMessage) -> Result<StoredMessage> {
    let conversation = entry.conversation_id.to_string();
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE conversations SET last_seq = last_seq + 1, last_activity_ms = ?2 WHERE id = ?1 RETURNING last_seq",
        )
        .and_then(|mut s| s.query_row(params![conversation, entry.sent_at_ms], |r| r.get(0)))
        .map_err(storage)?;
    entry.seq = seq as u64;
    let sql = format!(
        "INSERT INTO messages ({MESSAGE_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    );
    tx.prepare_cached(&sql)
        .and_then(|mut s| {
            s.execute(params![
                conversation,
                seq,
                entry.message_id.to_string(),
                entry.sender,
                entry.client_msg_id,
                entry.body,
                entry.sent_at_ms,
                entry.kind.code(),
                entry.reply_to_seq as i64,
                entry.target_seq as i64,
                entry.reaction,
                join_ids(&entry.member_ids),
                entry.title,
                entry.role.map_or(0, Role::code),
                entry.edited_at_ms,
                entry.deleted as i64,
                Attachment::encode(&entry.attachments),
                entry.last_edit_seq as i64,
            ])
        })
        .map_err(storage)?;
    Ok(entry)
}

/// The actor's membership: active, or the error a former or never-member gets.
fn active_member(tx: &Connection, conversation: &str, user: &str) -> Result<Member> {
    match rows::member(tx, conversation, user).map_err(storage)? {
        Some(member) if member.is_active() => Ok(member),
        Some(_) => Err(Error::NoLongerMember),
        None => Err(Error::ConversationNotFound),
    }
}

fn conversation_kind(tx: &Connection, conversation: &str) -> Result<ConversationKind> {
    let kind: Option<i64> = tx
        .prepare_cached("SELECT kind FROM conversations WHERE id = ?1")
        .and_then(|mut s| s.query_row(params![conversation], |r| r.get(0)).optional())
        .map_err(storage)?;
    match kind {
        Some(2) => Ok(ConversationKind::Group),
        Some(_) => Ok(ConversationKind::Direct),
        None => Err(Error::ConversationNotFound),
    }
}

fn head(tx: &Connection, conversation: &str) -> Result<u64> {
    tx.prepare_cached("SELECT last_seq FROM conversations WHERE id = ?1")
        .and_then(|mut s| s.query_row(params![conversation], |r| r.get::<_, i64>(0)))
        .map(|seq| seq as u64)
        .map_err(storage)
}

fn insert_member(
    tx: &Connection,
    conversation: &str,
    user: &str,
    role: Role,
    joined_seq: u64,
    now_ms: i64,
) -> Result<()> {
    // A membership that ended stays visible to its user: kept as an earlier range.
    tx.prepare_cached(
        "INSERT OR IGNORE INTO earlier_memberships (conversation_id, user_id, joined_seq, removed_seq)
         SELECT conversation_id, user_id, joined_seq, removed_seq FROM members
         WHERE conversation_id = ?1 AND user_id = ?2 AND removed_seq IS NOT NULL",
    )
    .and_then(|mut s| s.execute(params![conversation, user]))
    .map_err(storage)?;
    tx.prepare_cached(
        "INSERT INTO members (conversation_id, user_id, role, joined_seq, read_seq, joined_at_ms, removed_seq)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5, NULL)
         ON CONFLICT (conversation_id, user_id) DO UPDATE SET
           role = excluded.role, joined_seq = excluded.joined_seq, read_seq = excluded.read_seq,
           joined_at_ms = excluded.joined_at_ms, removed_seq = NULL",
    )
    .and_then(|mut s| s.execute(params![conversation, user, role.code(), joined_seq as i64, now_ms]))
    .map_err(storage)?;
    Ok(())
}

fn set_read(tx: &Connection, conversation: &str, user: &str, seq: u64) -> Result<u64> {
    tx.prepare_cached(
        "UPDATE members SET read_seq = max(read_seq, ?3) WHERE conversation_id = ?1 AND user_id = ?2 RETURNING read_seq",
    )
    .and_then(|mut s| s.query_row(params![conversation, user, seq as i64], |r| r.get::<_, i64>(0)))
    .map(|seq| seq as u64)
    .map_err(storage)
}

pub(super) fn send(tx: &Connection, message: &NewMessage) -> Result<SendOutcome> {
    let conversation = message.conversation_id.to_string();
    let sender = active_member(tx, &conversation, &message.sender)?;
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND sender = ?2 AND client_msg_id = ?3"
    );
    let existing = tx
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row(params![conversation, message.sender, message.client_msg_id], row_to_message).optional()
        })
        .map_err(storage)?;
    if let Some(original) = existing {
        return Ok(SendOutcome::Duplicate(with_audience(tx, &conversation, original)?));
    }
    if message.reply_to_seq > 0 {
        let target = rows::message_at(tx, &conversation, message.reply_to_seq).map_err(storage)?;
        policy::target(&sender, target.as_ref(), message.reply_to_seq).map_err(|_| {
            Error::InvalidArgument(format!("reply_to_seq {} is not a message you can see", message.reply_to_seq))
        })?;
    }
    let mut entry = StoredMessage::event(message.conversation_id, &message.sender, Kind::Text, message.sent_at_ms);
    entry.message_id = message.message_id;
    entry.client_msg_id = message.client_msg_id.clone();
    entry.body = message.body.clone();
    entry.reply_to_seq = message.reply_to_seq;
    entry.attachments = message.attachments.clone();
    let entry = append(tx, entry)?;
    // Whoever sends has read up to its own message, and has taken part.
    set_read(tx, &conversation, &message.sender, entry.seq)?;
    if !sender.took_part {
        // Once per member: the flag only ever turns on.
        tx.prepare_cached("UPDATE members SET took_part = 1 WHERE conversation_id = ?1 AND user_id = ?2")
            .and_then(|mut s| s.execute(params![conversation, message.sender]))
            .map_err(storage)?;
    }
    // A new message changes no other entry: it reaches every member active
    // now (one column of the active rows, not every membership's range).
    let active = rows::active_member_ids(tx, &conversation).map_err(storage)?;
    Ok(SendOutcome::Created(visibility::appended_to_active(entry, active)))
}

pub(super) fn direct(tx: &Connection, user: &str, peer: &str, id: Uuid, now_ms: i64) -> Result<Uuid> {
    let (low, high) = if user <= peer { (user, peer) } else { (peer, user) };
    let existing: Option<Uuid> = tx
        .prepare_cached("SELECT conversation_id FROM direct_pairs WHERE user_low = ?1 AND user_high = ?2")
        .and_then(|mut s| s.query_row(params![low, high], |r| uuid_column(r, 0)).optional())
        .map_err(storage)?;
    if let Some(existing) = existing {
        return Ok(existing);
    }
    let text = id.to_string();
    tx.prepare_cached(
        "INSERT INTO conversations (id, kind, title, created_by, created_at_ms, last_activity_ms, last_seq)
         VALUES (?1, 1, '', ?2, ?3, ?3, 0)",
    )
    .and_then(|mut s| s.execute(params![text, user, now_ms]))
    .map_err(storage)?;
    for member in [low, high] {
        insert_member(tx, &text, member, Role::Member, 0, now_ms)?;
    }
    tx.prepare_cached("INSERT INTO direct_pairs (user_low, user_high, conversation_id) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute(params![low, high, text]))
        .map_err(storage)?;
    Ok(id)
}

pub(super) fn create_group(tx: &Connection, group: &NewGroup, max_group_size: usize) -> Result<Appended> {
    policy::group_size(group.members.len() + 1, max_group_size)?;
    let text = group.id.to_string();
    tx.prepare_cached(
        "INSERT INTO conversations (id, kind, title, created_by, created_at_ms, last_activity_ms, last_seq)
         VALUES (?1, 2, ?2, ?3, ?4, ?4, 0)",
    )
    .and_then(|mut s| s.execute(params![text, group.title, group.creator, group.now_ms]))
    .map_err(storage)?;
    let mut entry = StoredMessage::event(group.id, &group.creator, Kind::GroupCreated, group.now_ms);
    entry.title = group.title.clone();
    entry.member_ids = std::iter::once(group.creator.clone()).chain(group.members.iter().cloned()).collect();
    let entry = append(tx, entry)?;
    insert_member(tx, &text, &group.creator, Role::Owner, entry.seq, group.now_ms)?;
    for member in &group.members {
        insert_member(tx, &text, member, Role::Member, entry.seq, group.now_ms)?;
    }
    with_audience(tx, &text, entry)
}

fn end_membership(tx: &Connection, conversation: &str, user: &str, seq: u64) -> Result<()> {
    tx.prepare_cached("UPDATE members SET removed_seq = ?3 WHERE conversation_id = ?1 AND user_id = ?2")
        .and_then(|mut s| s.execute(params![conversation, user, seq as i64]))
        .map_err(storage)?;
    Ok(())
}

fn set_role(tx: &Connection, conversation: &str, user: &str, role: Role) -> Result<()> {
    tx.prepare_cached("UPDATE members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2")
        .and_then(|mut s| s.execute(params![conversation, user, role.code()]))
        .map_err(storage)?;
    Ok(())
}

pub(super) fn apply(tx: &Connection, request: &ChangeRequest) -> Result<Vec<Appended>> {
    let conversation = request.conversation_id.to_string();
    let entries = change(tx, &conversation, request)?;
    with_audiences(tx, &conversation, entries)
}

/// Applies the change; returns the entries it appended.
fn change(tx: &Connection, conversation: &str, request: &ChangeRequest) -> Result<Vec<StoredMessage>> {
    let conversation = conversation.to_owned();
    let kind = conversation_kind(tx, &conversation)?;
    let actor = active_member(tx, &conversation, &request.actor)?;
    let event = |kind: Kind| StoredMessage::event(request.conversation_id, &request.actor, kind, request.now_ms);
    let target_message = |seq: u64| rows::message_at(tx, &conversation, seq).map_err(storage);
    match &request.change {
        Change::AddMembers(users) => {
            let members = rows::members(tx, &conversation).map_err(storage)?;
            let active = members.iter().filter(|m| m.is_active()).count();
            let mut adding: Vec<String> = users
                .iter()
                .filter(|user| !members.iter().any(|m| &m.user_id == *user && m.is_active()))
                .cloned()
                .collect();
            adding.sort();
            adding.dedup();
            if adding.is_empty() {
                return Ok(Vec::new());
            }
            policy::add_members(kind, &actor, active, adding.len(), request.limits.max_group_size)?;
            let mut entry = event(Kind::MembersAdded);
            entry.member_ids = adding.clone();
            let entry = append(tx, entry)?;
            for user in &adding {
                insert_member(tx, &conversation, user, Role::Member, entry.seq, request.now_ms)?;
            }
            Ok(vec![entry])
        }
        Change::RemoveMember(user) => {
            let target = rows::member(tx, &conversation, user).map_err(storage)?;
            policy::remove_member(kind, &actor, target.as_ref())?;
            let mut entry = event(Kind::MemberRemoved);
            entry.member_ids = vec![user.clone()];
            let entry = append(tx, entry)?;
            end_membership(tx, &conversation, user, entry.seq)?;
            Ok(vec![entry])
        }
        Change::Leave => {
            policy::leave(kind)?;
            let entry = append(tx, event(Kind::MemberLeft))?;
            end_membership(tx, &conversation, &actor.user_id, entry.seq)?;
            let mut entries = vec![entry];
            if actor.role == Role::Owner {
                // Ownership passes to the longest-standing admin, else member.
                let successor = rows::members(tx, &conversation)
                    .map_err(storage)?
                    .into_iter()
                    .filter(Member::is_active)
                    .min_by_key(|m| (std::cmp::Reverse(m.role), m.joined_seq, m.user_id.clone()));
                if let Some(successor) = successor {
                    set_role(tx, &conversation, &successor.user_id, Role::Owner)?;
                    let mut handover = event(Kind::RoleChanged);
                    handover.member_ids = vec![successor.user_id];
                    handover.role = Some(Role::Owner);
                    entries.push(append(tx, handover)?);
                }
            }
            Ok(entries)
        }
        Change::Rename(title) => {
            policy::rename(kind, &actor)?;
            tx.prepare_cached("UPDATE conversations SET title = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![conversation, title]))
                .map_err(storage)?;
            let mut entry = event(Kind::Renamed);
            entry.title = title.clone();
            Ok(vec![append(tx, entry)?])
        }
        Change::SetRole(user, role) => {
            let target = rows::member(tx, &conversation, user).map_err(storage)?;
            policy::set_role(kind, &actor, target.as_ref(), *role)?;
            if target.is_some_and(|t| t.role == *role) {
                return Ok(Vec::new());
            }
            set_role(tx, &conversation, user, *role)?;
            let mut entry = event(Kind::RoleChanged);
            entry.member_ids = vec![user.clone()];
            entry.role = Some(*role);
            Ok(vec![append(tx, entry)?])
        }
        Change::Edit { target_seq, body } => {
            let found = target_message(*target_seq)?;
            let target = policy::target(&actor, found.as_ref(), *target_seq)?;
            policy::edit(&actor, target, request.now_ms, request.limits.edit_window_ms)?;
            let mut entry = event(Kind::Edit);
            entry.target_seq = *target_seq;
            entry.body = body.clone();
            let appended = append(tx, entry)?;
            tx.prepare_cached(
                "UPDATE messages SET body = ?3, edited_at_ms = ?4, last_edit_seq = ?5
                 WHERE conversation_id = ?1 AND seq = ?2",
            )
            .and_then(|mut s| {
                let edit_seq = appended.seq as i64;
                s.execute(params![conversation, *target_seq as i64, body, request.now_ms, edit_seq])
            })
            .map_err(storage)?;
            Ok(vec![appended])
        }
        Change::Delete { target_seq } => {
            let found = target_message(*target_seq)?;
            let target = policy::target(&actor, found.as_ref(), *target_seq)?;
            policy::delete(kind, &actor, target)?;
            if target.deleted {
                return Ok(Vec::new());
            }
            // The body leaves storage: the message itself and every edit of it.
            tx.prepare_cached(
                "UPDATE messages SET body = '', attachments = '', deleted = CASE WHEN seq = ?2 THEN 1 ELSE deleted END
                 WHERE conversation_id = ?1 AND (seq = ?2 OR (kind = 2 AND target_seq = ?2))",
            )
            .and_then(|mut s| s.execute(params![conversation, *target_seq as i64]))
            .map_err(storage)?;
            tx.prepare_cached("DELETE FROM reactions WHERE conversation_id = ?1 AND seq = ?2")
                .and_then(|mut s| s.execute(params![conversation, *target_seq as i64]))
                .map_err(storage)?;
            let mut entry = event(Kind::Delete);
            entry.target_seq = *target_seq;
            Ok(vec![append(tx, entry)?])
        }
        Change::React { target_seq, emoji } => {
            let found = target_message(*target_seq)?;
            let target = policy::target(&actor, found.as_ref(), *target_seq)?;
            policy::react(target)?;
            let current: Option<String> = tx
                .prepare_cached("SELECT emoji FROM reactions WHERE conversation_id = ?1 AND seq = ?2 AND user_id = ?3")
                .and_then(|mut s| {
                    s.query_row(params![conversation, *target_seq as i64, actor.user_id], |r| r.get(0)).optional()
                })
                .map_err(storage)?;
            if current.as_deref().unwrap_or("") == emoji.as_str() {
                return Ok(Vec::new());
            }
            if emoji.is_empty() {
                tx.prepare_cached("DELETE FROM reactions WHERE conversation_id = ?1 AND seq = ?2 AND user_id = ?3")
                    .and_then(|mut s| s.execute(params![conversation, *target_seq as i64, actor.user_id]))
                    .map_err(storage)?;
            } else {
                tx.prepare_cached(
                    "INSERT INTO reactions (conversation_id, seq, user_id, emoji) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (conversation_id, seq, user_id) DO UPDATE SET emoji = excluded.emoji",
                )
                .and_then(|mut s| s.execute(params![conversation, *target_seq as i64, actor.user_id, emoji]))
                .map_err(storage)?;
            }
            let mut entry = event(Kind::Reaction);
            entry.target_seq = *target_seq;
            entry.reaction = emoji.clone();
            Ok(vec![append(tx, entry)?])
        }
    }
}

pub(super) fn ack(tx: &Connection, user: &str, device: &str, cursors: &[(Uuid, u64)]) -> Result<Vec<(Uuid, u64)>> {
    // One statement per cursor (a group's acks are one per member and
    // message): the member row and the head clamp the cursor to what the user
    // may see, and a user who never was a member stores nothing.
    let mut statement = tx
        .prepare_cached(
            "INSERT INTO device_cursors (user_id, device_id, conversation_id, delivered_seq)
             SELECT ?1, ?2, ?3, min(?4, coalesce(m.removed_seq, c.last_seq))
             FROM members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = ?3 AND m.user_id = ?1
             ON CONFLICT (user_id, device_id, conversation_id)
             DO UPDATE SET delivered_seq = max(delivered_seq, excluded.delivered_seq)
             RETURNING delivered_seq",
        )
        .map_err(storage)?;
    let mut stored = Vec::with_capacity(cursors.len());
    for (conversation, seq) in cursors {
        let value: Option<i64> = statement
            .query_row(params![user, device, conversation.to_string(), (*seq).min(i64::MAX as u64) as i64], |r| {
                r.get(0)
            })
            .optional()
            .map_err(storage)?;
        if let Some(value) = value {
            stored.push((*conversation, value as u64));
        }
    }
    Ok(stored)
}

pub(super) fn mark_read(tx: &Connection, conversation: Uuid, user: &str, seq: u64) -> Result<crate::store::ReadMark> {
    let text = conversation.to_string();
    let member = active_member(tx, &text, user)?;
    let wanted = seq.min(head(tx, &text)?);
    if wanted <= member.read_seq {
        return Ok(crate::store::ReadMark { read_seq: member.read_seq, moved: false });
    }
    Ok(crate::store::ReadMark { read_seq: set_read(tx, &text, user, wanted)?, moved: true })
}

pub(super) fn block(tx: &Connection, user: &str, target: &str, now_ms: i64) -> Result<bool> {
    tx.prepare_cached(
        "INSERT INTO blocks (user_id, blocked_id, blocked_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, blocked_id) DO NOTHING",
    )
    .and_then(|mut s| s.execute(params![user, target, now_ms]))
    .map(|changed| changed > 0)
    .map_err(storage)
}

pub(super) fn unblock(tx: &Connection, user: &str, target: &str) -> Result<bool> {
    tx.prepare_cached("DELETE FROM blocks WHERE user_id = ?1 AND blocked_id = ?2")
        .and_then(|mut s| s.execute(params![user, target]))
        .map(|changed| changed > 0)
        .map_err(storage)
}
