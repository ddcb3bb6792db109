//! Identifiers and time. Ids are UUIDv7: time-ordered and coordination-free.

use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// A new time-ordered id.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// Parses a UUID given by a client, for validation at the edge.
pub fn parse(text: &str) -> Option<Uuid> {
    Uuid::try_parse(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert!(a < b);
        assert_eq!(a.get_version_num(), 7);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse("not-a-uuid").is_none());
        assert!(parse(&new_id().to_string()).is_some());
    }
}
