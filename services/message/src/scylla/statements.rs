//! Every CQL statement the store runs, declared once in [`STATEMENTS`] (what
//! the schema test checks) and prepared once at connect into [`Statements`].
//!
//! Each statement carries its number of bind markers as a const parameter
//! (`Prepared<N>`), and values can only be bound as a tuple (or row struct)
//! implementing `Arity<N>`: the compiler checks that the code binds as many
//! values as the declaration says, and the test checks that the text has that
//! many `?`. Statement texts hold no values, only markers; `{keyspace}` is
//! replaced by the validated keyspace name.

use ::scylla::{client::session::Session, statement::Consistency, statement::prepared::PreparedStatement};

use messenger_platform::cql;

use crate::error::{Error, Result};

/// Implemented by bound values with `N` members.
pub(crate) trait Arity<const N: usize> {}

macro_rules! arity {
    ($($n:literal: ($($t:ident),*);)*) => {
        $(impl<$($t),*> Arity<$n> for ($($t,)*) {})*
    };
}

arity! {
    1: (A);
    2: (A, B);
    3: (A, B, C);
    4: (A, B, C, D);
    5: (A, B, C, D, E);
    6: (A, B, C, D, E, F);
    7: (A, B, C, D, E, F, G);
    8: (A, B, C, D, E, F, G, H);
    9: (A, B, C, D, E, F, G, H, I);
    10: (A, B, C, D, E, F, G, H, I, J);
}

/// How a statement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A read at the profile's consistency (LOCAL_QUORUM by default).
    Read,
    /// A read at the serial consistency: sees every committed LWT and
    /// completes one in progress. Used before policy decisions.
    SerialRead,
    /// An idempotent write (upsert, cursor write with its value as timestamp):
    /// the driver may retry it on timeouts.
    Write,
    /// A lightweight transaction (`IF ...`): never retried blindly.
    Lwt,
}

impl Mode {
    /// The `mode` label of the statement counter.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Read => "read",
            Mode::SerialRead => "serial_read",
            Mode::Write => "write",
            Mode::Lwt => "lwt",
        }
    }
}

/// One statement as declared.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Cql {
    pub name: &'static str,
    pub mode: Mode,
    pub text: &'static str,
    /// Values the code binds (the `N` of its `Prepared<N>`).
    pub binds: usize,
}

/// A prepared statement taking `N` bound values, with its declared name and
/// mode (the labels of the statement counter).
pub(crate) struct Prepared<const N: usize> {
    pub(crate) statement: PreparedStatement,
    pub(crate) name: &'static str,
    pub(crate) mode: Mode,
}

/// The message columns `rows::MessageRow` reads.
macro_rules! message_columns {
    () => {
        "conversation_id, seq, message_id, sender, client_msg_id, body, sent_at_ms, kind, reply_to_seq, \
         target_seq, reaction, member_ids, title, role, edited_at_ms, deleted, edit_seqs, attachments"
    };
}

macro_rules! head_columns {
    () => {
        "conversation_id, kind, title, created_by, created_at_ms, last_activity_ms, last_seq, last_reservation, \
         roster, applying, applying_since_ms, pending"
    };
}

macro_rules! member_columns {
    () => {
        "user_id, role, joined_seq, removed_seq, read_seq, delivered_seq, took_part, earlier"
    };
}

