//! The message store's schema history (`messenger migrate`,
//! `migrate_on_start`); the versioned runner is `messenger_platform::cql::migrate`.
//!
//! Version 1 is `schema.cql`; a later change appends a version (ALTER /
//! CREATE statements) and never edits an applied one.

use messenger_platform::cql::{self, Cluster, MigrationReport, Schema};
use scylla::client::session::Session;

use super::schema_statements;
use crate::error::Result;

/// The messages' row in `schema_version`.
const COMPONENT: i32 = 0;

/// Every schema version's statements, oldest first.
pub(crate) fn versions(cluster: &Cluster) -> Vec<Vec<String>> {
    let keyspace = &cluster.keyspace;
    vec![
        schema_statements(cluster),
        // 2: attachments (already in version 1's CREATE TABLE for keyspaces created since).
        vec![format!("ALTER TABLE {keyspace}.messages ADD attachments text")],
        // 3: who blocked a user, for group deliveries. A secondary index: global
        // (a view keyed by blocked_id) on ScyllaDB, node-local on Cassandra,
        // built in the background over existing blocks.
        vec![format!("CREATE INDEX IF NOT EXISTS blocks_by_blocked ON {keyspace}.blocks (blocked_id)")],
        // 4: earlier memberships of a re-added member.
        vec![
            format!("ALTER TABLE {keyspace}.members ADD earlier map<bigint, bigint>"),
            format!("ALTER TABLE {keyspace}.user_conversations ADD earlier map<bigint, bigint>"),
        ],
    ]
}

/// Brings the keyspace's message tables to the newest version.
pub(super) async fn run(session: &Session, cluster: &Cluster) -> Result<MigrationReport> {
    let schema = Schema {
        component: COMPONENT,
        name: "messages",
        keyspace: cluster.keyspace.clone(),
        replication: cluster.replication(),
        versions: versions(cluster),
    };
    Ok(cql::migrate(session, &schema).await?)
}
