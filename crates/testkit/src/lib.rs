//! Real dependency servers for tests (redis-server, etcd, Cassandra), and
//! the test files media tests upload (`media.rs`),
//! started from what `scripts/setup.sh` installs, each on its own loopback port and directory,
//! and controllable the way outages happen: stopped, restarted, paused.
//! Redis and etcd start over TLS on request, Cassandra takes TLS beside
//! plaintext, each with certificates from a CA of its own (`tls.rs`).

#![forbid(unsafe_code)]

pub mod cassandra;
pub mod media;
pub mod nginx;
pub mod tls;

pub use cassandra::{CassandraNode, shared_node as shared_cassandra, shared_node_tls as shared_cassandra_tls};
pub use nginx::CdnEdge;

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).expect("no free loopback port").port()
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on port {port} within 10 s");
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
    assert!(status.is_ok_and(|status| status.success()), "kill -{name} {} failed", child.id());
}

/// A server process: stopped gracefully on request, killed when dropped.
#[derive(Default)]
pub(crate) struct Process(pub(crate) Option<Child>);

impl Process {
    pub(crate) fn running(&self) -> &Child {
        self.0.as_ref().expect("the server is running")
    }

    /// SIGTERM and wait: the server keeps its data.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `redis-server` with an append-only file, so data survives a restart
/// (what makes a stale entry after an outage possible at all).
pub struct RedisServer {
    process: Process,
    port: u16,
    dir: tempfile::TempDir,
    tls: Option<tls::Loopback>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Over TLS only (no plaintext port), requiring a client certificate
    /// from its CA: [`Self::url`] says `rediss://`, [`Self::client_tls`]
    /// has what a client needs.
    pub fn start_tls() -> Self {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let tls = tls.then(|| tls::loopback(&dir.path().join("tls")));
        let mut server = Self { process: Process::default(), port: free_port(), dir, tls };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", ""]);
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "yes"])
                .arg("--tls-cert-file")
                .arg(&tls.server.cert)
                .arg("--tls-key-file")
                .arg(&tls.server.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.client.ca_file),
        };
        let child = command
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run scripts/setup.sh");
        self.process = Process(Some(child));
        wait_listening(self.port, "redis-server");
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA and client certificate a client needs, when started over TLS.
    pub fn client_tls(&self) -> Option<&tls::ClientFiles> {
        self.tls.as_ref().map(|tls| &tls.client)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops it the way an operator does (SIGTERM, which keeps the data).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        signal(self.process.running(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.process.running(), "CONT");
    }
}

/// A single-member `etcd` with its own data directory, so a restart keeps
/// registrations and leases the way a real cluster's restart does.
pub struct EtcdServer {
    process: Process,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    tls: Option<tls::Loopback>,
}

impl EtcdServer {
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Clients over TLS only, each with a certificate from its CA
    /// (`--client-cert-auth`): [`Self::endpoint`] says `https://`,
    /// [`Self::client_tls`] has what a client needs.
    pub fn start_tls() -> Self {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let tls = tls.then(|| tls::loopback(&dir.path().join("tls")));
        let (client_port, peer_port) = (free_port(), free_port());
        let mut server = Self { process: Process::default(), client_port, peer_port, dir, tls };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server.cert)
                .arg("--key-file")
                .arg(&tls.server.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client.ca_file)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "test", "--log-level", "error"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd not found: run scripts/setup.sh");
        self.process = Process(Some(child));
        wait_listening(self.client_port, "etcd");
    }

    /// `host:port` for clients; `https://host:port` when started over TLS.
    pub fn endpoint(&self) -> String {
        match self.tls {
            None => format!("127.0.0.1:{}", self.client_port),
            Some(_) => format!("https://127.0.0.1:{}", self.client_port),
        }
    }

    /// The CA and client certificate a client needs, when started over TLS.
    pub fn client_tls(&self) -> Option<&tls::ClientFiles> {
        self.tls.as_ref().map(|tls| &tls.client)
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again with the same data, on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}
