//! Row mapping and the queries both the readers and the writer use.

use r2d2_sqlite::rusqlite::{Connection, OptionalExtension, Result, Row, params, types::Type};
use uuid::Uuid;

use crate::store::{Attachment, Conversation, ConversationKind, Kind, Member, Role, SeqBounds, StoredMessage};

/// Columns `row_to_message` reads, in order.
pub(super) const MESSAGE_COLUMNS: &str = "conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms, \
     kind, reply_to_seq, target_seq, reaction, member_ids, title, role, edited_at_ms, deleted, attachments, \
     last_edit_seq";

/// Member ids are stored newline-separated: ids never contain control characters.
pub(super) fn join_ids(ids: &[String]) -> String {
    ids.join("\n")
}

fn split_ids(text: String) -> Vec<String> {
    if text.is_empty() { Vec::new() } else { text.split('\n').map(str::to_owned).collect() }
}

pub(super) fn uuid_column(row: &Row<'_>, index: usize) -> Result<Uuid> {
    let text: String = row.get(index)?;
    Uuid::try_parse(&text)
        .map_err(|e| r2d2_sqlite::rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(e)))
}

pub(super) fn row_to_message(row: &Row<'_>) -> Result<StoredMessage> {
    let kind_code: i64 = row.get(7)?;
    let kind = Kind::from_code(kind_code).ok_or_else(|| {
        r2d2_sqlite::rusqlite::Error::FromSqlConversionFailure(
            7,
            Type::Integer,
            format!("unknown kind {kind_code}").into(),
        )
    })?;
    let role: i64 = row.get(13)?;
    Ok(StoredMessage {
        conversation_id: uuid_column(row, 0)?,
        seq: row.get::<_, i64>(1)? as u64,
        message_id: uuid_column(row, 2)?,
        sender: row.get(3)?,
        client_msg_id: row.get(4)?,
        body: row.get(5)?,
        sent_at_ms: row.get(6)?,
        kind,
        reply_to_seq: row.get::<_, i64>(8)? as u64,
        target_seq: row.get::<_, i64>(9)? as u64,
        reaction: row.get(10)?,
        member_ids: split_ids(row.get(11)?),
        title: row.get(12)?,
        role: (role != 0).then(|| Role::from_code(role)),
        edited_at_ms: row.get(14)?,
        deleted: row.get::<_, i64>(15)? != 0,
        attachments: Attachment::decode(&row.get::<_, String>(16)?)
            .map_err(|e| r2d2_sqlite::rusqlite::Error::FromSqlConversionFailure(16, Type::Text, Box::new(e)))?,
        withheld: false,
        last_edit_seq: row.get::<_, i64>(17)? as u64,
    })
}

pub(super) fn message_at(connection: &Connection, conversation: &str, seq: u64) -> Result<Option<StoredMessage>> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND seq = ?2");
    connection.prepare_cached(&sql)?.query_row(params![conversation, seq as i64], row_to_message).optional()
}

const MEMBER_COLUMNS: &str = "m.user_id, m.role, m.joined_seq, m.removed_seq, m.read_seq, \
     coalesce((SELECT max(d.delivered_seq) FROM device_cursors d
               WHERE d.conversation_id = m.conversation_id AND d.user_id = m.user_id), 0), m.took_part, \
     (SELECT group_concat(e.joined_seq || '-' || e.removed_seq) FROM earlier_memberships e
      WHERE e.conversation_id = m.conversation_id AND e.user_id = m.user_id)";

/// `MEMBER_COLUMNS` without the delivered cursor (it reads 0).
const MEMBERSHIP_COLUMNS: &str = "m.user_id, m.role, m.joined_seq, m.removed_seq, m.read_seq, 0, m.took_part, \
     (SELECT group_concat(e.joined_seq || '-' || e.removed_seq) FROM earlier_memberships e
      WHERE e.conversation_id = m.conversation_id AND e.user_id = m.user_id)";

/// Earlier memberships as `MEMBER_COLUMNS` lists them: `from-to,from-to`.
fn earlier(text: Option<String>) -> Result<Vec<SeqBounds>> {
    let invalid = |text: &str| {
        r2d2_sqlite::rusqlite::Error::FromSqlConversionFailure(7, Type::Text, format!("earlier range {text:?}").into())
    };
    let mut ranges = Vec::new();
    for range in text.as_deref().unwrap_or_default().split(',').filter(|range| !range.is_empty()) {
        let (from, to) = range.split_once('-').ok_or_else(|| invalid(range))?;
        let (from, to) = (from.parse().map_err(|_| invalid(range))?, to.parse().map_err(|_| invalid(range))?);
        ranges.push(SeqBounds { from, to: Some(to) });
    }
    ranges.sort_by_key(|range| range.from);
    Ok(ranges)
}

