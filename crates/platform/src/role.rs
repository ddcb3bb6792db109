//! The roles a messenger process can play: what discovery finds instances
//! of and what a cluster certificate grants (`tls`, `authorize`).

use serde::{Deserialize, Serialize};

/// One of the five services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Message,
    Presence,
    Media,
    Notify,
}

impl Role {
    /// Every role, in start-up order (what others call first).
    pub const ALL: [Role; 5] = [Role::Presence, Role::Notify, Role::Message, Role::Media, Role::Gateway];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Message => "message",
            Role::Presence => "presence",
            Role::Media => "media",
            Role::Notify => "notify",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "gateway" => Ok(Role::Gateway),
            "message" => Ok(Role::Message),
            "presence" => Ok(Role::Presence),
            "media" => Ok(Role::Media),
            "notify" => Ok(Role::Notify),
            other => Err(format!("unknown service {other:?} (expected gateway, message, presence, media or notify)")),
        }
    }
}
