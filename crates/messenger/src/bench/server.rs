//! The system under test: a `messenger up` child process on loopback ports
//! (or a given target), and its CPU seconds and resident memory from /proc.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::BenchOptions;

pub struct Server {
    pub endpoint: String,
    /// The gateway's browser port (`host:port`), when known.
    pub web: Option<String>,
    /// The server's `/metrics` URL, when known.
    pub metrics: Option<String>,
    pub pid: Option<u32>,
    child: Option<Child>,
    /// The CQL node and the keyspace made for this server, dropped at its stop.
    keyspace: Option<(String, String)>,
    _data: Option<tempfile::TempDir>,
    clock_ticks: f64,
}

/// CPU time and memory of the server at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

impl Server {
    /// `tracing`: the sample ratio and the OTLP receiver its spans go to.
    pub async fn start(
        options: &BenchOptions,
        store: super::Store,
        tracing: Option<(f64, std::net::SocketAddr)>,
    ) -> anyhow::Result<Server> {
        let clock_ticks = clock_ticks();
        if let Some(target) = &options.target {
            return Ok(Server {
                endpoint: target.clone(),
                web: options.target_web.clone(),
                metrics: None,
                pid: options.server_pid,
                child: None,
                keyspace: None,
                _data: None,
                clock_ticks,
            });
        }
        let data = tempfile::tempdir()?;
        let executable = std::env::current_exe()?;
        let mut command = Command::new(executable);
        if let Some(url) = &options.redis_cache {
            command.env("MESSENGER_MESSAGE__CACHE__BACKEND", "redis").env("MESSENGER_MESSAGE__CACHE__REDIS__URL", url);
        }
        if let Some((ratio, receiver)) = tracing {
            command
                .env("MESSENGER_TRACING__OTLP_ENDPOINT", format!("http://{receiver}"))
                .env("MESSENGER_TRACING__SAMPLE_RATIO", ratio.to_string());
        }
        let mut made = None;
        if store == super::Store::Scylla {
            let node = options.scylla.as_deref().context("--stores scylla needs --scylla host:port")?;
            let keyspace = format!("bench_{}", messenger_platform::ids::new_id().simple());
            made = Some((node.to_owned(), keyspace.clone()));
            command
                .env("MESSENGER_MESSAGE__STORE", "scylla")
                .env("MESSENGER_SCYLLA__NODES", format!("[\"{node}\"]"))
                .env("MESSENGER_SCYLLA__KEYSPACE", keyspace)
                .env("MESSENGER_SCYLLA__MIGRATE_ON_START", "true")
                .env("MESSENGER_MEDIA__STORE", "scylla")
                .env("MESSENGER_NOTIFY__STORE", "scylla");
        }
        // Every client connects from this one address, and one user reads
        // history thousands of times: no per-user or per-address limit applies.
        for limit in [
            "READS",
            "MODIFICATIONS",
            "GROUP_CHANGES",
            "DIRECT_CONVERSATIONS",
            "BLOCKS",
            "QUERIES",
            "MEDIA",
            "PUSH_SETTINGS",
            "CONNECTS_PER_USER",
            "CONNECTS_PER_ADDRESS",
            "CALLS_PER_ADDRESS",
        ] {
            for field in ["PER_SECOND", "BURST"] {
                command.env(format!("MESSENGER_GATEWAY__RATE_LIMITS__{limit}__{field}"), "10000000");
            }
        }
        let mut child = command
            .arg("up")
            .arg("--data-dir")
            .arg(data.path())
            .env("MESSENGER_ADMIN__LISTEN", "127.0.0.1:0")
            // Every simulated client comes from loopback.
            .env("MESSENGER_SERVER__MAX_CONNECTIONS_PER_ADDRESS", "1000000")
            .env("MESSENGER_GATEWAY__LISTEN", "127.0.0.1:0")
            .env("MESSENGER_GATEWAY__INTERNAL_LISTEN", "127.0.0.1:0")
            .env("MESSENGER_GATEWAY__WEB__LISTEN", "127.0.0.1:0")
            .env("MESSENGER_MESSAGE__LISTEN", "127.0.0.1:0")
            .env("MESSENGER_PRESENCE__LISTEN", "127.0.0.1:0")
            .env("MESSENGER_MEDIA__LISTEN", "127.0.0.1:0")
            .env("MESSENGER_MEDIA__S3__EMBEDDED_LISTEN", "127.0.0.1:0")
            .env("MESSENGER_NOTIFY__LISTEN", "127.0.0.1:0")
            // Pushes leave at once, to the bench's webhook on loopback.
            .env("MESSENGER_NOTIFY__READ_GRACE", "0s")
            .env("MESSENGER_NOTIFY__PUSHES_PER_DEVICE_PER_MINUTE", "10000000")
            .env("MESSENGER_NOTIFY__EGRESS__ALLOW_HTTP", "true")
            .env("MESSENGER_NOTIFY__EGRESS__ALLOW_ADDRESSES", "[\"127.0.0.0/8\"]")
            // The benchmark measures capacity, not the per-user abuse limits.
            .env("MESSENGER_MEDIA__TICKETS_PER_MINUTE", "10000000")
            .env("MESSENGER_GATEWAY__SENDS_PER_SECOND", "10000000")
            .env("MESSENGER_GATEWAY__SEND_BURST", "10000000")
            .env("MESSENGER_GATEWAY__MAX_SESSIONS", "1000000")
            .env("MESSENGER_GATEWAY__RATE_LIMITS__MAX_PRE_HELLO_STREAMS_PER_ADDRESS", "1000000")
            .env("MESSENGER_MESSAGE__SQLITE__SYNCHRONOUS", &options.synchronous)
            .env("MESSENGER_LOG__FILTER", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `messenger up`")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("messenger is up: gateway ") {
                    return Ok(rest.split(',').next().unwrap_or_default().to_owned());
                }
            }
            bail!("`messenger up` exited before it was up")
        })
        .await
        .context("`messenger up` did not come up in 30 s")??;
        // The next lines name the browser port (`web app: http://host:port/ ...`)
        // and the admin port (`metrics: http://host:port/metrics ...`).
        let (mut web, mut metrics) = (None, None);
        for _ in 0..2 {
            let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await else {
                break;
            };
            if let Some(rest) = line.strip_prefix("web app: http://") {
                web = rest.split('/').next().map(str::to_owned);
            } else if let Some(rest) = line.strip_prefix("metrics: ") {
                metrics = rest.split_whitespace().next().map(str::to_owned);
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let pid = child.id();
        Ok(Server { endpoint, web, metrics, pid, child: Some(child), keyspace: made, _data: Some(data), clock_ticks })
    }

    /// The server's figures now (zeros when its pid is unknown).
    pub fn sample(&self) -> Sample {
        let Some(pid) = self.pid else { return Sample::default() };
        let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // Fields after the parenthesised command name; utime and stime are 14th and 15th.
                let after = stat.rsplit_once(')')?.1;
                let fields: Vec<&str> = after.split_whitespace().collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) / self.clock_ticks)
            })
            .unwrap_or_default();
        let rss_bytes = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or_default();
        Sample { cpu_seconds, rss_bytes }
    }

    /// The server's CQL requests so far, by `statement/mode`, from its
    /// `/metrics` (empty when it has no admin port or no CQL store).
    pub async fn statements(&self) -> BTreeMap<String, f64> {
        self.counter("messenger_message_scylla_statements_total", &["statement", "mode"]).await
    }

    /// The message service's cache reads so far, by `kind/result`
    /// (`member/hit`, `page/miss`, ...), from its `/metrics`.
    pub async fn cache_reads(&self) -> BTreeMap<String, f64> {
        self.counter("messenger_message_cache_reads_total", &["kind", "result"]).await
    }

    /// Counter `name` from the server's `/metrics`, summed by the values of
    /// `labels` joined with `/` (empty when it has no admin port).
    async fn counter(&self, name: &str, labels: &[&str]) -> BTreeMap<String, f64> {
        let mut counts = BTreeMap::new();
        let Some(url) = &self.metrics else { return counts };
        let Ok(response) = reqwest::get(url).await else { return counts };
        let Ok(text) = response.text().await else { return counts };
        let prefix = format!("{name}{{");
        for line in text.lines().filter(|line| line.starts_with(&prefix)) {
            let label = |name: &str| {
                let start = line.find(&format!("{name}=\""))? + name.len() + 2;
                line[start..].split('"').next()
            };
            let value = line.rsplit(' ').next().and_then(|value| value.parse::<f64>().ok());
            let values: Option<Vec<&str>> = labels.iter().map(|name| label(name)).collect();
            if let (Some(values), Some(value)) = (values, value) {
                *counts.entry(values.join("/")).or_default() += value;
            }
        }
        counts
    }

    /// Waits (at most 30 s) until the server is quiet: under 5% of a core
    /// over half a second, so one scenario's teardown doesn't count in the next.
    pub async fn settle(&self) {
        if self.pid.is_none() {
            return;
        }
        for _ in 0..60 {
            let before = self.sample();
            tokio::time::sleep(Duration::from_millis(500)).await;
            if (self.sample().cpu_seconds - before.cpu_seconds) / 0.5 < 0.05 {
                return;
            }
        }
    }

    pub async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill().await;
        }
        // A node that keeps every run's keyspace slows down run after run.
        if let Some((node, keyspace)) = self.keyspace.take() {
            let cluster = messenger_platform::cql::Cluster { nodes: vec![node], ..Default::default() };
            let dropped = match messenger_platform::cql::connect(&cluster).await {
                Ok(session) => session
                    .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
                    .await
                    .err()
                    .map(|e| e.to_string()),
                Err(error) => Some(error.to_string()),
            };
            if let Some(error) = dropped {
                eprintln!("bench: keyspace {keyspace} left on the node: {error}");
            }
        }
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}
