use super::*;
use crate::store::{Attachment, Role, SeqBounds};

fn member(user: &str, joined_seq: u64, removed_seq: Option<u64>) -> Member {
    Member {
        user_id: user.into(),
        role: Role::Member,
        joined_seq,
        removed_seq,
        read_seq: joined_seq,
        delivered_seq: 0,
        took_part: false,
        earlier: Vec::new(),
    }
}

fn entry(seq: u64, kind: Kind, target_seq: u64) -> StoredMessage {
    let mut entry = StoredMessage::event(uuid::Uuid::nil(), "alice", kind, 0);
    entry.seq = seq;
    entry.target_seq = target_seq;
    entry.body = "words".into();
    entry.reaction = "🔥".into();
    entry.attachments = vec![Attachment { media_id: "m".into(), ..Attachment::default() }];
    entry
}

#[test]
fn a_range_holds_its_ends_and_nothing_outside() {
    let bounds = member("bob", 5, Some(9)).visible();
    let seen: Vec<u64> = (1..=12).filter(|seq| view(&entry(*seq, Kind::Text, 0), &bounds) == View::Full).collect();
    assert_eq!(seen, (5..=9).collect::<Vec<_>>());
    let open = member("bob", 5, None).visible();
    assert_eq!(view(&entry(u64::MAX, Kind::Text, 0), &open), View::Full);
    assert_eq!(view(&entry(4, Kind::Text, 0), &open), View::Hidden);
}

#[test]
fn a_change_of_an_unseen_entry_is_shown_without_content() {
    let bob = member("bob", 5, None).visible();
    for kind in [Kind::Edit, Kind::Reaction, Kind::Delete] {
        assert_eq!(view(&entry(7, kind, 3), &bob), View::Redacted, "{kind:?}");
        let shown = shown(entry(7, kind, 3), &bob).unwrap();
        assert!(shown.body.is_empty() && shown.reaction.is_empty() && shown.attachments.is_empty(), "{shown:?}");
        assert_eq!((shown.seq, shown.target_seq, shown.kind), (7, 3, kind));
        assert_eq!(view(&entry(7, kind, 5), &bob), View::Full, "{kind:?} of a seen entry");
        assert_eq!(view(&entry(4, kind, 3), &bob), View::Hidden, "{kind:?} before joining");
    }
    // Replies and events name other seqs too, but carry nothing of them.
    assert_eq!(view(&entry(7, Kind::Text, 3), &bob), View::Full);
    assert_eq!(view(&entry(7, Kind::MembersAdded, 3), &bob), View::Full);
}

#[test]
fn the_audience_is_who_sees_the_entry_in_full() {
    let members =
        [member("alice", 1, None), member("bob", 5, None), member("carol", 1, Some(6)), member("dave", 8, None)];
    let audience = |entry: StoredMessage| appended(entry, &members).audience.to_vec();
    assert_eq!(audience(entry(6, Kind::Text, 0)), ["alice", "bob", "carol"]);
    // The entry that ends carol's membership still reaches her; the next does not.
    assert_eq!(audience(entry(7, Kind::Text, 0)), ["alice", "bob"]);
    // An edit of seq 3 reaches only who saw seq 3 and still sees the edit.
    assert_eq!(audience(entry(9, Kind::Edit, 3)), ["alice"]);
    // ...and goes without content to who sees the edit but not seq 3.
    assert_eq!(appended(entry(9, Kind::Edit, 3), &members).withheld_from.to_vec(), ["bob", "dave"]);
    assert_eq!(audience(entry(9, Kind::Reaction, 8)), ["alice", "bob", "dave"]);
}

