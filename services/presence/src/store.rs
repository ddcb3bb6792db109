//! The `PresenceStore` trait and its in-process implementation.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::sync::RwLock;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub session_id: String,
    pub gateway_id: String,
    pub gateway_addr: String,
    pub connected_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserStatus {
    pub user_id: String,
    pub online: bool,
    /// Milliseconds since the epoch of the last disconnect; 0 if never seen.
    pub last_seen_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("user {user} already has {limit} sessions")]
    TooManySessions { user: String, limit: usize },
}

#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds a session. A session of the same device replaces the older one
    /// (the device reconnected before its old stream was noticed as closed).
    async fn register(&self, session: Session, max_per_user: usize) -> Result<(), Error>;
    /// Removes a session and records last seen when it was the user's last.
    async fn unregister(&self, user_id: &str, session_id: &str, now_ms: i64);
    async fn locate(&self, user_ids: &[String]) -> Vec<Session>;
    async fn status(&self, user_ids: &[String]) -> Vec<UserStatus>;
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Vec<Session>>,
    last_seen: HashMap<String, i64>,
}

/// Presence held in this process (`messenger up`).
#[derive(Default)]
pub struct MemoryStore {
    state: RwLock<State>,
}

#[async_trait]
impl PresenceStore for MemoryStore {
    async fn register(&self, session: Session, max_per_user: usize) -> Result<(), Error> {
        let mut state = self.state.write().await;
        let sessions = state.sessions.entry(session.user_id.clone()).or_default();
        sessions.retain(|s| s.device_id != session.device_id);
        if sessions.len() >= max_per_user {
            return Err(Error::TooManySessions { user: session.user_id, limit: max_per_user });
        }
        sessions.push(session);
        Ok(())
    }

    async fn unregister(&self, user_id: &str, session_id: &str, now_ms: i64) {
        let mut state = self.state.write().await;
        let Some(sessions) = state.sessions.get_mut(user_id) else {
            return;
        };
        let before = sessions.len();
        sessions.retain(|s| s.session_id != session_id);
        if sessions.len() < before {
            if sessions.is_empty() {
                state.sessions.remove(user_id);
            }
            state.last_seen.insert(user_id.to_owned(), now_ms);
        }
    }

    async fn locate(&self, user_ids: &[String]) -> Vec<Session> {
        let state = self.state.read().await;
        user_ids.iter().filter_map(|u| state.sessions.get(u)).flatten().cloned().collect()
    }

    async fn status(&self, user_ids: &[String]) -> Vec<UserStatus> {
        let state = self.state.read().await;
        user_ids
            .iter()
            .map(|user| UserStatus {
                user_id: user.clone(),
                online: state.sessions.get(user).is_some_and(|s| !s.is_empty()),
                last_seen_ms: state.last_seen.get(user).copied().unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, device: &str, id: &str) -> Session {
        Session {
            user_id: user.into(),
            device_id: device.into(),
            session_id: id.into(),
            gateway_id: "g1".into(),
            gateway_addr: "127.0.0.1:1".into(),
            connected_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn sessions_are_located_and_last_seen_recorded() {
        let store = MemoryStore::default();
        store.register(session("alice", "phone", "s1"), 4).await.unwrap();
        store.register(session("alice", "laptop", "s2"), 4).await.unwrap();
        let users = vec!["alice".to_owned(), "bob".to_owned()];
        assert_eq!(store.locate(&users).await.len(), 2);
        store.unregister("alice", "s1", 100).await;
        let status = store.status(&users).await;
        assert!(status[0].online);
        assert!(!status[1].online);
        store.unregister("alice", "s2", 200).await;
        let status = store.status(&users).await;
        assert!(!status[0].online);
        assert_eq!(status[0].last_seen_ms, 200);
        assert_eq!(status[1].last_seen_ms, 0);
    }

    #[tokio::test]
    async fn reconnecting_device_replaces_its_old_session_and_limit_holds() {
        let store = MemoryStore::default();
        store.register(session("bob", "phone", "s1"), 2).await.unwrap();
        store.register(session("bob", "phone", "s2"), 2).await.unwrap();
        let located = store.locate(&["bob".to_owned()]).await;
        assert_eq!(located.iter().map(|s| s.session_id.as_str()).collect::<Vec<_>>(), vec!["s2"]);
        // A stale unregister of the replaced session changes nothing.
        store.unregister("bob", "s1", 5).await;
        assert_eq!(store.locate(&["bob".to_owned()]).await.len(), 1);
        store.register(session("bob", "laptop", "s3"), 2).await.unwrap();
        let refused = store.register(session("bob", "tablet", "s4"), 2).await;
        assert!(matches!(refused, Err(Error::TooManySessions { limit: 2, .. })));
    }
}
