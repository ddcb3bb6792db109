//! Who may do what to a conversation. Pure functions over the state a store
//! read inside its transaction, so every backend enforces the same rules
//! atomically.
//!
//! Groups: the owner may do everything; admins may add members, remove plain
//! members, rename and delete others' messages; members may send, react,
//! edit and delete their own messages, and leave. Direct conversations have
//! exactly their two members, fixed.

use crate::{
    error::{Error, Result},
    store::{ConversationKind, Kind, Member, Role, StoredMessage},
};

fn group_only(kind: ConversationKind) -> Result<()> {
    match kind {
        ConversationKind::Group => Ok(()),
        ConversationKind::Direct => {
            Err(Error::FailedPrecondition("direct conversations have fixed members and no title".into()))
        }
    }
}

fn at_least_admin(actor: &Member, what: &str) -> Result<()> {
    if actor.role >= Role::Admin {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!("only admins and the owner can {what}")))
    }
}

/// Adding `adding` new users to a group that has `active` members.
pub fn add_members(kind: ConversationKind, actor: &Member, active: usize, adding: usize, max: usize) -> Result<()> {
    group_only(kind)?;
    at_least_admin(actor, "add members")?;
    group_size(active + adding, max)
}

pub fn group_size(size: usize, max: usize) -> Result<()> {
    if size > max {
        return Err(Error::FailedPrecondition(format!("the group would have {size} members; the limit is {max}")));
    }
    Ok(())
}

pub fn remove_member(kind: ConversationKind, actor: &Member, target: Option<&Member>) -> Result<()> {
    group_only(kind)?;
    let target = target
        .filter(|t| t.is_active())
        .ok_or_else(|| Error::FailedPrecondition("that user is not a member".into()))?;
    if target.user_id == actor.user_id {
        return Err(Error::InvalidArgument("to remove yourself, leave".into()));
    }
    match actor.role {
        Role::Owner => Ok(()),
        Role::Admin if target.role == Role::Member => Ok(()),
        Role::Admin => Err(Error::PermissionDenied("admins can remove members, not other admins or the owner".into())),
        Role::Member => Err(Error::PermissionDenied("only admins and the owner can remove members".into())),
    }
}

pub fn leave(kind: ConversationKind) -> Result<()> {
    group_only(kind)
}

pub fn rename(kind: ConversationKind, actor: &Member) -> Result<()> {
    group_only(kind)?;
    at_least_admin(actor, "rename the group")
}

pub fn set_role(kind: ConversationKind, actor: &Member, target: Option<&Member>, role: Role) -> Result<()> {
    group_only(kind)?;
    if actor.role != Role::Owner {
        return Err(Error::PermissionDenied("only the owner can change roles".into()));
    }
    if role == Role::Owner {
        return Err(Error::InvalidArgument("a group has one owner; make the user an admin instead".into()));
    }
    let target = target
        .filter(|t| t.is_active())
        .ok_or_else(|| Error::FailedPrecondition("that user is not a member".into()))?;
    if target.user_id == actor.user_id {
        return Err(Error::InvalidArgument("the owner's role cannot change".into()));
    }
    Ok(())
}

/// The TEXT message a modification targets, if the actor can see it.
pub fn target<'a>(actor: &Member, message: Option<&'a StoredMessage>, seq: u64) -> Result<&'a StoredMessage> {
    let message = message.filter(|m| actor.visible().contains(m.seq)).ok_or(Error::MessageNotFound(seq))?;
    if message.kind != Kind::Text {
        return Err(Error::FailedPrecondition(format!("entry {seq} is not a message")));
    }
    Ok(message)
}

pub fn edit(actor: &Member, target: &StoredMessage, now_ms: i64, window_ms: i64) -> Result<()> {
    if target.sender != actor.user_id {
        return Err(Error::PermissionDenied("only the sender can edit a message".into()));
    }
    if target.deleted {
        return Err(Error::FailedPrecondition("the message was deleted".into()));
    }
    if now_ms - target.sent_at_ms > window_ms {
        return Err(Error::FailedPrecondition(format!("the edit window of {} s has passed", window_ms / 1000)));
    }
    Ok(())
}

pub fn delete(kind: ConversationKind, actor: &Member, target: &StoredMessage) -> Result<()> {
    let moderator = kind == ConversationKind::Group && actor.role >= Role::Admin;
    if target.sender != actor.user_id && !moderator {
        return Err(Error::PermissionDenied("only the sender (or a group admin) can delete a message".into()));
    }
    Ok(())
}

pub fn react(target: &StoredMessage) -> Result<()> {
    if target.deleted {
        return Err(Error::FailedPrecondition("the message was deleted".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, role: Role) -> Member {
        Member {
            user_id: user.into(),
            role,
            joined_seq: 1,
            removed_seq: None,
            read_seq: 0,
            delivered_seq: 0,
            took_part: false,
            earlier: Vec::new(),
        }
    }

    #[test]
    fn roles_gate_member_management() {
        let group = ConversationKind::Group;
        let (owner, admin, plain) = (member("o", Role::Owner), member("a", Role::Admin), member("m", Role::Member));
        assert!(remove_member(group, &owner, Some(&admin)).is_ok());
        assert!(remove_member(group, &admin, Some(&plain)).is_ok());
        assert!(matches!(remove_member(group, &admin, Some(&owner)), Err(Error::PermissionDenied(_))));
        assert!(matches!(remove_member(group, &plain, Some(&admin)), Err(Error::PermissionDenied(_))));
        assert!(matches!(add_members(group, &plain, 3, 1, 10), Err(Error::PermissionDenied(_))));
        assert!(matches!(add_members(group, &admin, 10, 1, 10), Err(Error::FailedPrecondition(_))));
        assert!(add_members(group, &admin, 9, 1, 10).is_ok());
        assert!(matches!(set_role(group, &admin, Some(&plain), Role::Admin), Err(Error::PermissionDenied(_))));
        assert!(set_role(group, &owner, Some(&plain), Role::Admin).is_ok());
        assert!(matches!(rename(ConversationKind::Direct, &owner), Err(Error::FailedPrecondition(_))));
    }
}