macro_rules! statements {
    ($($(#[doc = $doc:literal])* $name:ident: $mode:ident, $n:literal = $text:expr;)*) => {
        /// Every statement, for the schema test.
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) const STATEMENTS: &[Cql] =
            &[$(Cql { name: stringify!($name), mode: Mode::$mode, text: $text, binds: $n }),*];

        pub(crate) struct Statements {
            $($(#[doc = $doc])* pub(crate) $name: Prepared<$n>,)*
        }

        impl Statements {
            pub(crate) async fn prepare(session: &Session, keyspace: &str, serial: Consistency) -> Result<Self> {
                Ok(Self {
                    $($name: Prepared {
                        statement: prepare(session, keyspace, Mode::$mode, $text, serial).await?,
                        name: stringify!($name),
                        mode: Mode::$mode,
                    },)*
                })
            }
        }
    };
}

async fn prepare(
    session: &Session,
    keyspace: &str,
    mode: Mode,
    text: &str,
    serial: Consistency,
) -> Result<PreparedStatement> {
    let mut prepared = session
        .prepare(text.replace("{keyspace}", keyspace))
        .await
        .map_err(|error| Error::from(cql::prepare_error(error)))?;
    match mode {
        Mode::Read | Mode::Write => prepared.set_is_idempotent(true),
        Mode::SerialRead => {
            prepared.set_is_idempotent(true);
            prepared.set_consistency(serial);
        }
        Mode::Lwt => prepared.set_is_idempotent(false),
    }
    Ok(prepared)
}

statements! {
    // conversations: the head.
    /// The head, at the profile's consistency (reads that decide nothing).
    head_read: Read, 1 = concat!("SELECT ", head_columns!(), " FROM {keyspace}.conversations WHERE conversation_id = ?");
    /// The head at serial consistency, before a policy decision or a reservation.
    head_read_serial: SerialRead, 1 =
        concat!("SELECT ", head_columns!(), " FROM {keyspace}.conversations WHERE conversation_id = ?");
    /// Creates a conversation's head (groups: with their first entry reserved).
    head_create: Lwt, 9 = "INSERT INTO {keyspace}.conversations (conversation_id, kind, title, created_by, \
        created_at_ms, last_activity_ms, last_seq, last_reservation, roster) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
        IF NOT EXISTS";
    /// Reserves seqs for sends: (new last_seq, activity, reservation, id, expected last_seq).
    head_reserve: Lwt, 5 = "UPDATE {keyspace}.conversations SET last_seq = ?, last_activity_ms = ?, \
        last_reservation = ? WHERE conversation_id = ? IF last_seq = ?";
    /// Reserves seqs for a message modification, takes the apply lock and
    /// records the rows the change will write.
    head_reserve_locked: Lwt, 8 = "UPDATE {keyspace}.conversations SET last_seq = ?, last_activity_ms = ?, \
        last_reservation = ?, applying = ?, applying_since_ms = ?, pending = ? \
        WHERE conversation_id = ? IF last_seq = ?";
    /// Like `head_reserve_locked`, also replacing the roster and the title.
    head_reserve_state: Lwt, 10 = "UPDATE {keyspace}.conversations SET last_seq = ?, last_activity_ms = ?, \
        last_reservation = ?, applying = ?, applying_since_ms = ?, pending = ?, roster = ?, title = ? \
        WHERE conversation_id = ? IF last_seq = ?";
    /// Releases the apply lock (and its pending rows, written) if still held by the given token.
    head_release: Lwt, 2 = "DELETE applying, applying_since_ms, pending FROM {keyspace}.conversations \
        WHERE conversation_id = ? IF applying = ?";

    // members
    member_read: Read, 2 =
        concat!("SELECT ", member_columns!(), " FROM {keyspace}.members WHERE conversation_id = ? AND user_id = ?");
    members_read: Read, 1 = concat!("SELECT ", member_columns!(), " FROM {keyspace}.members WHERE conversation_id = ?");
    /// (role, joined_seq, removed_seq, joined_at_ms, conversation, user): a membership starts.
    member_upsert: Write, 6 = "UPDATE {keyspace}.members SET role = ?, joined_seq = ?, removed_seq = ?, \
        joined_at_ms = ? WHERE conversation_id = ? AND user_id = ?";
    member_role: Write, 3 = "UPDATE {keyspace}.members SET role = ? WHERE conversation_id = ? AND user_id = ?";
    /// ({joined_seq: removed_seq}, conversation, user): a re-add keeps the membership it follows.
    member_earlier: Write, 3 =
        "UPDATE {keyspace}.members SET earlier = earlier + ? WHERE conversation_id = ? AND user_id = ?";
    member_removed: Write, 3 =
        "UPDATE {keyspace}.members SET removed_seq = ? WHERE conversation_id = ? AND user_id = ?";
    /// (timestamp = value, value, conversation, user): the largest read cursor wins.
    member_read_seq: Write, 4 =
        "UPDATE {keyspace}.members USING TIMESTAMP ? SET read_seq = ? WHERE conversation_id = ? AND user_id = ?";
    /// (timestamp = value, value, true, conversation, user): a sender's read cursor, and it took part.
    member_sent: Write, 5 = "UPDATE {keyspace}.members USING TIMESTAMP ? SET read_seq = ?, took_part = ? \
        WHERE conversation_id = ? AND user_id = ?";
    /// (timestamp = value, value, conversation, user): the largest delivered cursor of any device wins.
    member_delivered: Write, 4 = "UPDATE {keyspace}.members USING TIMESTAMP ? SET delivered_seq = ? \
        WHERE conversation_id = ? AND user_id = ?";

    // user_conversations
    inbox_read: Read, 1 = "SELECT conversation_id, joined_seq, removed_seq, earlier \
        FROM {keyspace}.user_conversations WHERE user_id = ?";
    /// (joined_seq, removed_seq, joined_at_ms, user, conversation).
    inbox_upsert: Write, 5 = "UPDATE {keyspace}.user_conversations SET joined_seq = ?, removed_seq = ?, \
        joined_at_ms = ? WHERE user_id = ? AND conversation_id = ?";
    inbox_removed: Write, 3 =
        "UPDATE {keyspace}.user_conversations SET removed_seq = ? WHERE user_id = ? AND conversation_id = ?";
    /// ({joined_seq: removed_seq}, user, conversation).
    inbox_earlier: Write, 3 =
        "UPDATE {keyspace}.user_conversations SET earlier = earlier + ? WHERE user_id = ? AND conversation_id = ?";

    // direct_pairs
    direct_read: Read, 2 =
        "SELECT conversation_id FROM {keyspace}.direct_pairs WHERE user_low = ? AND user_high = ?";
    direct_claim: Lwt, 3 = "INSERT INTO {keyspace}.direct_pairs (user_low, user_high, conversation_id) \
        VALUES (?, ?, ?) IF NOT EXISTS";

    // messages
    /// Binds `rows::NewRow` (18 columns).
    message_insert: Write, 18 = "INSERT INTO {keyspace}.messages (conversation_id, bucket, seq, message_id, sender, \
        client_msg_id, body, sent_at_ms, kind, reply_to_seq, target_seq, reaction, member_ids, title, role, \
        edited_at_ms, deleted, attachments) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    message_read: Read, 3 = concat!(
        "SELECT ", message_columns!(), " FROM {keyspace}.messages WHERE conversation_id = ? AND bucket = ? AND seq = ?"
    );
    /// (conversation, bucket, from, to, limit), ascending.
    messages_ascending: Read, 5 = concat!(
        "SELECT ", message_columns!(), " FROM {keyspace}.messages \
         WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ? ORDER BY seq ASC LIMIT ?"
    );
    /// (conversation, bucket, from, to, limit), descending.
    messages_descending: Read, 5 = concat!(
        "SELECT ", message_columns!(), " FROM {keyspace}.messages \
         WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ? ORDER BY seq DESC LIMIT ?"
    );
    /// (conversation, bucket, from, to): what an unread count needs.
    message_flags: Read, 4 = "SELECT kind, sender, deleted FROM {keyspace}.messages \
        WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ?";
    /// (body, edited_at_ms, {edit seq}, conversation, bucket, seq).
    message_edit: Write, 6 = "UPDATE {keyspace}.messages SET body = ?, edited_at_ms = ?, edit_seqs = edit_seqs + ? \
        WHERE conversation_id = ? AND bucket = ? AND seq = ?";
    /// (empty body, empty attachments, true, conversation, bucket, seq).
    message_delete: Write, 6 = "UPDATE {keyspace}.messages SET body = ?, attachments = ?, deleted = ? \
        WHERE conversation_id = ? AND bucket = ? AND seq = ?";
    /// (now in microseconds, conversation, bucket, from, to): declares a gap of seqs lost. The
    /// range tombstone shadows rows their writers stamped earlier, should they still land.
    messages_lost: Write, 5 = "DELETE FROM {keyspace}.messages USING TIMESTAMP ? \
        WHERE conversation_id = ? AND bucket = ? AND seq >= ? AND seq <= ?";
    /// (empty body, conversation, bucket, seq): an edit entry of a deleted message.
    message_blank: Write, 4 =
        "UPDATE {keyspace}.messages SET body = ? WHERE conversation_id = ? AND bucket = ? AND seq = ?";

    // send_dedupe
    /// (conversation, sender, client_msg_id, message_id, claimed_at_ms, ttl).
    dedupe_claim: Lwt, 6 = "INSERT INTO {keyspace}.send_dedupe (conversation_id, sender, client_msg_id, message_id, \
        claimed_at_ms) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?";
    /// (ttl, message_id, claimed_at_ms, conversation, sender, client_msg_id, previous message_id):
    /// takes over a claim whose sender stopped before recording a seq. `seq = null` is written
    /// too: at the LWT's (later) timestamp it shadows a late record of the first holder's.
    dedupe_takeover: Lwt, 7 = "UPDATE {keyspace}.send_dedupe USING TTL ? \
        SET message_id = ?, claimed_at_ms = ?, seq = null \
        WHERE conversation_id = ? AND sender = ? AND client_msg_id = ? IF message_id = ? AND seq = null";
    /// (ttl, message_id, claimed_at_ms, conversation, sender, client_msg_id, previous message_id,
    /// recorded seq): takes over a claim whose recorded seq was declared lost.
    dedupe_takeover_lost: Lwt, 8 = "UPDATE {keyspace}.send_dedupe USING TTL ? \
        SET message_id = ?, claimed_at_ms = ?, seq = null \
        WHERE conversation_id = ? AND sender = ? AND client_msg_id = ? IF message_id = ? AND seq = ?";
    /// (conversation, sender, client_msg_id, message_id): gives a claim up.
    dedupe_release: Lwt, 4 = "DELETE FROM {keyspace}.send_dedupe \
        WHERE conversation_id = ? AND sender = ? AND client_msg_id = ? IF message_id = ?";
    /// (ttl, reservation timestamp, seq, conversation, sender, client_msg_id): the reserved
    /// seq, recorded before the message row is written.
    dedupe_commit: Write, 6 = "UPDATE {keyspace}.send_dedupe USING TTL ? AND TIMESTAMP ? SET seq = ? \
        WHERE conversation_id = ? AND sender = ? AND client_msg_id = ?";

    // reactions
    reaction_read: Read, 3 =
        "SELECT emoji FROM {keyspace}.reactions WHERE conversation_id = ? AND seq = ? AND user_id = ?";
    reaction_upsert: Write, 4 =
        "UPDATE {keyspace}.reactions SET emoji = ? WHERE conversation_id = ? AND seq = ? AND user_id = ?";
    reaction_delete: Write, 3 = "DELETE FROM {keyspace}.reactions WHERE conversation_id = ? AND seq = ? AND user_id = ?";
    reactions_clear: Write, 2 = "DELETE FROM {keyspace}.reactions WHERE conversation_id = ? AND seq = ?";

    // blocks
    /// (user, blocked, blocked_at_ms).
    block_claim: Lwt, 3 =
        "INSERT INTO {keyspace}.blocks (user_id, blocked_id, blocked_at_ms) VALUES (?, ?, ?) IF NOT EXISTS";
    block_release: Lwt, 2 = "DELETE FROM {keyspace}.blocks WHERE user_id = ? AND blocked_id = ? IF EXISTS";
    block_read: Read, 2 = "SELECT blocked_id FROM {keyspace}.blocks WHERE user_id = ? AND blocked_id = ?";
    blocks_read: Read, 1 = "SELECT blocked_id, blocked_at_ms FROM {keyspace}.blocks WHERE user_id = ?";
    /// Through the `blocks_by_blocked` index (schema version 3).
    blocked_by_read: Read, 1 = "SELECT user_id FROM {keyspace}.blocks WHERE blocked_id = ?";

    // device_cursors
    /// (timestamp = value, value, user, device, conversation).
    cursor_advance: Write, 5 = "UPDATE {keyspace}.device_cursors USING TIMESTAMP ? SET delivered_seq = ? \
        WHERE user_id = ? AND device_id = ? AND conversation_id = ?";
    cursor_read: Read, 3 = "SELECT delivered_seq FROM {keyspace}.device_cursors \
        WHERE user_id = ? AND device_id = ? AND conversation_id = ?";
    device_cursors_read: Read, 2 =
        "SELECT conversation_id, delivered_seq FROM {keyspace}.device_cursors WHERE user_id = ? AND device_id = ?";
}
