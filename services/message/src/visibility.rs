//! Visibility by seq: who may see which entry of a conversation, decided
//! here and nowhere else (DESIGN section 4).
//!
//! A member sees the entries whose seq lies in one of its memberships'
//! ranges (`Member::visible`: each from the entry that made it a member to
//! the one that ended it; a re-add starts another). An edit, reaction or delete changes another entry, its
//! *target*: a reader who sees the change but not its target gets the
//! change without content (the seq stays, so a device's order stays dense;
//! the text, emoji and media do not). Every read path (history, sync, gap
//! fill) passes its entries through [`shown`]; every delivery goes only to
//! an entry's [`audience`], computed by the write that appended it, so
//! fan-out never re-reads a roster that may have changed since.
//!
//! Blocks reach groups: content from someone the reader blocked (their
//! messages, edits and reactions) is not delivered or pushed to the
//! blocker and reads withheld while the block stands ([`from_blocked`]).

use std::{collections::HashSet, sync::Arc};

use crate::store::{Appended, Kind, Member, StoredMessage, Visible};

/// What a reader with some range sees of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Outside the reader's range: not shown at all.
    Hidden,
    /// The entry, but it changes one the reader cannot see: no content.
    Redacted,
    Full,
}

/// The entry another entry changes, if it is a change of one.
pub fn target(entry: &StoredMessage) -> Option<u64> {
    match entry.kind {
        Kind::Edit | Kind::Delete | Kind::Reaction => Some(entry.target_seq),
        _ => None,
    }
}

/// The rule: what a reader whose ranges are `bounds` sees of `entry`.
pub fn view(entry: &StoredMessage, bounds: &Visible) -> View {
    if !bounds.contains(entry.seq) {
        return View::Hidden;
    }
    match target(entry) {
        Some(target) if !bounds.contains(target) => View::Redacted,
        // A message whose text is an edit the reader cannot see (made after
        // its removal, or while it was out): no content, not that text.
        None if entry.last_edit_seq != 0 && !bounds.contains(entry.last_edit_seq) => View::Redacted,
        _ => View::Full,
    }
}

/// Whether what a reader sees of `entry` depends on its ranges beyond the
/// entry's own seq: a change of another entry, or a message whose text is
/// a later edit.
pub fn depends_on_ranges(entry: &StoredMessage) -> bool {
    target(entry).is_some() || entry.last_edit_seq != 0
}

/// `entry` as a reader with `bounds` may be shown it, if at all.
pub fn shown(entry: StoredMessage, bounds: &Visible) -> Option<StoredMessage> {
    match view(&entry, bounds) {
        View::Hidden => None,
        View::Redacted => Some(redacted(entry)),
        View::Full => Some(entry),
    }
}

/// `entry` without content, marked withheld: its seq, kind, sender and
/// target stay.
pub fn redacted(mut entry: StoredMessage) -> StoredMessage {
    entry.body.clear();
    entry.reaction.clear();
    entry.attachments.clear();
    entry.withheld = true;
    entry
}

/// Whether `entry` of a group is content from a user the reader blocked: a
/// message, or an edit or reaction of theirs. The blocker is not delivered
/// it ([`without_blockers`]) and reads it withheld while the block stands
/// (after an unblock it reads in full again). Events and deletes carry no
/// content of theirs and stay: the blocker still sees who joins, leaves or
/// renames. In a direct conversation a block refuses the send instead.
pub fn from_blocked(entry: &StoredMessage, blocked: &HashSet<String>) -> bool {
    is_content(entry) && blocked.contains(&entry.sender)
}

/// Whether `entry` carries content of its sender's: a message, an edit or a reaction.
pub fn is_content(entry: &StoredMessage) -> bool {
    matches!(entry.kind, Kind::Text | Kind::Edit | Kind::Reaction)
}

/// A group entry with `blockers` (the users who blocked its sender) moved
/// from its audience to those it is withheld from, for the entries
/// [`from_blocked`] withholds from them.
pub fn without_blockers(mut appended: Appended, blockers: &[String]) -> Appended {
    if blockers.is_empty() || !is_content(&appended.entry) {
        return appended;
    }
    let (withheld, kept): (Vec<String>, Vec<String>) =
        appended.audience.iter().cloned().partition(|user| blockers.contains(user));
    if !withheld.is_empty() {
        appended.audience = Arc::new(kept);
        appended.withheld_from = Arc::new(appended.withheld_from.iter().cloned().chain(withheld).collect());
    }
    appended
}

/// `entry` as it commits, with whom to deliver it to: every membership
/// that sees it in full, and apart every one that sees it redacted (they
/// get it without content, so their devices need no gap fill for it).
pub fn appended(entry: StoredMessage, members: &[Member]) -> Appended {
    let (mut audience, mut withheld_from) = (Vec::new(), Vec::new());
    for member in members {
        match view(&entry, &member.visible()) {
            View::Full => audience.push(member.user_id.clone()),
            View::Redacted => withheld_from.push(member.user_id.clone()),
            View::Hidden => {}
        }
    }
    Appended { entry, audience: Arc::new(audience), withheld_from: Arc::new(withheld_from) }
}

/// An entry that changes no other (a message or an event), to the members
/// active when it was appended: all of them see it in full, by the rule (an
/// active member joined at or before the entry and has not left), so stores
/// that know only their active roster at that moment need no ranges.
pub fn appended_to_active(entry: StoredMessage, active: impl IntoIterator<Item = String>) -> Appended {
    Appended { audience: audience_of_active(&entry, active), entry, withheld_from: Arc::default() }
}

/// [`appended_to_active`]'s audience alone, for a batch of messages
/// reserved against one roster.
pub fn audience_of_active(entry: &StoredMessage, active: impl IntoIterator<Item = String>) -> Arc<Vec<String>> {
    debug_assert!(target(entry).is_none(), "a change of another entry needs the members' ranges");
    Arc::new(active.into_iter().collect())
}

#[cfg(test)]
mod tests;
