//! Requests to user-supplied URLs (webhooks, WebPush endpoints) without
//! server-side request forgery: https only (unless `egress.allow_http`), no
//! address that is private, loopback, link-local or otherwise internal
//! unless allow-listed, no redirects, bounded time and response size.
//!
//! The check runs where the connection is made: the HTTP client resolves
//! names through [`GuardedResolver`], so a name that resolves to a public
//! address at registration and to 169.254.169.254 later (DNS rebinding) is
//! refused at the second lookup. Literal addresses never reach a resolver
//! and are checked by [`Guard::check_url`] before each request.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use serde::{Deserialize, Serialize};

/// What outbound requests to user-supplied URLs (webhooks, WebPush
/// endpoints) may reach: no private network unless allow-listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressOptions {
    /// Accept http:// URLs (tests and development only).
    pub allow_http: bool,
    /// Address ranges reachable although private, loopback or link-local
    /// (CIDR, e.g. "10.1.0.0/16" for an internal webhook receiver).
    pub allow_addresses: Vec<IpNet>,
    /// Whole request, connect included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bytes of a response body read at most (the rest is not read).
    pub max_response_bytes: usize,
    /// Longest URL a device may register.
    pub max_url_bytes: usize,
}

impl Default for EgressOptions {
    fn default() -> Self {
        Self {
            allow_http: false,
            allow_addresses: Vec::new(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_response_bytes: 64 * 1024,
            max_url_bytes: 2048,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Guard {
    allow_http: bool,
    allow: Arc<Vec<IpNet>>,
    max_url_bytes: usize,
}

/// Why a URL or address is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("not a URL: {0}")]
    Malformed(String),
    #[error("the URL must be https")]
    Scheme,
    #[error("the URL is longer than {0} bytes")]
    TooLong(usize),
    #[error("the URL may not carry a user name or password")]
    Credentials,
    #[error("{0} is not a public address")]
    Internal(IpAddr),
    #[error("{0} resolves to no address")]
    Unresolved(String),
}

/// Addresses no user-supplied URL may reach by default: everything that is
/// not the public internet (RFC 6890 special-purpose ranges).
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || (first == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64: an IPv4 address inside
                || first == 0x0100 // discard-only 100::/64
                || v6.segments()[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // shared address space (carrier NAT) 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || a >= 240 // reserved
}

impl Guard {
    pub fn new(options: &EgressOptions) -> Self {
        Self {
            allow_http: options.allow_http,
            allow: Arc::new(options.allow_addresses.clone()),
            max_url_bytes: options.max_url_bytes,
        }
    }

    /// Whether a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !internal(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Parses and checks a URL a user supplied: scheme, length, no
    /// credentials, and a literal address must be permitted. Names are
    /// checked when they are resolved ([`Guard::resolve`]).
    pub fn check_url(&self, text: &str) -> Result<Url, Refused> {
        if text.len() > self.max_url_bytes {
            return Err(Refused::TooLong(self.max_url_bytes));
        }
        let url = Url::parse(text).map_err(|error| Refused::Malformed(error.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            _ => return Err(Refused::Scheme),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Credentials);
        }
        match url.host() {
            None => Err(Refused::Malformed("no host".into())),
            Some(Host::Ipv4(ip)) if !self.permits(IpAddr::V4(ip)) => Err(Refused::Internal(IpAddr::V4(ip))),
            Some(Host::Ipv6(ip)) if !self.permits(IpAddr::V6(ip)) => Err(Refused::Internal(IpAddr::V6(ip))),
            Some(_) => Ok(url),
        }
    }

    /// Every address `host` resolves to, if all are permitted: one internal
    /// address refuses the name (it could be picked on a later connect).
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, Refused> {
        let addresses: Vec<SocketAddr> =
            tokio::net::lookup_host((host, 0)).await.map_err(|_| Refused::Unresolved(host.to_owned()))?.collect();
        if addresses.is_empty() {
            return Err(Refused::Unresolved(host.to_owned()));
        }
        if let Some(refused) = addresses.iter().find(|address| !self.permits(address.ip())) {
            return Err(Refused::Internal(refused.ip()));
        }
        Ok(addresses)
    }

    /// The HTTP client for user-supplied URLs: this guard's resolver, no
    /// redirects, the configured timeouts, and no proxy from the environment
    /// (a proxy would resolve names and connect where the guard never looks).
    pub fn client(&self, options: &EgressOptions) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(self.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(options.request_timeout)
            .connect_timeout(options.connect_timeout)
            .https_only(!self.allow_http)
            .user_agent(concat!("messenger-notify/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a client with these settings builds")
    }
}

/// Resolves names for the egress client, refusing internal addresses.
struct GuardedResolver(Guard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let addresses = guard.resolve(name.as_str()).await.map_err(Box::new)?;
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// Reads at most `max` bytes of a response body (the rest is left unread).
pub async fn bounded_body(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = max - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= max {
            break;
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(allow_http: bool, allow: &[&str]) -> Guard {
        Guard::new(&EgressOptions {
            allow_http,
            allow_addresses: allow.iter().map(|net| net.parse().unwrap()).collect(),
            ..EgressOptions::default()
        })
    }

    #[test]
    fn internal_addresses_are_refused_unless_allow_listed() {
        let strict = guard(false, &[]);
        for refused in [
            "https://127.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data/",
            "https://10.0.0.7/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert!(matches!(strict.check_url(refused), Err(Refused::Internal(_))), "{refused}");
        }
        for allowed in ["https://93.184.215.14/hook", "https://[2606:4700::1111]/", "https://hooks.example.com/x"] {
            assert!(strict.check_url(allowed).is_ok(), "{allowed}");
        }
        let listed = guard(false, &["127.0.0.1/32", "10.1.0.0/16"]);
        assert!(listed.check_url("https://127.0.0.1:8443/hook").is_ok());
        assert!(listed.check_url("https://10.1.2.3/").is_ok());
        assert!(listed.check_url("https://10.2.0.1/").is_err(), "only the listed range");
        assert!(listed.check_url("https://169.254.169.254/").is_err());
    }

    #[test]
    fn only_https_without_credentials_and_within_the_length() {
        let strict = guard(false, &[]);
        assert_eq!(strict.check_url("http://hooks.example.com/"), Err(Refused::Scheme));
        assert_eq!(strict.check_url("file:///etc/passwd"), Err(Refused::Scheme));
        assert_eq!(strict.check_url("gopher://hooks.example.com/"), Err(Refused::Scheme));
        assert_eq!(strict.check_url("https://user:pw@hooks.example.com/"), Err(Refused::Credentials));
        assert!(matches!(strict.check_url("not a url"), Err(Refused::Malformed(_))));
        let long = format!("https://hooks.example.com/{}", "a".repeat(2048));
        assert_eq!(strict.check_url(&long), Err(Refused::TooLong(2048)));
        let edge = format!("https://hooks.example.com/{}", "a".repeat(2048 - "https://hooks.example.com/".len()));
        assert!(strict.check_url(&edge).is_ok(), "exactly at the limit");
        assert!(guard(true, &[]).check_url("http://hooks.example.com/").is_ok(), "allow_http");
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connect() {
        let strict = guard(true, &[]);
        assert!(matches!(strict.resolve("localhost").await, Err(Refused::Internal(ip)) if ip.is_loopback()));
        // The client refuses it too, before any byte is sent.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = strict.client(&EgressOptions { allow_http: true, ..EgressOptions::default() });
        let error = client.get(format!("http://localhost:{port}/")).send().await.unwrap_err();
        assert!(error.is_connect(), "{error:?}");
        let listed = guard(true, &["127.0.0.0/8", "::1/128"]);
        assert!(listed.resolve("localhost").await.is_ok());
    }

    /// reqwest reads proxy settings from the environment when a client is
    /// built, so a child process of this test binary builds the egress
    /// client with `HTTP_PROXY` and `ALL_PROXY` naming a listener here,
    /// which must never be connected to.
    #[test]
    fn the_egress_client_ignores_proxies_from_the_environment() {
        const CHILD: &str = "MESSENGER_TEST_PROXY_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = server.local_addr().unwrap().port();
                tokio::spawn(async move {
                    let (mut socket, _) = server.accept().await.unwrap();
                    let mut request = [0u8; 1024];
                    let _ = socket.read(&mut request).await;
                    socket.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
                });
                let client = guard(true, &["127.0.0.0/8"])
                    .client(&EgressOptions { allow_http: true, ..EgressOptions::default() });
                let response = client.get(format!("http://127.0.0.1:{port}/hook")).send().await.unwrap();
                assert_eq!(response.status(), 204, "answered by the server itself");
            });
            return;
        }
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        proxy.set_nonblocking(true).unwrap();
        let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "guard::tests::the_egress_client_ignores_proxies_from_the_environment"])
            .env(CHILD, "1")
            .env("HTTP_PROXY", &proxy_url)
            .env("http_proxy", &proxy_url)
            .env("ALL_PROXY", &proxy_url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap();
        let output = String::from_utf8_lossy(&child.stdout);
        assert!(child.status.success(), "{output}{}", String::from_utf8_lossy(&child.stderr));
        assert!(output.contains("1 passed"), "the child ran the test: {output}");
        assert!(proxy.accept().is_err(), "the request went through the proxy");
    }
}
