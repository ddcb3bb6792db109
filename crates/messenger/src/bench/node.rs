//! The CQL node's own limits (`--scenarios node`): single statements of the
//! shapes the Scylla store sends, through the store's driver and session
//! settings, one in flight per partition over `--pairs` partitions (the
//! direct scenario's concurrency), each for `--duration` after the node is
//! warmed up. The Scylla figures are read as ratios to these, measured on
//! the same node in the same run (nodes vary up to 2x).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::join_all;
use hdrhistogram::Histogram;
use scylla::{
    client::session::Session,
    statement::{
        batch::{Batch, BatchType},
        prepared::PreparedStatement,
    },
};
use serde::Serialize;

use super::BenchOptions;
use messenger_platform::cql::{self, Cluster, Lwt};

/// Rows one unlogged batch writes to its partition.
const BATCH_ROWS: i32 = 4;
/// Load before the first measured statement, so the node's JIT and caches
/// are past their cold start.
const WARM_UP: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct NodeLimits {
    pub node: String,
    pub partitions: usize,
    pub kinds: Vec<NodeKind>,
}

#[derive(Debug, Serialize)]
pub struct NodeKind {
    /// What ran: `lwt_update` (`UPDATE .. IF v = ?`), `insert_if_not_exists`,
    /// `serial_read`, `read`, `write`, `unlogged_batch` (of four rows).
    pub statement: &'static str,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failed: u64,
}