fn row_to_member(row: &Row<'_>) -> Result<Member> {
    Ok(Member {
        user_id: row.get(0)?,
        role: Role::from_code(row.get(1)?),
        joined_seq: row.get::<_, i64>(2)? as u64,
        removed_seq: row.get::<_, Option<i64>>(3)?.map(|s| s as u64),
        read_seq: row.get::<_, i64>(4)? as u64,
        delivered_seq: row.get::<_, i64>(5)? as u64,
        took_part: row.get(6)?,
        earlier: earlier(row.get(7)?)?,
    })
}

/// One membership without its delivered cursor (`delivered_seq` reads 0):
/// the hot paths (every send and ack) need only role and visibility, and the
/// delivered cursor costs a scan of the member's devices.
pub(super) fn member(connection: &Connection, conversation: &str, user: &str) -> Result<Option<Member>> {
    let sql = format!("SELECT {MEMBERSHIP_COLUMNS} FROM members m WHERE m.conversation_id = ?1 AND m.user_id = ?2");
    connection.prepare_cached(&sql)?.query_row(params![conversation, user], row_to_member).optional()
}

/// Every membership of the conversation, current and ended, without
/// delivered cursors: what an entry's audience is decided from.
pub(super) fn roster(connection: &Connection, conversation: &str) -> Result<Vec<Member>> {
    let sql = format!("SELECT {MEMBERSHIP_COLUMNS} FROM members m WHERE m.conversation_id = ?1 ORDER BY m.user_id");
    connection.prepare_cached(&sql)?.query_map(params![conversation], row_to_member)?.collect()
}

pub(super) fn members(connection: &Connection, conversation: &str) -> Result<Vec<Member>> {
    let sql = format!("SELECT {MEMBER_COLUMNS} FROM members m WHERE m.conversation_id = ?1 ORDER BY m.user_id");
    connection.prepare_cached(&sql)?.query_map(params![conversation], row_to_member)?.collect()
}

pub(super) fn active_member_ids(connection: &Connection, conversation: &str) -> Result<Vec<String>> {
    connection
        .prepare_cached(
            "SELECT user_id FROM members WHERE conversation_id = ?1 AND removed_seq IS NULL ORDER BY user_id",
        )?
        .query_map(params![conversation], |r| r.get(0))?
        .collect()
}

pub(super) const CONVERSATION_COLUMNS: &str = "c.id, c.kind, c.title, c.created_by, c.last_seq, c.created_at_ms, c.last_activity_ms, m.read_seq, \
     m.took_part OR m.user_id = c.created_by";

/// Reads `CONVERSATION_COLUMNS` (joined with the caller's `members` row as `m`).
pub(super) fn row_to_conversation(row: &Row<'_>) -> Result<Conversation> {
    Ok(Conversation {
        id: uuid_column(row, 0)?,
        kind: if row.get::<_, i64>(1)? == 2 { ConversationKind::Group } else { ConversationKind::Direct },
        title: row.get(2)?,
        created_by: row.get(3)?,
        members: Vec::new(),
        last_seq: row.get::<_, i64>(4)? as u64,
        created_at_ms: row.get(5)?,
        last_activity_ms: row.get(6)?,
        read_seq: row.get::<_, i64>(7)? as u64,
        unread_count: 0,
        last_message: None,
        took_part: row.get(8)?,
    })
}

/// Fills members, unread count and the newest message `user` may see.
pub(super) fn complete(connection: &Connection, conversation: &mut Conversation, user: &str) -> Result<()> {
    let id = conversation.id.to_string();
    conversation.members = active_member_ids(connection, &id)?;
    // In a group, messages of users the member blocked count as nothing
    // unread (`visibility::from_blocked`).
    let group = conversation.kind == ConversationKind::Group;
    conversation.unread_count = connection
        .prepare_cached(
            "SELECT count(*) FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 AND kind = 1 AND deleted = 0 AND sender != ?3
               AND NOT (?4 AND sender IN (SELECT blocked_id FROM blocks WHERE user_id = ?3))",
        )?
        .query_row(params![id, conversation.read_seq as i64, user, group], |r| r.get::<_, i64>(0))?
        as u64;
    // The newest one the member may see: none from before it joined.
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1 AND kind = 1
           AND seq >= (SELECT joined_seq FROM members WHERE conversation_id = ?1 AND user_id = ?2)
         ORDER BY seq DESC LIMIT 1"
    );
    conversation.last_message =
        connection.prepare_cached(&sql)?.query_row(params![id, user], row_to_message).optional()?;
    Ok(())
}

/// The conversation as an active member sees it.
pub(super) fn conversation_for_member(connection: &Connection, id: &str, user: &str) -> Result<Option<Conversation>> {
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations c
         JOIN members m ON m.conversation_id = c.id AND m.user_id = ?2 AND m.removed_seq IS NULL
         WHERE c.id = ?1"
    );
    let conversation = connection.prepare_cached(&sql)?.query_row(params![id, user], row_to_conversation).optional()?;
    match conversation {
        Some(mut conversation) => {
            complete(connection, &mut conversation, user)?;
            Ok(Some(conversation))
        }
        None => Ok(None),
    }
}
