//! The sessions this gateway holds, by session id: where `Deliver` finds them.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use messenger_proto::v1::{self as pb, delivery::Event};
use tokio::sync::{Notify, mpsc};

/// A live event for one session, with the span of its delivery (disabled
/// when untraced): the session writes the frame inside it.
pub(crate) struct Live {
    pub event: Arc<Event>,
    pub span: tracing::Span,
}

#[derive(Clone)]
pub(crate) struct SessionHandle {
    /// The registry holds the only sender: removing the handle ends the session.
    pub inbox: mpsc::Sender<Live>,
    /// Signalled when a live event could not be queued: the session re-syncs
    /// (receipts and typing hints are simply dropped).
    pub resync: Arc<Notify>,
    /// What the session registered with presence: its lease is renewed, and
    /// registered again if presence lost it (`leases.rs`).
    pub presence: Arc<pb::Session>,
}

#[derive(Clone, Default)]
pub(crate) struct Registry {
    sessions: Arc<RwLock<HashMap<String, SessionHandle>>>,
}

pub(crate) enum Delivered {
    Queued,
    /// The inbox was full; the session will re-sync from its cursor.
    Overflowed,
    Missing,
}

impl Registry {
    pub fn insert(&self, session_id: String, handle: SessionHandle) {
        self.sessions.write().unwrap_or_else(|e| e.into_inner()).insert(session_id, handle);
    }

    pub fn remove(&self, session_id: &str) {
        self.sessions.write().unwrap_or_else(|e| e.into_inner()).remove(session_id);
    }

    pub fn contains(&self, session_id: &str) -> bool {
        self.sessions.read().unwrap_or_else(|e| e.into_inner()).contains_key(session_id)
    }

    /// Makes a session catch up from its cursor (it may have missed live pushes);
    /// false if it is not held here.
    pub fn resync(&self, session_id: &str) -> bool {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        sessions.get(session_id).map(|handle| handle.resync.notify_one()).is_some()
    }

    /// The presence registrations of every session held now.
    pub fn leases(&self) -> Vec<Arc<pb::Session>> {
        self.sessions.read().unwrap_or_else(|e| e.into_inner()).values().map(|h| h.presence.clone()).collect()
    }

    pub fn deliver(&self, session_id: &str, event: &Arc<Event>, span: &tracing::Span) -> Delivered {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = sessions.get(session_id) else {
            return Delivered::Missing;
        };
        match handle.inbox.try_send(Live { event: event.clone(), span: span.clone() }) {
            Ok(()) => Delivered::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.resync.notify_one();
                Delivered::Overflowed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivered::Missing,
        }
    }
}