impl NodeLimits {
    pub fn table(&self) -> String {
        let mut out = format!(
            "\nnode limits  {} ({} partitions, one statement in flight each, the store's driver)\n",
            self.node, self.partitions
        );
        out += "  statement              per sec    p50 ms    p99 ms  failed\n";
        for kind in &self.kinds {
            out += &format!(
                "  {:<20}  {:>8.0}  {:>8.2}  {:>8.2}  {:>6}\n",
                kind.statement, kind.per_sec, kind.p50_ms, kind.p99_ms, kind.failed
            );
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Shape {
    LwtUpdate,
    InsertIfNotExists,
    SerialRead,
    Read,
    Write,
    UnloggedBatch,
}

impl Shape {
    const ALL: [Shape; 6] = [
        Shape::LwtUpdate,
        Shape::InsertIfNotExists,
        Shape::SerialRead,
        Shape::Read,
        Shape::Write,
        Shape::UnloggedBatch,
    ];

    fn name(self) -> &'static str {
        match self {
            Shape::LwtUpdate => "lwt_update",
            Shape::InsertIfNotExists => "insert_if_not_exists",
            Shape::SerialRead => "serial_read",
            Shape::Read => "read",
            Shape::Write => "write",
            Shape::UnloggedBatch => "unlogged_batch",
        }
    }
}

struct Statements {
    lwt_update: PreparedStatement,
    claim: PreparedStatement,
    serial_read: PreparedStatement,
    read: PreparedStatement,
    write: PreparedStatement,
}

pub async fn node(options: &BenchOptions) -> anyhow::Result<NodeLimits> {
    let node = options.scylla.clone().context("--scenarios node needs --scylla host:port")?;
    let keyspace = format!("bench_node_{}", messenger_platform::ids::new_id().simple());
    let cluster = Cluster { nodes: vec![node.clone()], keyspace: keyspace.clone(), ..Cluster::default() };
    let session = cql::connect(&cluster).await?;
    let replication = cluster.replication().to_cql();
    for text in [
        format!("CREATE KEYSPACE {keyspace} WITH replication = {replication}"),
        format!("CREATE TABLE {keyspace}.heads (p int PRIMARY KEY, v bigint)"),
        format!("CREATE TABLE {keyspace}.rows (p int, c bigint, v bigint, PRIMARY KEY ((p), c))"),
    ] {
        session.query_unpaged(text, ()).await.context("cannot create the node scenario's tables")?;
    }
    let prepare = |text: String| {
        let session = &session;
        async move { session.prepare(text).await.context("cannot prepare") }
    };
    let mut serial_read = prepare(format!("SELECT v FROM {keyspace}.heads WHERE p = ?")).await?;
    serial_read.set_consistency(cluster.serial_consistency.read());
    let statements = Statements {
        lwt_update: prepare(format!("UPDATE {keyspace}.heads SET v = ? WHERE p = ? IF v = ?")).await?,
        claim: prepare(format!("INSERT INTO {keyspace}.rows (p, c, v) VALUES (?, ?, ?) IF NOT EXISTS")).await?,
        serial_read,
        read: prepare(format!("SELECT v FROM {keyspace}.heads WHERE p = ?")).await?,
        write: prepare(format!("INSERT INTO {keyspace}.rows (p, c, v) VALUES (?, ?, ?)")).await?,
    };
    let partitions = options.pairs.max(1) as i32;
    for p in 0..partitions {
        session.execute_unpaged(&statements.write, (p, -1_i64, 0_i64)).await?;
        let insert = format!("INSERT INTO {keyspace}.heads (p, v) VALUES (?, 0)");
        session.query_unpaged(insert, (p,)).await?;
    }
    eprintln!("bench:   node: warming up for {WARM_UP:?}");
    run(&session, &statements, Shape::LwtUpdate, partitions, WARM_UP).await;
    let mut kinds = Vec::new();
    for shape in Shape::ALL {
        let kind = run(&session, &statements, shape, partitions, options.duration).await;
        eprintln!(
            "bench:   node: {} {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            kind.statement, kind.per_sec, kind.p50_ms, kind.p99_ms
        );
        kinds.push(kind);
    }
    let _ = session.query_unpaged(format!("DROP KEYSPACE {keyspace}"), ()).await;
    Ok(NodeLimits { node, partitions: partitions as usize, kinds })
}

/// One worker per partition, each with one statement in flight, for `duration`.
async fn run(
    session: &Session,
    statements: &Statements,
    shape: Shape,
    partitions: i32,
    duration: Duration,
) -> NodeKind {
    let started = Instant::now();
    let workers = (0..partitions).map(|p| worker(session, statements, shape, p, started + duration));
    let results = join_all(workers).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
    let (mut done, mut failed) = (0u64, 0u64);
    for (histogram, count, errors) in results {
        latencies.add(histogram).expect("same bounds");
        done += count;
        failed += errors;
    }
    let millis = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    NodeKind {
        statement: shape.name(),
        per_sec: done as f64 / elapsed,
        p50_ms: millis(0.5),
        p99_ms: millis(0.99),
        failed,
    }
}

async fn worker(
    session: &Session,
    statements: &Statements,
    shape: Shape,
    p: i32,
    until: Instant,
) -> (Histogram<u64>, u64, u64) {
    let mut latencies = Histogram::<u64>::new(3).expect("a histogram");
    let (mut done, mut failed) = (0u64, 0u64);
    let mut version: i64 = -1;
    let mut next: i64 = 0;
    let mut batch = Batch::new(BatchType::Unlogged);
    for _ in 0..BATCH_ROWS {
        batch.append_statement(statements.write.clone());
    }
    while Instant::now() < until {
        next += 1;
        // Every worker has its own key space in `rows`: (p, c) never repeats.
        let key = next + (i64::from(p) << 40);
        let start = Instant::now();
        let ok = match shape {
            Shape::LwtUpdate => {
                if version < 0 {
                    version = read_version(session, statements, p).await.unwrap_or(0);
                }
                match session.execute_unpaged(&statements.lwt_update, (version + 1, p, version)).await {
                    Ok(result) => match Lwt::from_result(result) {
                        Ok(lwt) if lwt.applied => {
                            version += 1;
                            true
                        }
                        // Nobody else writes this partition: only after an unknown outcome.
                        _ => {
                            version = -1;
                            false
                        }
                    },
                    Err(_) => {
                        version = -1;
                        false
                    }
                }
            }
            Shape::InsertIfNotExists => {
                let result = session.execute_unpaged(&statements.claim, (p, key, key)).await;
                result.ok().and_then(|result| Lwt::from_result(result).ok()).is_some_and(|lwt| lwt.applied)
            }
            Shape::SerialRead => session.execute_unpaged(&statements.serial_read, (p,)).await.is_ok(),
            Shape::Read => session.execute_unpaged(&statements.read, (p,)).await.is_ok(),
            Shape::Write => session.execute_unpaged(&statements.write, (p, key, key)).await.is_ok(),
            Shape::UnloggedBatch => {
                let values: Vec<(i32, i64, i64)> =
                    (0..i64::from(BATCH_ROWS)).map(|row| (p, key * 8 + row, key)).collect();
                session.batch(&batch, values).await.is_ok()
            }
        };
        if ok {
            done += 1;
            let _ = latencies.record(start.elapsed().as_micros() as u64);
        } else {
            failed += 1;
        }
    }
    (latencies, done, failed)
}

async fn read_version(session: &Session, statements: &Statements, p: i32) -> Option<i64> {
    let result = session.execute_unpaged(&statements.serial_read, (p,)).await.ok()?;
    let rows: Vec<(Option<i64>,)> = cql::rows(result).ok()?;
    rows.first().and_then(|(v,)| *v)
}
