//! Apache Cassandra 5.0 nodes: the CQL engine the Scylla store's tests run
//! against (same protocol, lightweight transactions and batches; ScyllaDB
//! itself is not available here). Started from the jars `scripts/setup.sh`
//! fetches from Maven Central, on JDK 17, with the settings in
//! `scripts/cassandra/`.
//!
//! [`shared_node`] is one node for a whole test run: nextest runs every test
//! in its own process, so the first test to ask starts it (detached, under a
//! lock) and later ones find it; each test then works in its own keyspace.
//! It stops when `scripts/test.sh` ends, or by itself after
//! [`SHARED_IDLE_MINUTES`] without a test asking for it; one found running an
//! older `cassandra.yaml` is replaced. [`CassandraNode`] is
//! a private node a test can stop, kill, pause and restart.
//!
//! Every node's native port takes TLS beside plaintext, with certificates
//! from a CA of its own under `<node dir>/tls` ([`shared_node_tls`],
//! [`CassandraNode::client_tls`]).

use std::{
    fs::{self, File},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use crate::{Process, free_port, signal, tls};

const POM: &str = include_str!("../../../scripts/cassandra/pom.xml");
const YAML: &str = include_str!("../../../scripts/cassandra/cassandra.yaml");
const JVM_OPTIONS: &str = include_str!("../../../scripts/cassandra/jvm.options");
const LOGBACK: &str = include_str!("../../../scripts/cassandra/logback.xml");

/// A node alone starts in about 5 s on 2 cores; under a busy test run it
/// can take much longer.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The shared node stops after this long without a test asking for it.
pub const SHARED_IDLE_MINUTES: u32 = 30;

/// The Cassandra version `scripts/cassandra/pom.xml` pins.
pub fn version() -> &'static str {
    let start = POM.find("<cassandra.version>").expect("pom names cassandra.version") + "<cassandra.version>".len();
    let end = start + POM[start..].find('<').expect("closed tag");
    &POM[start..end]
}

fn lib_dir() -> PathBuf {
    let cache = std::env::var_os("MESSENGER_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache").join("messenger")
    });
    let lib = cache.join(format!("cassandra-{}", version())).join("lib");
    assert!(lib.join(".complete").exists(), "Cassandra jars missing at {}: run scripts/setup.sh", lib.display());
    lib
}

/// JDK 17: Cassandra 5.0 does not run on newer ones (which may be the default `java`).
fn java() -> PathBuf {
    if let Some(java) = std::env::var_os("MESSENGER_JAVA17") {
        return PathBuf::from(java);
    }
    let mut candidates = vec![PathBuf::from("/usr/lib/jvm/java-17-openjdk-amd64/bin/java")];
    if let Ok(entries) = fs::read_dir("/usr/lib/jvm") {
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.file_name().is_some_and(|name| name.to_string_lossy().contains("17")))
            .map(|path| path.join("bin/java"))
            .collect();
        found.sort();
        candidates.extend(found);
    }
    candidates
        .into_iter()
        .find(|java| java.exists())
        .expect("no JDK 17 under /usr/lib/jvm (set MESSENGER_JAVA17): run scripts/setup.sh")
}

/// A node's TLS files under `<dir>/tls`, made once per node directory (a
/// restarted node keeps them): `ca.pem`, the node's `keystore.pem` (its key,
/// then its certificate for `localhost` and `127.0.0.1`: one file, as
/// `PEMBasedSslContextFactory` reads it) and a client certificate.
fn write_tls(dir: &Path) {
    let keystore = dir.join("tls/keystore.pem");
    if keystore.exists() {
        return;
    }
    let files = tls::loopback(&dir.join("tls"));
    let read = |path: &Path| fs::read_to_string(path).expect("a certificate file just written");
    fs::write(&keystore, read(&files.server.key) + &read(&files.server.cert)).expect("keystore.pem");
}

/// What a client of the node in `dir` needs for TLS (see [`write_tls`]).
fn client_files(dir: &Path) -> tls::ClientFiles {
    let tls = dir.join("tls");
    tls::ClientFiles { ca_file: tls.join("ca.pem"), cert: tls.join("client.pem"), key: tls.join("client-key.pem") }
}