#[test]
fn content_from_a_blocked_user_reaches_the_blocker_only_withheld() {
    let blocked = std::collections::HashSet::from(["alice".to_owned()]);
    for kind in [Kind::Text, Kind::Edit, Kind::Reaction] {
        assert!(from_blocked(&entry(7, kind, 3), &blocked), "{kind:?}");
        let to_both = appended_to_active(entry(7, Kind::Text, 0), ["bob".into(), "carol".into()]);
        let appended = Appended { entry: entry(7, kind, 3), ..to_both };
        let without = without_blockers(appended, &["carol".into()]);
        assert_eq!(without.audience.to_vec(), ["bob"], "{kind:?}");
        assert_eq!(without.withheld_from.to_vec(), ["carol"], "{kind:?}: the blocker gets it without content");
    }
    // Events and deletes carry nothing of theirs: everyone gets them.
    for kind in [Kind::Delete, Kind::MembersAdded, Kind::MemberRemoved, Kind::Renamed] {
        assert!(!from_blocked(&entry(7, kind, 3), &blocked), "{kind:?}");
        let to_both = appended_to_active(entry(7, Kind::Text, 0), ["bob".into(), "carol".into()]);
        let appended = Appended { entry: entry(7, kind, 3), ..to_both };
        assert_eq!(without_blockers(appended, &["carol".into()]).audience.to_vec(), ["bob", "carol"], "{kind:?}");
    }
    assert!(!from_blocked(&entry(7, Kind::Text, 0), &std::collections::HashSet::from(["bob".to_owned()])));
    let withheld = redacted(entry(7, Kind::Text, 0));
    assert!(withheld.withheld && withheld.body.is_empty() && withheld.attachments.is_empty(), "{withheld:?}");
    assert_eq!((withheld.seq, withheld.sender.as_str()), (7, "alice"));
}

#[test]
fn a_re_added_member_sees_each_of_its_ranges_and_nothing_between() {
    let mut bob = member("bob", 8, None);
    bob.earlier = vec![SeqBounds { from: 2, to: Some(4) }];
    let visible = bob.visible();
    let seen: Vec<u64> = (1..=10).filter(|seq| view(&entry(*seq, Kind::Text, 0), &visible) == View::Full).collect();
    assert_eq!(seen, [2, 3, 4, 8, 9, 10]);
    // A change made after the re-add of an entry from the earlier range is shown;
    // of one sent while bob was out, without content.
    assert_eq!(view(&entry(9, Kind::Reaction, 3), &visible), View::Full);
    assert_eq!(view(&entry(9, Kind::Edit, 6), &visible), View::Redacted);
    let members = [member("alice", 1, None), bob.clone()];
    assert_eq!(appended(entry(9, Kind::Reaction, 3), &members).audience.to_vec(), ["alice", "bob"]);
    let out = appended(entry(9, Kind::Reaction, 6), &members);
    assert_eq!((out.audience.to_vec(), out.withheld_from.to_vec()), (vec!["alice".to_owned()], vec!["bob".to_owned()]));
    // Ranges written twice or touching merge; the first seq is the oldest range's.
    let merged = Visible::new(vec![
        SeqBounds { from: 8, to: None },
        SeqBounds { from: 2, to: Some(4) },
        SeqBounds { from: 2, to: Some(4) },
        SeqBounds { from: 5, to: Some(6) },
    ]);
    assert_eq!(merged.ranges(), [SeqBounds { from: 2, to: Some(6) }, SeqBounds { from: 8, to: None }]);
    assert_eq!(merged.from(), 2);
}

#[test]
fn a_message_whose_latest_edit_the_reader_cannot_see_shows_no_text() {
    let removed = member("bob", 1, Some(5)).visible();
    let mut message = entry(3, Kind::Text, 0);
    message.last_edit_seq = 4;
    assert_eq!(view(&message, &removed), View::Full, "edited while bob was there");
    message.last_edit_seq = 7;
    assert_eq!(view(&message, &removed), View::Redacted, "edited after his removal");
    let shown = shown(message.clone(), &removed).unwrap();
    assert!(shown.withheld && shown.body.is_empty(), "{shown:?}");
    let mut back = member("bob", 9, None);
    back.earlier = vec![SeqBounds { from: 1, to: Some(5) }];
    assert_eq!(view(&message, &back.visible()), View::Redacted, "edited while he was out");
    message.last_edit_seq = 10;
    assert_eq!(view(&message, &back.visible()), View::Full, "edited again once he was back");
}
