//! Circuit breaking per endpoint: a host that failed `circuit_failures`
//! pushes in a row (timeouts, refused connections, 5xx, 429) gets none for
//! `circuit_open`; its jobs wait, not counted as attempts. Then one push
//! tries it (the others keep waiting): an answer closes the circuit, another
//! failure opens it again. So a dead webhook host costs one request per
//! `circuit_open`, not one per job and retry, each holding a worker slot
//! until its timeout.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Endpoints that failed lately; one that answers is forgotten.
pub struct Breakers {
    failures: u32,
    open_for: Duration,
    endpoints: Mutex<HashMap<String, Circuit>>,
}

#[derive(Debug)]
struct Circuit {
    /// Failures in a row.
    failures: u32,
    /// No push goes to the endpoint before this.
    closed_at: Option<Instant>,
    last_failure: Instant,
}

/// Failing endpoints not heard of for this long are forgotten (memory
/// follows recent failures, not every host ever seen).
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Breakers {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self { failures, open_for, endpoints: Mutex::default() }
    }

    /// None: push to `endpoint` now. Some(wait): its circuit is open; try
    /// again after `wait`. Past the wait, one caller gets None (the trial)
    /// and the circuit stays open for the others.
    pub fn check(&self, endpoint: &str) -> Option<Duration> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let circuit = endpoints.get_mut(endpoint)?;
        let until = circuit.closed_at?;
        let now = Instant::now();
        if now < until {
            return Some(until - now);
        }
        circuit.closed_at = Some(now + self.open_for);
        None
    }

    /// The endpoint answered (whatever it said): its circuit closes.
    pub fn answered(&self, endpoint: &str) {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner()).remove(endpoint);
    }

    /// The endpoint failed; at `failures` in a row its circuit opens.
    pub fn failed(&self, endpoint: &str) {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        endpoints.retain(|_, circuit| now.duration_since(circuit.last_failure) < FORGET_AFTER);
        let circuit =
            endpoints.entry(endpoint.to_owned()).or_insert(Circuit { failures: 0, closed_at: None, last_failure: now });
        circuit.failures += 1;
        circuit.last_failure = now;
        if circuit.failures >= self.failures {
            circuit.closed_at = Some(now + self.open_for);
        }
    }
}

/// What a push's circuit is keyed by: the host and port of a webhook or
/// Web Push endpoint (`token` is its URL), else the provider.
pub fn endpoint_of(token: &str, provider: &str) -> String {
    reqwest::Url::parse(token)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https"))
        .and_then(|url| Some(format!("{}:{}", url.host_str()?, url.port_or_known_default()?)))
        .unwrap_or_else(|| provider.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_opens_at_its_failures_in_a_row_lets_one_trial_through_and_closes_on_an_answer() {
        let breakers = Breakers::new(3, Duration::from_millis(100));
        for _ in 0..2 {
            breakers.failed("a:443");
            assert_eq!(breakers.check("a:443"), None, "under the threshold");
        }
        breakers.failed("a:443");
        let wait = breakers.check("a:443").expect("open at the third failure in a row");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert_eq!(breakers.check("b:443"), None, "another endpoint is not affected");

        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(breakers.check("a:443"), None, "one trial once the wait is over");
        assert!(breakers.check("a:443").is_some(), "the others wait for the trial");
        breakers.failed("a:443");
        assert!(breakers.check("a:443").is_some(), "a failed trial opens it again");

        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(breakers.check("a:443"), None);
        breakers.answered("a:443");
        assert_eq!(breakers.check("a:443"), None, "an answer closes it");
        breakers.failed("a:443");
        assert_eq!(breakers.check("a:443"), None, "and the count starts again");
    }

    #[test]
    fn the_circuit_is_per_host_and_port_or_per_provider() {
        assert_eq!(endpoint_of("https://hooks.example.com/a?b", "webhook"), "hooks.example.com:443");
        assert_eq!(endpoint_of("http://10.0.0.1:8080/x", "webhook"), "10.0.0.1:8080");
        assert_eq!(endpoint_of("https://fcm.googleapis.com/fcm/send/abc", "web_push"), "fcm.googleapis.com:443");
        assert_eq!(endpoint_of("a1b2c3d4", "apns"), "apns");
    }
}