/// Writes a node's configuration under `dir` and returns the command that runs it.
fn node_command(dir: &Path, cql_port: u16, storage_port: u16) -> Command {
    let conf = dir.join("conf");
    for sub in ["conf", "logs", "triggers", "data"] {
        fs::create_dir_all(dir.join(sub)).expect("node directory");
    }
    write_tls(dir);
    let yaml = YAML
        .replace("{storage_port}", &storage_port.to_string())
        .replace("{cql_port}", &cql_port.to_string())
        .replace("{dir}", &dir.display().to_string());
    fs::write(conf.join("cassandra.yaml"), yaml).expect("cassandra.yaml");
    fs::write(conf.join("logback.xml"), LOGBACK).expect("logback.xml");
    let mut command = Command::new(java());
    command.args(JVM_OPTIONS.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')));
    let property = |name: &str, value: &Path| format!("-D{name}={}", value.display());
    command
        .arg(format!("-Dcassandra.config=file://{}", conf.join("cassandra.yaml").display()))
        .arg(property("cassandra.storagedir", &dir.join("data")))
        .arg(property("cassandra.logdir", &dir.join("logs")))
        .arg(property("cassandra.triggers_dir", &dir.join("triggers")))
        .arg(property("logback.configurationFile", &conf.join("logback.xml")))
        .arg("-cp")
        .arg(format!("{}/*:{}", lib_dir().display(), conf.display()))
        .arg("org.apache.cassandra.service.CassandraDaemon");
    let output = File::create(dir.join("logs/stdout.log")).expect("stdout log");
    command.stdin(Stdio::null()).stdout(output.try_clone().expect("log handle")).stderr(output);
    command
}

/// Waits until the node serves CQL (the native port opens last in start-up).
fn wait_serving(child: &mut Child, port: u16, dir: &Path) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = || fs::read_to_string(dir.join("logs/system.log")).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            let log = log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!("Cassandra exited ({status}) before serving CQL; last log lines:\n{}", tail.join("\n"));
        }
        assert!(started.elapsed() < START_TIMEOUT, "Cassandra did not serve CQL on {port} within {START_TIMEOUT:?}");
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("cassandra {} serving CQL on 127.0.0.1:{port} after {:?}", version(), started.elapsed());
}

/// A private node: data in its own directory, so a restart keeps it.
pub struct CassandraNode {
    process: Process,
    cql_port: u16,
    storage_port: u16,
    dir: tempfile::TempDir,
}

impl CassandraNode {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut node = Self { process: Process::default(), cql_port: free_port(), storage_port: free_port(), dir };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let mut child = node_command(self.dir.path(), self.cql_port, self.storage_port)
            .spawn()
            .expect("cannot run java: run scripts/setup.sh");
        wait_serving(&mut child, self.cql_port, self.dir.path());
        self.process = Process(Some(child));
    }

    /// `host:port` of its CQL endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.cql_port)
    }

    /// What a client needs to reach [`Self::endpoint`] over TLS.
    pub fn client_tls(&self) -> tls::ClientFiles {
        client_files(self.dir.path())
    }

    /// SIGTERM and wait: the node keeps its data.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same ports with the same data.
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

/// Runs the node and stops it once `$stamp` is older than the idle limit
/// (tests touch it each time they ask for the node), or on SIGTERM.
const WATCHDOG: &str = r#"
stamp="$1"; idle="$2"; shift 2
"$@" &
node=$!
trap 'kill "$node" 2>/dev/null; wait "$node"; exit 0' TERM INT
while kill -0 "$node" 2>/dev/null; do
    if [ -z "$(find "$stamp" -mmin "-$idle" 2>/dev/null)" ]; then
        kill "$node"; wait "$node"; exit 0
    fi
    sleep 5 & wait $!
done
"#;

/// Where the shared node of this checkout lives: `target/cassandra-shared`
/// (`pid` is its watchdog's, which `scripts/test.sh` stops at the end).
pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/cassandra-shared")
}

