//! The one way services build a Redis client (`fred`), so every Redis user
//! fails fast and reconnects the same way.

use std::time::Duration;

use fred::{
    clients::Client,
    interfaces::ClientLike,
    types::{
        Builder,
        config::{Config, ReconnectPolicy},
    },
};

/// A client for `url` whose commands fail after `command_timeout` (never
/// queued for long behind a dead server) and that reconnects forever, 50 ms
/// doubling to 2 s. Connecting starts in the background; `Err` only for an
/// unusable URL.
pub fn client(url: &str, command_timeout: Duration, connect_timeout: Duration) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|error| format!("{url:?}: {error}"))?;
    let client = Builder::from_config(config)
        .with_performance_config(|performance| performance.default_command_timeout = command_timeout)
        .with_connection_config(|connection| {
            connection.connection_timeout = connect_timeout;
            connection.internal_command_timeout = connect_timeout;
            connection.max_command_attempts = 1;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()
        .map_err(|error| error.to_string())?;
    client.connect();
    Ok(client)
}
