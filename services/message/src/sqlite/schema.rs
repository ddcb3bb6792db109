//! The SQLite schema, mirroring the Scylla data model in DESIGN.md section 5.
//!
//! Differences, and why: dedupe is a unique index on `messages` instead of a
//! separate TTL table (SQLite has no TTL and the index costs less than a second
//! table); `direct_pairs` makes get-or-create of a 1:1 conversation a keyed
//! lookup; messages are not bucketed because a B-tree has no partition limit.

/// Migrations in order; `PRAGMA user_version` records how many have run.
pub const MIGRATIONS: [&str; 7] = [V1, V2, V3, V4, V5, V6, V7];

const V1: &str = "
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    kind INTEGER NOT NULL,
    title TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    last_activity_ms INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS members (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role INTEGER NOT NULL,
    joined_seq INTEGER NOT NULL,
    read_seq INTEGER NOT NULL,
    joined_at_ms INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS members_by_user ON members (user_id, conversation_id);

CREATE TABLE IF NOT EXISTS direct_pairs (
    user_low TEXT NOT NULL,
    user_high TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (user_low, user_high)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;

CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages (conversation_id, sender, client_msg_id);

CREATE TABLE IF NOT EXISTS device_cursors (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    delivered_seq INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, conversation_id)
) WITHOUT ROWID;
";

/// Groups, roles, ended memberships, event entries, edits, deletes, reactions.
const V2: &str = "
ALTER TABLE messages ADD COLUMN kind INTEGER NOT NULL DEFAULT 1;
ALTER TABLE messages ADD COLUMN reply_to_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN target_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN reaction TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN member_ids TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN title TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN role INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN edited_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;

ALTER TABLE members ADD COLUMN removed_seq INTEGER;

CREATE TABLE IF NOT EXISTS reactions (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    emoji TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq, user_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS device_cursors_by_conversation ON device_cursors (conversation_id, user_id);
";

/// Block lists, and whether a member has taken part (sent; creators count
/// without it) so its presence reaches the others. Existing senders are
/// backfilled from `messages` (its dedupe index covers the lookup).
const V3: &str = "
CREATE TABLE IF NOT EXISTS blocks (
    user_id TEXT NOT NULL,
    blocked_id TEXT NOT NULL,
    blocked_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;

ALTER TABLE members ADD COLUMN took_part INTEGER NOT NULL DEFAULT 0;
UPDATE members SET took_part = 1 WHERE EXISTS (
    SELECT 1 FROM messages WHERE messages.conversation_id = members.conversation_id
        AND messages.sender = members.user_id AND messages.kind = 1
);
";

/// Attachments of TEXT messages (JSON; empty for none).
const V4: &str = "
ALTER TABLE messages ADD COLUMN attachments TEXT NOT NULL DEFAULT '';
";

/// Who blocked a user: whom its group entries are not delivered to.
const V5: &str = "
CREATE INDEX IF NOT EXISTS blocks_by_blocked ON blocks (blocked_id, user_id);
";

/// Memberships that ended before the member was added again: a re-added
/// member sees each of its ranges.
const V6: &str = "
CREATE TABLE IF NOT EXISTS earlier_memberships (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    removed_seq INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id, joined_seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS earlier_memberships_by_user ON earlier_memberships (user_id, conversation_id);
";

/// The seq of a TEXT message's latest edit: its body is that edit's text,
/// withheld from readers who do not see that seq. Backfilled from the edits.
const V7: &str = "
ALTER TABLE messages ADD COLUMN last_edit_seq INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET last_edit_seq = edits.latest
FROM (SELECT conversation_id, target_seq, max(seq) AS latest FROM messages WHERE kind = 2
      GROUP BY conversation_id, target_seq) AS edits
WHERE messages.conversation_id = edits.conversation_id AND messages.seq = edits.target_seq
  AND messages.kind = 1;
";