/// `host:port` of the node shared by the whole test run, started on first
/// use; `MESSENGER_TEST_SCYLLA` names another (a real ScyllaDB) instead.
pub fn shared_node() -> String {
    if let Ok(node) = std::env::var("MESSENGER_TEST_SCYLLA") {
        return node;
    }
    let dir = shared_dir();
    fs::create_dir_all(&dir).expect("shared node directory");
    let lock = File::create(dir.join("lock")).expect("lock file");
    lock.lock().expect("lock the shared node");
    let stamp = dir.join("stamp");
    File::create(&stamp).and_then(|file| file.set_modified(SystemTime::now())).expect("stamp");
    if let Some(port) = fs::read_to_string(dir.join("port")).ok().and_then(|text| text.trim().parse::<u16>().ok())
        && alive(&dir)
        && TcpStream::connect(("127.0.0.1", port)).is_ok()
    {
        // Tests rely on what this checkout's cassandra.yaml sets up (TLS
        // beside plaintext, say): a node started from another one (an older
        // checkout's, idle for less than its limit) is replaced.
        if fs::read_to_string(dir.join("config")).is_ok_and(|config| config == YAML) {
            return format!("127.0.0.1:{port}");
        }
        eprintln!("the shared Cassandra node runs another cassandra.yaml; starting a new one");
        stop_shared(&dir, port);
    }
    let node_dir = dir.join("node");
    // The previous node's logs are kept (why did it stop?), its data not.
    let _ = fs::remove_dir_all(dir.join("previous-logs"));
    let _ = fs::rename(node_dir.join("logs"), dir.join("previous-logs"));
    let _ = fs::remove_dir_all(&node_dir);
    let (cql_port, storage_port) = (free_port(), free_port());
    let node = node_command(&node_dir, cql_port, storage_port);
    let mut watchdog = Command::new("sh");
    watchdog.arg("-c").arg(WATCHDOG).arg("cassandra-watchdog").arg(&stamp).arg(SHARED_IDLE_MINUTES.to_string());
    watchdog.arg(node.get_program()).args(node.get_args());
    let output = File::create(node_dir.join("logs/stdout.log")).expect("stdout log");
    watchdog.stdin(Stdio::null()).stdout(output.try_clone().expect("log handle")).stderr(output);
    // Its own process group: a test process ending (or nextest signalling
    // one) must not take the node down with it.
    watchdog.process_group(0);
    let mut child = watchdog.spawn().expect("cannot run sh");
    fs::write(dir.join("pid"), child.id().to_string()).expect("pid file");
    wait_serving(&mut child, cql_port, &node_dir);
    fs::write(dir.join("config"), YAML).expect("config file");
    fs::write(dir.join("port"), cql_port.to_string()).expect("port file");
    format!("127.0.0.1:{cql_port}")
}

/// The shared node ([`shared_node`]) and what a client needs to reach it
/// over TLS: the CA that signed its certificate (valid for `localhost` and
/// `127.0.0.1`, the address the driver checks) and a client certificate it
/// accepts. `None` when `MESSENGER_TEST_SCYLLA` names another node, whose
/// TLS is not known here.
pub fn shared_node_tls() -> Option<(String, tls::ClientFiles)> {
    if std::env::var_os("MESSENGER_TEST_SCYLLA").is_some() {
        return None;
    }
    let node = shared_node();
    Some((node, client_files(&shared_dir().join("node"))))
}

/// Stops the shared node serving on `port` (its watchdog stops the node on
/// SIGTERM) and waits until the port is closed: the node has exited.
fn stop_shared(dir: &Path, port: u16) {
    if let Ok(pid) = fs::read_to_string(dir.join("pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "the shared Cassandra node did not stop within {START_TIMEOUT:?}");
        thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_file(dir.join("port"));
}

fn alive(dir: &Path) -> bool {
    let Some(pid) = fs::read_to_string(dir.join("pid")).ok() else { return false };
    Command::new("kill").args(["-0", pid.trim()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}
