//! The sessions this gateway holds, by session id: where `Deliver` finds them.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use messenger_proto::v1::delivery::Event;
use tokio::sync::{Notify, mpsc};

#[derive(Clone)]
pub(crate) struct SessionHandle {
    pub inbox: mpsc::Sender<Arc<Event>>,
    /// Signalled when a live event could not be queued: the session re-syncs
    /// (receipts and typing hints are simply dropped).
    pub resync: Arc<Notify>,
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

    pub fn deliver(&self, session_id: &str, event: &Arc<Event>) -> Delivered {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = sessions.get(session_id) else {
            return Delivered::Missing;
        };
        match handle.inbox.try_send(event.clone()) {
            Ok(()) => Delivered::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                handle.resync.notify_one();
                Delivered::Overflowed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivered::Missing,
        }
    }
}
