//! Checks that need no server (every statement against the schema text,
//! options, bucket arithmetic) and the contract suite against a real CQL
//! node: the suite's shared Cassandra node, or the ScyllaDB cluster
//! `MESSENGER_TEST_SCYLLA` names.
//!
//! The CQL checks use a small parser written here: the CQL parser crates on
//! crates.io either lack DELETE/BATCH support (`cqlparser` 0.1) or build a
//! tree-sitter grammar in C (`cql3-parser`), and none knows Scylla's
//! `USING TIMESTAMP`/`IF ... = null` forms we use. The parser understands
//! exactly the subset `schema.cql` and `statements.rs` use and fails loudly
//! on anything else.

use std::collections::{BTreeMap, HashMap};

use super::{
    Cluster, Replication, SCHEMA, ScyllaOptions,
    rows::{bucket, chunks, spans},
    schema_statements,
    statements::{Mode, STATEMENTS},
    valid_identifier,
};

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Marker,
    Literal(String),
    Symbol(String),
}

fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '?' {
            tokens.push(Token::Marker);
            i += 1;
        } else if c == '\'' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            tokens.push(Token::Literal(chars[start..i.min(chars.len())].iter().collect()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            tokens.push(Token::Literal(chars[start..i].iter().collect()));
        } else if c.is_ascii_alphabetic()
            || c == '_'
            || (c == '{' && chars.get(i + 1).is_some_and(|n| n.is_ascii_alphabetic()))
        {
            // `{keyspace}` reads as one word.
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '}') {
                i += 1;
            }
            tokens.push(Token::Word(chars[start..i].iter().collect::<String>().to_lowercase()));
        } else if c == '[' {
            // `[applied]`-style names do not occur in statements; keep brackets as symbols.
            tokens.push(Token::Symbol(c.to_string()));
            i += 1;
        } else if matches!(c, '<' | '>') && chars.get(i + 1) == Some(&'=') {
            tokens.push(Token::Symbol(format!("{c}=")));
            i += 2;
        } else {
            tokens.push(Token::Symbol(c.to_string()));
            i += 1;
        }
    }
    tokens
}

#[derive(Debug, Default)]
struct Table {
    columns: BTreeMap<String, String>,
    partition_key: Vec<String>,
    clustering: Vec<String>,
    statics: Vec<String>,
    /// Columns with a secondary index: a SELECT may restrict one alone with `=`.
    indexed: Vec<String>,
}

impl Table {
    fn is_key(&self, column: &str) -> bool {
        self.partition_key.iter().chain(&self.clustering).any(|c| c == column)
    }
}

/// A cursor over tokens with the few helpers the parsers need.
struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn new(text: &str) -> Self {
        Parser { tokens: tokenize(text), at: 0 }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Token {
        let token = self.tokens.get(self.at).cloned().unwrap_or_else(|| panic!("unexpected end of statement"));
        self.at += 1;
        token
    }

    fn word(&mut self) -> String {
        match self.next() {
            Token::Word(word) => word,
            other => panic!("expected a word, found {other:?}"),
        }
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w == word)
    }

    fn is_symbol(&self, symbol: &str) -> bool {
        matches!(self.peek(), Some(Token::Symbol(s)) if s == symbol)
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.is_word(word);
        if found {
            self.at += 1;
        }
        found
    }

    fn eat_symbol(&mut self, symbol: &str) -> bool {
        let found = self.is_symbol(symbol);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect_word(&mut self, word: &str) {
        assert!(self.eat_word(word), "expected {word:?} at {:?}", self.peek());
    }

    fn expect_symbol(&mut self, symbol: &str) {
        assert!(self.eat_symbol(symbol), "expected {symbol:?} at {:?}", self.peek());
    }

    /// `{keyspace}.name`: every table is qualified by the placeholder.
    fn table_name(&mut self) -> String {
        assert_eq!(self.word(), "{keyspace}", "tables must be qualified with {{keyspace}}");
        self.expect_symbol(".");
        self.word()
    }

    fn names_in_parens(&mut self) -> Vec<String> {
        self.expect_symbol("(");
        let mut names = vec![self.word()];
        while self.eat_symbol(",") {
            names.push(self.word());
        }
        self.expect_symbol(")");
        names
    }

    fn done(&self) -> bool {
        self.at >= self.tokens.len()
    }
}

fn parse_schema(text: &str) -> HashMap<String, Table> {
    let mut tables = HashMap::new();
    // Comments first: a `;` inside one must not split a statement.
    let code: Vec<&str> = text.lines().map(|line| line.split_once("--").map_or(line, |(code, _)| code)).collect();
    let code = code.join("\n").replace("{replication}", "{'class': 'SimpleStrategy', 'replication_factor': 1}");
    for statement in code.split(';').map(str::trim).filter(|s| !tokenize(s).is_empty()) {
        let mut p = Parser::new(statement);
        p.expect_word("create");
        if p.eat_word("keyspace") {
            continue;
        }
        if p.eat_word("index") {
            for word in ["if", "not", "exists"] {
                p.expect_word(word);
            }
            p.word();
            p.expect_word("on");
            let name = p.table_name();
            let table: &mut Table = tables.get_mut(&name).unwrap_or_else(|| panic!("index on {name} before its table"));
            for column in p.names_in_parens() {
                assert!(table.columns.contains_key(&column), "{name}: indexed column {column} is not declared");
                table.indexed.push(column);
            }
            continue;
        }
        p.expect_word("table");
        p.expect_word("if");
        p.expect_word("not");
        p.expect_word("exists");
        let name = p.table_name();
        let mut table = Table::default();
        p.expect_symbol("(");
        loop {
            if p.eat_word("primary") {
                p.expect_word("key");
                p.expect_symbol("(");
                table.partition_key = if p.is_symbol("(") { p.names_in_parens() } else { vec![p.word()] };
                while p.eat_symbol(",") {
                    table.clustering.push(p.word());
                }
                p.expect_symbol(")");
            } else {
                let column = p.word();
                let mut kind = String::new();
                let mut depth = 0;
                while depth > 0 || !(p.is_symbol(",") || p.is_symbol(")") || p.is_word("static")) {
                    match p.next() {
                        Token::Word(w) => kind.push_str(&w),
                        Token::Symbol(s) => {
                            depth += i32::from(s == "<") - i32::from(s == ">");
                            kind.push_str(&s);
                        }
                        other => panic!("unexpected {other:?} in the type of {column}"),
                    }
                }
                if p.eat_word("static") {
                    table.statics.push(column.clone());
                }
                assert!(table.columns.insert(column.clone(), kind).is_none(), "{name}.{column} declared twice");
            }
            if !p.eat_symbol(",") {
                break;
            }
        }
        p.expect_symbol(")");
        for key in table.partition_key.iter().chain(&table.clustering) {
            assert!(table.columns.contains_key(key), "{name}: key column {key} is not declared");
        }
        assert!(!table.partition_key.is_empty(), "{name} has no partition key");
        for column in &table.statics {
            assert!(!table.clustering.is_empty(), "{name}.{column}: static column in a table without clustering");
            assert!(!table.is_key(column), "{name}.{column}: a key column cannot be static");
        }
        tables.insert(name, table);
    }
    tables
}

/// One `column op value` restriction.
#[derive(Debug)]
struct Restriction {
    column: String,
    operator: String,
}

/// What a statement touches.
#[derive(Debug, Default)]
struct Parsed {
    verb: String,
    table: String,
    /// Selected, inserted, set or deleted columns.
    columns: Vec<String>,
    /// Columns appearing on the right side of a SET (`c = c + ?`).
    collection_updates: Vec<String>,
    restrictions: Vec<Restriction>,
    conditions: Vec<String>,
    order_by: Vec<String>,
    using_timestamp: bool,
    if_not_exists: bool,
    if_exists: bool,
    inserted_values: usize,
}

fn value(p: &mut Parser, what: &str) {
    match p.next() {
        Token::Marker => {}
        Token::Word(w) if w == "null" => {}
        // Reported by `check` as a literal value.
        Token::Literal(_) => {}
        other => panic!("{what}: only bind markers (or null) may stand for values, found {other:?}"),
    }
}

fn restrictions(p: &mut Parser, parsed: &mut Parsed) {
    loop {
        let column = p.word();
        let operator = match p.next() {
            Token::Symbol(s) if ["=", "<", ">", "<=", ">="].contains(&s.as_str()) => s,
            Token::Word(w) if w == "in" => "in".to_owned(),
            other => panic!("unexpected operator {other:?} after {column}"),
        };
        if operator == "in" {
            p.expect_symbol("(");
            value(p, &column);
            while p.eat_symbol(",") {
                value(p, &column);
            }
            p.expect_symbol(")");
        } else {
            value(p, &column);
        }
        parsed.restrictions.push(Restriction { column, operator });
        if !p.eat_word("and") {
            break;
        }
    }
}

fn using(p: &mut Parser, parsed: &mut Parsed) {
    if p.eat_word("using") {
        loop {
            match p.word().as_str() {
                "ttl" => {}
                "timestamp" => parsed.using_timestamp = true,
                other => panic!("unknown USING {other}"),
            }
            value(p, "using");
            if !p.eat_word("and") {
                break;
            }
        }
    }
}

fn conditions(p: &mut Parser, parsed: &mut Parsed) {
    if !p.eat_word("if") {
        return;
    }
    if p.eat_word("not") {
        p.expect_word("exists");
        parsed.if_not_exists = true;
        return;
    }
    if p.eat_word("exists") {
        parsed.if_exists = true;
        return;
    }
    loop {
        let column = p.word();
        p.expect_symbol("=");
        value(p, "condition");
        parsed.conditions.push(column);
        if !p.eat_word("and") {
            break;
        }
    }
}

fn parse_statement(text: &str) -> Parsed {
    let mut p = Parser::new(text);
    let mut parsed = Parsed { verb: p.word(), ..Parsed::default() };
    match parsed.verb.as_str() {
        "select" => {
            parsed.columns.push(p.word());
            while p.eat_symbol(",") {
                parsed.columns.push(p.word());
            }
            p.expect_word("from");
            parsed.table = p.table_name();
            if p.eat_word("where") {
                restrictions(&mut p, &mut parsed);
            }
            if p.eat_word("order") {
                p.expect_word("by");
                loop {
                    parsed.order_by.push(p.word());
                    assert!(p.eat_word("asc") || p.eat_word("desc"), "ORDER BY needs a direction");
                    if !p.eat_symbol(",") {
                        break;
                    }
                }
            }
            if p.eat_word("limit") {
                value(&mut p, "limit");
            }
            if p.is_word("if") {
                panic!("a SELECT cannot carry a condition");
            }
        }
        "insert" => {
            p.expect_word("into");
            parsed.table = p.table_name();
            parsed.columns = p.names_in_parens();
            p.expect_word("values");
            p.expect_symbol("(");
            loop {
                value(&mut p, "values");
                parsed.inserted_values += 1;
                if !p.eat_symbol(",") {
                    break;
                }
            }
            p.expect_symbol(")");
            conditions(&mut p, &mut parsed);
            using(&mut p, &mut parsed);
        }
        "update" => {
            parsed.table = p.table_name();
            using(&mut p, &mut parsed);
            p.expect_word("set");
            loop {
                let column = p.word();
                p.expect_symbol("=");
                if p.is_word(&column) {
                    // `c = c + ?`: a collection update.
                    p.word();
                    assert!(p.eat_symbol("+") || p.eat_symbol("-"), "{column}: expected + or -");
                    parsed.collection_updates.push(column.clone());
                }
                value(&mut p, &column);
                parsed.columns.push(column);
                if !p.eat_symbol(",") {
                    break;
                }
            }
            p.expect_word("where");
            restrictions(&mut p, &mut parsed);
            conditions(&mut p, &mut parsed);
        }
        "delete" => {
            while !p.is_word("from") {
                parsed.columns.push(p.word());
                p.eat_symbol(",");
            }
            p.expect_word("from");
            parsed.table = p.table_name();
            using(&mut p, &mut parsed);
            p.expect_word("where");
            restrictions(&mut p, &mut parsed);
            conditions(&mut p, &mut parsed);
        }
        other => panic!("unsupported statement {other}"),
    }
    assert!(p.done(), "trailing tokens from {:?}", p.peek());
    parsed
}

/// Checks one statement against the schema; returns what is wrong.
fn check(tables: &HashMap<String, Table>, name: &str, mode: Mode, text: &str, binds: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let markers = tokenize(text).iter().filter(|t| **t == Token::Marker).count();
    if markers != binds {
        problems.push(format!("{markers} bind markers, but the code binds {binds} values"));
    }
    if let Some(literal) = tokenize(text).iter().find(|t| matches!(t, Token::Literal(_))) {
        problems.push(format!("literal value {literal:?}"));
    }
    let parsed = parse_statement(text);
    let Some(table) = tables.get(&parsed.table) else {
        return vec![format!("table {} is not in schema.cql", parsed.table)];
    };
    let known = |column: &String| table.columns.contains_key(column);
    let referenced = parsed
        .columns
        .iter()
        .chain(parsed.restrictions.iter().map(|r| &r.column))
        .chain(&parsed.conditions)
        .chain(&parsed.order_by);
    for column in referenced {
        if !known(column) {
            problems.push(format!("column {}.{column} does not exist", parsed.table));
        }
    }
    let restricted = |column: &String| parsed.restrictions.iter().filter(|r| &r.column == column).collect::<Vec<_>>();
    let select = parsed.verb == "select";
    let by_index = select
        && matches!(parsed.restrictions.as_slice(), [only] if only.operator == "=" && table.indexed.contains(&only.column));
    if by_index {
        // One indexed column, alone: the index finds the partitions.
    } else if parsed.verb != "insert" {
        for key in &table.partition_key {
            let on_key = restricted(key);
            if on_key.is_empty() || on_key.iter().any(|r| r.operator != "=" && r.operator != "in") {
                problems.push(format!("partition key column {key} must be restricted with = or IN"));
            }
        }
        for restriction in &parsed.restrictions {
            if !table.is_key(&restriction.column) {
                problems.push(format!("WHERE on non-key column {} (needs ALLOW FILTERING)", restriction.column));
            }
        }
        // Clustering restrictions: a prefix, equalities before the one range.
        let mut range_seen = false;
        let mut gap = false;
        for column in &table.clustering {
            let on_column = restricted(column);
            if on_column.is_empty() {
                gap = true;
                continue;
            }
            if gap || range_seen {
                problems.push(format!("clustering column {column} restricted after an unrestricted or ranged one"));
            }
            if on_column.iter().any(|r| r.operator != "=" && r.operator != "in") {
                range_seen = true;
            }
        }
        let full_key = table.clustering.iter().all(|c| restricted(c).iter().any(|r| r.operator == "="));
        if parsed.verb == "update" && !full_key {
            problems.push("UPDATE must name the full primary key".into());
        }
        if parsed.verb == "delete" && !parsed.columns.is_empty() && !full_key {
            problems.push("deleting columns needs the full primary key".into());
        }
    } else {
        if parsed.columns.len() != parsed.inserted_values {
            problems.push(format!("{} columns but {} values", parsed.columns.len(), parsed.inserted_values));
        }
        for key in table.partition_key.iter().chain(&table.clustering) {
            if !parsed.columns.contains(key) {
                problems.push(format!("INSERT misses key column {key}"));
            }
        }
    }
    if matches!(parsed.verb.as_str(), "update" | "delete") || parsed.verb == "insert" {
        for column in &parsed.columns {
            if parsed.verb != "insert" && table.is_key(column) {
                problems.push(format!("{} cannot set or delete key column {column}", parsed.verb));
            }
        }
    }
    for column in &parsed.collection_updates {
        let kind = table.columns.get(column).map(String::as_str).unwrap_or("");
        if !(kind.starts_with("set<") || kind.starts_with("list<") || kind.starts_with("map<")) {
            problems.push(format!("{column} is updated as a collection but is {kind}"));
        }
    }
    for column in &parsed.conditions {
        if table.is_key(column) {
            problems.push(format!("condition on key column {column}"));
        }
    }
    for column in &parsed.order_by {
        if !table.clustering.contains(column) {
            problems.push(format!("ORDER BY on non-clustering column {column}"));
        }
    }
    let conditional = parsed.if_not_exists || parsed.if_exists || !parsed.conditions.is_empty();
    if conditional && parsed.using_timestamp {
        problems.push("a conditional statement cannot use USING TIMESTAMP".into());
    }
    match mode {
        Mode::Read | Mode::SerialRead if !select => problems.push("declared as a read but writes".into()),
        Mode::Write | Mode::Lwt if select => problems.push("declared as a write but reads".into()),
        Mode::Lwt if !conditional => problems.push("declared as an LWT but has no IF".into()),
        Mode::Write if conditional => problems.push("has IF but is not declared as an LWT".into()),
        _ => {}
    }
    problems.into_iter().map(|problem| format!("{name}: {problem}")).collect()
}

#[test]
fn every_statement_matches_the_schema() {
    let tables = parse_schema(SCHEMA);
    assert_eq!(tables.len(), 9, "{:?}", tables.keys().collect::<Vec<_>>());
    let problems: Vec<String> = STATEMENTS
        .iter()
        .flat_map(|statement| check(&tables, statement.name, statement.mode, statement.text, statement.binds))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut names: Vec<&str> = STATEMENTS.iter().map(|s| s.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), STATEMENTS.len(), "statement names are unique");
    eprintln!("{} statements checked against {} tables", STATEMENTS.len(), tables.len());
}

#[test]
fn the_checker_catches_mistakes() {
    let tables = parse_schema(SCHEMA);
    let wrong = [
        ("SELECT nope FROM {keyspace}.members WHERE conversation_id = ?", Mode::Read, 1),
        ("SELECT role FROM {keyspace}.members WHERE user_id = ?", Mode::Read, 1),
        ("SELECT user_id FROM {keyspace}.blocks WHERE blocked_id = ? AND blocked_at_ms = ?", Mode::Read, 2),
        ("SELECT role FROM {keyspace}.members WHERE conversation_id = ? AND role = ?", Mode::Read, 2),
        ("SELECT role FROM {keyspace}.members WHERE conversation_id = ?", Mode::Read, 2),
        ("UPDATE {keyspace}.members SET role = ? WHERE conversation_id = ?", Mode::Write, 2),
        (
            "UPDATE {keyspace}.members SET role = ? WHERE conversation_id = ? AND user_id = ? IF role = ?",
            Mode::Write,
            4,
        ),
        ("UPDATE {keyspace}.members SET role = 3 WHERE conversation_id = ? AND user_id = ?", Mode::Write, 2),
        ("INSERT INTO {keyspace}.members (conversation_id, role) VALUES (?, ?)", Mode::Write, 2),
        (
            "SELECT seq FROM {keyspace}.messages WHERE conversation_id = ? AND bucket = ? ORDER BY body ASC",
            Mode::Read,
            2,
        ),
        (
            "UPDATE {keyspace}.conversations USING TIMESTAMP ? SET last_seq = ? WHERE conversation_id = ? IF last_seq = ?",
            Mode::Lwt,
            4,
        ),
        (
            "UPDATE {keyspace}.messages SET body = body + ? WHERE conversation_id = ? AND bucket = ? AND seq = ?",
            Mode::Write,
            4,
        ),
        (
            "SELECT delivered_seq FROM {keyspace}.device_cursors WHERE user_id = ? AND conversation_id = ?",
            Mode::Read,
            2,
        ),
        ("SELECT kind FROM {keyspace}.nowhere WHERE conversation_id = ?", Mode::Read, 1),
    ];
    for (text, mode, binds) in wrong {
        assert!(!check(&tables, "wrong", mode, text, binds).is_empty(), "not caught: {text}");
    }
}

#[test]
fn schema_substitutes_keyspace_and_replication() {
    let mut cluster = Cluster { keyspace: "chat_test".into(), ..Cluster::default() };
    cluster.replication = Some(Replication::NetworkTopologyStrategy {
        datacenters: BTreeMap::from([("dc-1".into(), 3), ("dc2".into(), 3)]),
    });
    let statements = schema_statements(&cluster);
    assert_eq!(statements.len(), 11);
    assert!(statements[0].contains("{'class': 'NetworkTopologyStrategy', 'dc-1': 3, 'dc2': 3}"), "{}", statements[0]);
    assert!(statements.iter().all(|s| !s.contains('{') || s.starts_with("CREATE KEYSPACE")));
    assert!(statements[1..].iter().all(|s| s.contains("chat_test.")));
}

#[test]
fn options_are_validated() {
    let cluster = Cluster::default();
    assert!(cluster.validate().is_ok() && ScyllaOptions::default().validate(&cluster).is_ok());
    let bad_clusters = [
        Cluster { nodes: Vec::new(), ..Cluster::default() },
        Cluster { nodes: vec![" ".into()], ..Cluster::default() },
        Cluster { keyspace: "Messenger".into(), ..Cluster::default() },
        Cluster { keyspace: "1messenger".into(), ..Cluster::default() },
        Cluster { keyspace: "a;drop".into(), ..Cluster::default() },
        Cluster { keyspace: "a".repeat(49), ..Cluster::default() },
        Cluster { replication: Some(Replication::SimpleStrategy { factor: 0 }), ..Cluster::default() },
        Cluster {
            replication: Some(Replication::NetworkTopologyStrategy { datacenters: BTreeMap::new() }),
            ..Cluster::default()
        },
        Cluster {
            replication: Some(Replication::NetworkTopologyStrategy {
                datacenters: BTreeMap::from([("dc'1".into(), 3)]),
            }),
            ..Cluster::default()
        },
        Cluster { local_datacenter: Some("dc 1".into()), ..Cluster::default() },
        Cluster { username: Some("u".into()), ..Cluster::default() },
        Cluster { request_timeout: std::time::Duration::ZERO, ..Cluster::default() },
        // A client certificate without the CA that turns TLS on.
        Cluster {
            tls: messenger_platform::tls::BackendTls {
                cert_file: Some("client.pem".into()),
                key_file: Some("client-key.pem".into()),
                ..Default::default()
            },
            ..Cluster::default()
        },
    ];
    for cluster in bad_clusters {
        assert!(cluster.validate().is_err(), "accepted {cluster:?}");
    }
    let bad = [
        ScyllaOptions { lwt_max_retries: 0, ..ScyllaOptions::default() },
        ScyllaOptions { max_reservation: 0, ..ScyllaOptions::default() },
        ScyllaOptions { max_reservation: 5000, ..ScyllaOptions::default() },
        ScyllaOptions { dedupe_ttl: std::time::Duration::ZERO, ..ScyllaOptions::default() },
        ScyllaOptions { dedupe_ttl: std::time::Duration::from_secs(700_000_000), ..ScyllaOptions::default() },
        ScyllaOptions { batch_max_bytes: 1023, ..ScyllaOptions::default() },
    ];
    for options in bad {
        assert!(options.validate(&cluster).is_err(), "accepted {options:?}");
    }
    // Row writes of three 3 s attempts do not fit half of 17 s.
    let slow = Cluster { request_timeout: std::time::Duration::from_secs(3), ..Cluster::default() };
    let short = ScyllaOptions { lock_timeout: std::time::Duration::from_millis(17_999), ..ScyllaOptions::default() };
    assert!(short.validate(&slow).unwrap_err().contains("scylla.request_timeout"));
    let edge = ScyllaOptions {
        lock_timeout: std::time::Duration::from_secs(18),
        batch_max_bytes: 1024,
        ..ScyllaOptions::default()
    };
    assert!(edge.validate(&slow).is_ok(), "the edges themselves are accepted");
    assert!(valid_identifier("_a1") && valid_identifier(&"a".repeat(48)) && !valid_identifier(""));
}

#[test]
fn options_read_from_toml() {
    let options: Cluster = toml::from_str(
        r#"
        nodes = ["10.0.0.1:9042", "10.0.0.2:9042"]
        local_datacenter = "dc1"
        consistency = "LOCAL_QUORUM"
        serial_consistency = "SERIAL"
        request_timeout = "500ms"
        [replication]
        strategy = "NetworkTopologyStrategy"
        datacenters = { dc1 = 3, dc2 = 3 }
        "#,
    )
    .unwrap();
    assert_eq!(options.request_timeout, std::time::Duration::from_millis(500));
    assert_eq!(options.keyspace, "messenger");
    assert!(options.validate().is_ok());
    assert!(toml::from_str::<Cluster>("unknown = 1").is_err());
    assert!(toml::from_str::<ScyllaOptions>("nodes = []").is_err(), "cluster keys live in [scylla]");
}

#[test]
fn buckets_split_ranges_at_4096() {
    assert_eq!((bucket(0), bucket(4095), bucket(4096), bucket(8191), bucket(8192)), (0, 0, 1, 1, 2));
    assert_eq!(spans(4090, 4100, false), vec![(0, 4090, 4095), (1, 4096, 4100)]);
    assert_eq!(spans(4090, 4100, true), vec![(1, 4096, 4100), (0, 4090, 4095)]);
    assert_eq!(spans(1, 10_000, false), vec![(0, 1, 4095), (1, 4096, 8191), (2, 8192, 10_000)]);
    assert_eq!(spans(4096, 4096, true), vec![(1, 4096, 4096)]);
    assert!(spans(11, 10, false).is_empty());
}

#[test]
fn reserved_ranges_split_by_bucket_rows_and_bytes() {
    let seqs: Vec<u64> = (4094..=4099).collect();
    let split = chunks(seqs.clone(), |s| *s, |_| 10, 64, 1024);
    assert_eq!(split, vec![vec![4094, 4095], vec![4096, 4097, 4098, 4099]]);
    let split = chunks(seqs.clone(), |s| *s, |_| 10, 3, 1024);
    assert_eq!(split, vec![vec![4094, 4095], vec![4096, 4097, 4098], vec![4099]]);
    // An item larger than the byte budget still goes, alone.
    let split = chunks(seqs, |s| *s, |s| if *s == 4097 { 5000 } else { 10 }, 64, 1024);
    assert_eq!(split, vec![vec![4094, 4095], vec![4096], vec![4097], vec![4098, 4099]]);
    assert!(chunks(Vec::<u64>::new(), |s| *s, |_| 1, 1, 1).is_empty());
}

/// A fresh keyspace on the suite's shared node, and the default send limits.
pub(crate) fn test_options() -> (Cluster, ScyllaOptions) {
    let node = messenger_testkit::shared_cassandra();
    let keyspace = format!("messenger_test_{}", uuid::Uuid::now_v7().simple());
    let cluster = Cluster {
        nodes: vec![node],
        keyspace: keyspace[..48.min(keyspace.len())].to_owned(),
        migrate_on_start: true,
        ..Cluster::default()
    };
    (cluster, ScyllaOptions::default())
}

#[tokio::test]
async fn scylla_passes_the_contract_suite() {
    let (cluster, options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let cases = crate::store::contract::run_all(&store).await;
    eprintln!("message store contract: {cases} cases passed on {} (keyspace {})", cluster.nodes[0], cluster.keyspace);
    drop_keyspace(&store, &cluster).await;
}

/// CQL over TLS to the shared node, whose native port takes TLS beside
/// plaintext and wants a client certificate on TLS connections: a query goes
/// through with the node's CA trusted, the certificate checked for the node's
/// IP address (what the driver connects to) or for `tls.server_name`. A
/// client trusting another CA, or expecting a name the certificate does not
/// carry, is refused: the session really is TLS, and verified (plaintext
/// would have let both through).
#[tokio::test]
async fn cql_over_tls_verifies_the_node_certificate() {
    use messenger_platform::{cql, tls::BackendTls};
    let Some((node, files)) = tokio::task::spawn_blocking(messenger_testkit::shared_cassandra_tls).await.unwrap()
    else {
        eprintln!("skipped: MESSENGER_TEST_SCYLLA names a node whose TLS files are not known here");
        return;
    };
    let trusting = |ca_file: &std::path::Path, server_name: Option<&str>| Cluster {
        nodes: vec![node.clone()],
        connect_timeout: std::time::Duration::from_secs(10),
        tls: BackendTls {
            ca_file: Some(ca_file.to_owned()),
            cert_file: Some(files.cert.clone()),
            key_file: Some(files.key.clone()),
            server_name: server_name.map(str::to_owned),
        },
        ..Cluster::default()
    };
    for server_name in [None, Some("localhost")] {
        let options = trusting(&files.ca_file, server_name);
        options.validate().unwrap();
        let session = cql::connect(&options).await.unwrap();
        let answer = session.query_unpaged("SELECT release_version FROM system.local", ()).await.unwrap();
        let versions: Vec<(String,)> = cql::rows(answer).unwrap();
        assert_eq!(versions.len(), 1, "server_name {server_name:?}");
    }
    let other_dir = tempfile::tempdir().unwrap();
    let other = messenger_testkit::tls::TestCa::new(other_dir.path(), "other");
    for (what, options) in [
        ("another CA", trusting(other.ca_file(), None)),
        ("a name the certificate lacks", trusting(&files.ca_file, Some("elsewhere.test"))),
    ] {
        let refused = cql::connect(&options).await;
        assert!(refused.is_err(), "a client expecting {what} connected");
    }
}

/// Drops a test's keyspace: hundreds left behind would fill the node's heap.
async fn drop_keyspace(store: &super::ScyllaStore, cluster: &Cluster) {
    let mut drop = ::scylla::statement::unprepared::Statement::new(format!("DROP KEYSPACE {}", cluster.keyspace));
    drop.set_request_timeout(Some(std::time::Duration::from_secs(60)));
    store.inner.session.query_unpaged(drop, &[]).await.unwrap();
}

#[test]
fn forward_reads_stop_at_gaps_that_may_still_fill() {
    use super::reads::readable_prefix;
    let row = |seq: u64, sent_at_ms: i64| {
        let mut message =
            crate::store::StoredMessage::event(uuid::Uuid::nil(), "a", crate::store::Kind::Text, sent_at_ms);
        message.seq = seq;
        message
    };
    let settled = 1_000;
    // Contiguous: everything.
    assert_eq!(readable_prefix(&[row(5, 2_000), row(6, 2_000)], 5, settled), 2);
    // Seq 7 missing and 8 is recent: 7 may still land, stop before 8.
    assert_eq!(readable_prefix(&[row(5, 2_000), row(6, 2_000), row(8, 2_000)], 5, settled), 2);
    // The same gap behind an old row: lost for good, skipped.
    assert_eq!(readable_prefix(&[row(5, 500), row(6, 500), row(8, 900)], 5, settled), 3);
    // A gap before the first row counts too.
    assert_eq!(readable_prefix(&[row(7, 2_000)], 5, settled), 0);
}

/// A burst of sends to one conversation is written in logged batches kept
/// under Cassandra's default 50 KiB `batch_size_fail_threshold` (the node
/// runs with the defaults): each send commits, seqs dense. Before
/// `batch_max_bytes`, batches of 64 KiB of bodies were refused (INTERNAL).
#[tokio::test]
async fn a_burst_of_large_sends_stays_under_the_batch_size_threshold() {
    let (cluster, options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let (a, b) = ("burst-a", "burst-b");
    let conversation =
        crate::store::MessageStore::get_or_create_direct(&store, a, b, uuid::Uuid::now_v7(), 0).await.unwrap();
    let body = "x".repeat(2000);
    let sends = (0..300).map(|i| {
        let (store, body) = (&store, &body);
        async move { crate::store::contract::send(store, conversation.id, a, &format!("m{i}"), body).await }
    });
    let mut seqs: Vec<u64> =
        futures::future::join_all(sends).await.into_iter().map(|sent| sent.unwrap().message().seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    drop_keyspace(&store, &cluster).await;
}

/// A change whose writer stops after its LWT (the roster already changed)
/// and before its rows: readers take the roster's word (a removed member
/// sees nothing later, sends nothing), and once the lock is past its
/// takeover time the next change writes the recorded rows and frees the lock.
#[tokio::test]
async fn a_change_left_half_written_is_completed_and_leaks_nothing() {
    use crate::store::{Change, ChangeRequest, HistoryRange, Kind, MessageStore, NewGroup};
    use std::sync::atomic::Ordering;
    let (mut cluster, mut options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    cluster.request_timeout = std::time::Duration::from_millis(500);
    options.lock_timeout = std::time::Duration::from_secs(3);
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let now = messenger_platform::ids::now_ms();
    let group = NewGroup {
        id: uuid::Uuid::now_v7(),
        creator: "owner".into(),
        title: "team".into(),
        members: vec!["bob".into(), "carol".into()],
        now_ms: now,
    };
    let id = store.create_group(group, 10).await.unwrap().0.id;
    let send = |user: &'static str, body: &'static str| {
        let store = &store;
        async move { crate::store::contract::send(store, id, user, body, body).await }
    };
    send("owner", "before").await.unwrap();
    let limits = crate::store::contract::LIMITS;
    let change = |change: Change| ChangeRequest {
        conversation_id: id,
        actor: "owner".into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits,
    };

    store.inner.fail_plan_writes.store(true, Ordering::SeqCst);
    let removal = store.apply(change(Change::RemoveMember("carol".into()))).await;
    assert!(removal.is_err(), "the writer stopped before its rows: {removal:?}");
    store.inner.fail_plan_writes.store(false, Ordering::SeqCst);
    let removed_at = 3;

    send("owner", "secret").await.unwrap();
    let carol = store.member(id, "carol").await.unwrap().unwrap();
    assert_eq!(carol.removed_seq, Some(removed_at), "the roster decides, not the unwritten row");
    let seen = store.history(id, HistoryRange::Before(None), carol.visible().ranges()[0], 50).await.unwrap();
    assert!(seen.iter().all(|m| m.body != "secret"), "a removed member read a later message");
    let synced = store.sync("carol", "phone", None, None, 100).await.unwrap();
    assert!(synced.iter().all(|m| m.body != "secret" && m.seq <= removed_at), "{synced:?}");
    assert!(matches!(send("carol", "still here?").await, Err(crate::error::Error::NoLongerMember)));
    let active = store.members(id).await.unwrap().into_iter().filter(|m| m.is_active()).count();
    assert_eq!(active, 2);

    // Past the takeover time (2 x lock_timeout) the next change completes it.
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    let renamed = store.apply(change(Change::Rename("team 2".into()))).await.unwrap();
    assert_eq!(renamed.len(), 1);
    let row = super::reads::member(&store.inner, id, "carol").await.unwrap().unwrap();
    assert_eq!(row.removed_seq, Some(removed_at), "the removal's own rows were written");
    let entry = store.history(id, HistoryRange::After(removed_at - 1), crate::store::SeqBounds::ALL, 1).await.unwrap();
    assert_eq!((entry[0].seq, entry[0].kind), (removed_at, Kind::MemberRemoved));
    let head = super::reads::head(&store.inner, id, true).await.unwrap().unwrap();
    assert!(head.applying.is_none() && head.pending.is_none(), "the lock and its record are gone");
    // A retried removal now finds carol gone, as on SQLite.
    assert!(store.apply(change(Change::RemoveMember("carol".into()))).await.is_err());
    drop_keyspace(&store, &cluster).await;
}

/// Readers judge a missing seq lost by the age of the next row, so rows are
/// stamped when their seqs are reserved, not when the send was received: a
/// send that waited in a queue must not look old enough to skip a gap that
/// a slower writer is still filling.
#[tokio::test]
async fn rows_are_stamped_at_their_reservation_not_at_receipt() {
    use crate::store::{Appended, MessageStore, NewMessage, SendOutcome};
    let (cluster, options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let id = store.get_or_create_direct("stamp-a", "stamp-b", uuid::Uuid::now_v7(), 0).await.unwrap().id;
    let before = messenger_platform::ids::now_ms();
    let queued_long_ago = NewMessage {
        conversation_id: id,
        message_id: uuid::Uuid::now_v7(),
        sender: "stamp-a".into(),
        client_msg_id: "1".into(),
        body: "late".into(),
        reply_to_seq: 0,
        sent_at_ms: before - 60_000,
        attachments: Vec::new(),
    };
    let SendOutcome::Created(Appended { entry: stored, .. }) = store.send(queued_long_ago).await.unwrap() else {
        panic!("not created")
    };
    assert!(stored.sent_at_ms >= before, "stamped {} before the reservation at {before}", stored.sent_at_ms);
    let row = super::reads::message_at(&store.inner, id, stored.seq).await.unwrap().unwrap().0;
    assert_eq!(row.sent_at_ms, stored.sent_at_ms);
    drop_keyspace(&store, &cluster).await;
}

/// The requests an instance sent since the last call, as `name/mode`.
fn sent(store: &super::ScyllaStore) -> Vec<String> {
    let mut sent = store.inner.sent.lock().unwrap();
    sent.drain(..).map(|(name, mode)| format!("{name}/{mode}")).collect()
}

/// A batch of sends on the head this instance kept makes no serial read, and
/// a delivered ack within it reads neither head nor member; a head another
/// instance moved (a send, a removal) costs one failed LWT and a serial
/// read, and its decisions are the fresh head's: seqs stay dense, a removed
/// member is refused and its cursor stops at its removal, and a member added
/// there is let in.
#[tokio::test]
async fn a_kept_head_saves_reads_and_a_stale_one_is_never_trusted() {
    use crate::store::{Change, ChangeRequest, MessageStore, NewGroup, SendOutcome, contract::send};
    let (cluster, options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    let first = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let second = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let group = NewGroup {
        id: uuid::Uuid::now_v7(),
        creator: "kept-a".into(),
        title: "kept".into(),
        members: vec!["kept-b".into(), "kept-c".into()],
        now_ms: messenger_platform::ids::now_ms(),
    };
    let id = first.create_group(group, 10).await.unwrap().0.id;
    let seq = |outcome: SendOutcome| match outcome {
        SendOutcome::Created(appended) => appended.entry.seq,
        SendOutcome::Duplicate(_) => panic!("a duplicate"),
    };
    assert_eq!(seq(send(&first, id, "kept-a", "1", "x").await.unwrap()), 2);
    sent(&first);
    assert_eq!(seq(send(&first, id, "kept-a", "2", "x").await.unwrap()), 3);
    let requests = sent(&first);
    assert!(!requests.iter().any(|r| r.ends_with("/serial_read")), "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.starts_with("head_reserve/")).count(), 1, "{requests:?}");
    let stored = first.ack_delivered("kept-b", "phone", vec![(id, 3)]).await.unwrap();
    assert_eq!(stored, vec![(id, 3)]);
    let requests = sent(&first);
    assert!(!requests.iter().any(|r| r.starts_with("head_read") || r.starts_with("member_read")), "{requests:?}");
    // Beyond the kept head the ack is clamped by what the node holds.
    assert_eq!(first.ack_delivered("kept-b", "phone", vec![(id, 99)]).await.unwrap(), vec![(id, 3)]);
    // The other instance moves the head: the kept one is stale.
    assert_eq!(seq(send(&second, id, "kept-b", "1", "x").await.unwrap()), 4);
    assert_eq!(seq(send(&first, id, "kept-a", "3", "x").await.unwrap()), 5, "seqs stay dense");
    let requests = sent(&first);
    assert_eq!(requests.iter().filter(|r| r.starts_with("head_reserve/")).count(), 2, "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.ends_with("/serial_read")).count(), 1, "{requests:?}");
    // The other instance removes c, whom the head the first one keeps lists.
    let stale = super::rows::Head::clone(&first.inner.heads.get(id).expect("a kept head"));
    let by_a = |change| ChangeRequest {
        conversation_id: id,
        actor: "kept-a".into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits: crate::store::contract::LIMITS,
    };
    let removed_at = second.apply(by_a(Change::RemoveMember("kept-c".into()))).await.unwrap()[0].entry.seq;
    let refused = send(&first, id, "kept-c", "1", "x").await;
    assert!(matches!(refused, Err(crate::error::Error::NoLongerMember)), "{refused:?}");
    // c's acks on that stale head: within it as asked, beyond it stopped at the removal.
    first.inner.heads.forget(id);
    first.inner.heads.keep(stale.clone());
    assert_eq!(first.ack_delivered("kept-c", "phone", vec![(id, stale.last_seq)]).await.unwrap(), [(id, 5)]);
    let stored = first.ack_delivered("kept-c", "phone", vec![(id, 99)]).await.unwrap();
    assert_eq!(stored, vec![(id, removed_at)], "a removed member's cursor stops at its removal");
    // The other instance adds d, whom the stale head does not list: d is let in.
    second.apply(by_a(Change::AddMembers(vec!["kept-d".into()]))).await.unwrap();
    assert_eq!(seq(send(&first, id, "kept-d", "1", "x").await.unwrap()), removed_at + 2, "a new member is let in");
    drop_keyspace(&first, &cluster).await;
}

/// A seq whose change is recorded in the head but not yet written (its
/// writer stopped) is never skipped as lost, however old the rows after it:
/// sync stops before it until the change is completed, then delivers both.
#[tokio::test]
async fn a_recorded_change_is_never_skipped_as_lost() {
    use crate::store::{Change, ChangeRequest, MessageStore, NewGroup};
    use std::sync::atomic::Ordering;
    let (mut cluster, mut options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    cluster.request_timeout = std::time::Duration::from_millis(500);
    options.lock_timeout = std::time::Duration::from_secs(3);
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let group = NewGroup {
        id: uuid::Uuid::now_v7(),
        creator: "owner".into(),
        title: "team".into(),
        members: vec!["bob".into()],
        now_ms: messenger_platform::ids::now_ms(),
    };
    let id = store.create_group(group, 10).await.unwrap().0.id;
    store.ack_delivered("bob", "phone", vec![(id, 1)]).await.unwrap();
    let rename = ChangeRequest {
        conversation_id: id,
        actor: "owner".into(),
        change: Change::Rename("renamed".into()),
        now_ms: messenger_platform::ids::now_ms(),
        limits: crate::store::contract::LIMITS,
    };
    store.inner.fail_plan_writes.store(true, Ordering::SeqCst);
    assert!(store.apply(rename).await.is_err());
    store.inner.fail_plan_writes.store(false, Ordering::SeqCst);
    crate::store::contract::send(&store, id, "owner", "after", "after the rename").await.unwrap();
    // Older than 2 x lock_timeout: a gap with no record would count as lost.
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    let synced = store.sync("bob", "phone", None, None, 10).await.unwrap();
    assert!(synced.is_empty(), "sync passed the unwritten rename: {synced:?}");
    // The next send completes the rename; then sync has everything, in order.
    crate::store::contract::send(&store, id, "owner", "next", "next").await.unwrap();
    let synced: Vec<u64> = store.sync("bob", "phone", None, None, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(synced, vec![2, 3, 4]);
    drop_keyspace(&store, &cluster).await;
}

/// Two message instances on one keyspace, with short timeouts; the first
/// holds the rows of the send with client message id `held`.
async fn two_instances(held: &str) -> (Cluster, super::ScyllaStore, super::ScyllaStore, super::send::HoldRows) {
    let (mut cluster, mut options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    cluster.request_timeout = std::time::Duration::from_millis(500);
    options.lock_timeout = std::time::Duration::from_secs(3);
    let first = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let second = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let hold =
        super::send::HoldRows { client_msg_id: held.into(), reached: Default::default(), release: Default::default() };
    *first.inner.hold_rows.lock().unwrap() = Some(hold.clone());
    (cluster, first, second, hold)
}

/// Starts a direct conversation of `a` and `b` and, on `first`, a send by
/// `a` of `client` whose rows are held; returns once they are held.
async fn held_send(
    first: &super::ScyllaStore,
    hold: &super::send::HoldRows,
    (a, b): (&'static str, &'static str),
    client: &'static str,
) -> (uuid::Uuid, tokio::task::JoinHandle<crate::error::Result<crate::store::SendOutcome>>) {
    use crate::store::MessageStore;
    let id = first.get_or_create_direct(a, b, uuid::Uuid::now_v7(), 0).await.unwrap().id;
    let store = super::ScyllaStore { inner: first.inner.clone() };
    let sending = tokio::spawn(async move { crate::store::contract::send(&store, id, a, client, client).await });
    hold.reached.notified().await;
    (id, sending)
}

/// A send's rows that land after its claim was taken over (a write that
/// timed out on the client but was still applied, e.g. by hinted handoff or
/// the batchlog) never give its client message id a second seq: the retry
/// that took the claim over declares the first reservation lost, and the
/// late rows are shadowed. The first instance does not acknowledge them.
#[tokio::test]
async fn rows_landing_after_a_takeover_give_no_second_seq() {
    use crate::store::{Appended, HistoryRange, MessageStore, SendOutcome};
    let (cluster, first, second, hold) = two_instances("late").await;
    let (id, original) = held_send(&first, &hold, ("late-a", "late-b"), "late").await;
    // Past the takeover time (2 x lock_timeout) the retry, on the other instance, takes the claim over.
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    let retried = crate::store::contract::send(&second, id, "late-a", "late", "hi").await.unwrap();
    let SendOutcome::Created(Appended { entry: retried, .. }) = retried else {
        panic!("the retry found an original: {retried:?}")
    };
    hold.release.notify_one();
    let first_answer = original.await.unwrap();
    assert!(
        !matches!(first_answer, Ok(SendOutcome::Created(ref m)) if m.entry.seq != retried.seq),
        "two acknowledgements with different seqs: {first_answer:?} and {}",
        retried.seq
    );
    let all = second.history(id, HistoryRange::Before(None), crate::store::SeqBounds::ALL, 50).await.unwrap();
    let copies: Vec<u64> = all.iter().filter(|m| m.client_msg_id == "late").map(|m| m.seq).collect();
    assert_eq!(copies, vec![retried.seq], "one message, at the retry's seq");
    let again = crate::store::contract::send(&first, id, "late-a", "late", "hi").await.unwrap();
    assert!(matches!(again, SendOutcome::Duplicate(ref m) if m.entry.seq == retried.seq), "{again:?}");
    drop_keyspace(&second, &cluster).await;
}

/// A seq that readers skipped as lost stays lost: the rows of its writer,
/// landing later, never appear (a device's cursor is already past it), and
/// that writer does not acknowledge them.
#[tokio::test]
async fn a_seq_skipped_as_lost_never_appears_later() {
    use crate::store::{HistoryRange, MessageStore, SendOutcome};
    let (cluster, first, second, hold) = two_instances("slow").await;
    let (id, slow) = held_send(&first, &hold, ("lost-a", "lost-b"), "slow").await;
    let after = crate::store::contract::send(&second, id, "lost-a", "after", "after").await.unwrap().message().seq;
    assert_eq!(after, 2, "the held send reserved seq 1");
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    let synced: Vec<u64> =
        second.sync("lost-b", "phone", None, None, 10).await.unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(synced, vec![2], "seq 1 is old enough to count as lost");
    second.ack_delivered("lost-b", "phone", vec![(id, 2)]).await.unwrap();
    hold.release.notify_one();
    let answer = slow.await.unwrap();
    assert!(!matches!(answer, Ok(SendOutcome::Created(_))), "acknowledged a seq readers skipped: {answer:?}");
    let all: Vec<u64> = second
        .history(id, HistoryRange::Before(None), crate::store::SeqBounds::ALL, 50)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(all, vec![2], "the skipped seq appeared later");
    drop_keyspace(&second, &cluster).await;
}

/// A small seeded generator (xorshift64*): each run of the check below is
/// reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// What one seeded run saw.
#[derive(Debug, Default)]
struct RunReport {
    acked: usize,
    retries: usize,
    lost: usize,
    kills: usize,
}

/// One seeded run of the linearizability-style check: three message
/// instances on one keyspace (their row writes delayed by up to 40 ms, so
/// concurrent writers land out of order); six senders (three on a direct
/// conversation, three on a group) each pick a random instance per attempt, give up on some attempts
/// after a few milliseconds (an injected timeout: the attempt goes on
/// without them) and retry with the same client message id until acked;
/// meanwhile two instances are killed at random points and replaced, and a
/// device syncs and acks through random instances. Then, from the store:
/// every acked message is present exactly once, at its acked seq, and a
/// resend finds it; nothing unacked is present; every missing seq below the
/// head was never acked (a lost seq); the device was never handed anything
/// at or below the cursor it had acked, and got exactly what is stored.
async fn linearizability_run(seed: u64) -> RunReport {
    use crate::store::{Appended, HistoryRange, MessageStore, NewGroup, NewMessage, SendOutcome, SeqBounds};
    use std::{
        collections::{BTreeMap, BTreeSet},
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };
    type Pool = Arc<Mutex<Vec<Arc<super::ScyllaStore>>>>;
    let (mut cluster, mut options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    cluster.request_timeout = Duration::from_millis(500);
    options.lock_timeout = Duration::from_secs(3);
    let mut instances = Vec::new();
    let instance = || async {
        let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
        store.inner.row_jitter_ms.store(40, std::sync::atomic::Ordering::SeqCst);
        Arc::new(store)
    };
    for _ in 0..3 {
        instances.push(instance().await);
    }
    let (a, b, c) = ("lin-a", "lin-b", "lin-c");
    let direct = instances[0].get_or_create_direct(a, b, uuid::Uuid::now_v7(), 0).await.unwrap().id;
    let group = NewGroup {
        id: uuid::Uuid::now_v7(),
        creator: a.into(),
        title: "lin".into(),
        members: vec![b.into(), c.into()],
        now_ms: messenger_platform::ids::now_ms(),
    };
    let group = instances[0].create_group(group, 10).await.unwrap().0.id;
    let pool: Pool = Arc::new(Mutex::new(instances));
    let pick = |pool: &Pool, rng: &mut Rng| {
        let pool = pool.lock().unwrap();
        pool[rng.below(pool.len() as u64) as usize].clone()
    };
    let started = Instant::now();
    let acks: Arc<Mutex<BTreeMap<(uuid::Uuid, String), u64>>> = Default::default();
    let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let senders = [(a, direct), (b, direct), (a, direct), (a, group), (c, group), (b, group)]
        .into_iter()
        .enumerate()
        .map(|(task, (user, id))| {
            let (pool, acks, retries) = (pool.clone(), acks.clone(), retries.clone());
            tokio::spawn(async move {
                let mut rng = Rng(seed * 1000 + task as u64 + 1);
                for i in 0..15 {
                    let client = format!("{task}-{i}");
                    loop {
                        assert!(started.elapsed() < Duration::from_secs(90), "seed {seed}: {client} never acked");
                        let message = NewMessage {
                            conversation_id: id,
                            message_id: uuid::Uuid::now_v7(),
                            sender: user.into(),
                            client_msg_id: client.clone(),
                            body: format!("{client} body"),
                            reply_to_seq: 0,
                            sent_at_ms: messenger_platform::ids::now_ms(),
                            attachments: Vec::new(),
                        };
                        let patience = if rng.below(4) == 0 {
                            Duration::from_millis(rng.below(20))
                        } else {
                            Duration::from_secs(5)
                        };
                        let store = pick(&pool, &mut rng);
                        match tokio::time::timeout(patience, store.send(message)).await {
                            Ok(Ok(
                                SendOutcome::Created(Appended { entry: m, .. })
                                | SendOutcome::Duplicate(Appended { entry: m, .. }),
                            )) => {
                                assert_eq!((m.client_msg_id.as_str(), m.sender.as_str()), (client.as_str(), user));
                                acks.lock().unwrap().insert((id, client.clone()), m.seq);
                                break;
                            }
                            _ => {
                                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(30 + rng.below(120))).await;
                            }
                        }
                    }
                }
            })
        });
    let senders: Vec<_> = senders.collect();
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let killer = {
        let (pool, cluster, options, sending) = (pool.clone(), cluster.clone(), options.clone(), sending.clone());
        tokio::spawn(async move {
            let mut rng = Rng(seed * 7919 + 3);
            let mut kills = 0;
            for _ in 0..2 {
                // Killed before a random one of its next statements: any point of a send,
                // between claim, reservation, seq record and rows included.
                let victim = pick(&pool, &mut rng);
                let countdown = 1 + rng.below(60) as i64;
                victim.inner.kill_countdown.store(countdown, std::sync::atomic::Ordering::SeqCst);
                let fresh = Arc::new(super::ScyllaStore::connect(&cluster, &options).await.unwrap());
                fresh.inner.row_jitter_ms.store(40, std::sync::atomic::Ordering::SeqCst);
                while !victim.inner.killed.load(std::sync::atomic::Ordering::SeqCst) {
                    if !sending.load(std::sync::atomic::Ordering::SeqCst) {
                        return kills;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                kills += 1;
                let mut pool = pool.lock().unwrap();
                if let Some(slot) = pool.iter_mut().find(|store| Arc::ptr_eq(store, &victim)) {
                    *slot = fresh;
                }
            }
            kills
        })
    };
    // The device: what it was handed, and the cursors it acked.
    let handed: Arc<Mutex<Vec<(uuid::Uuid, u64, String)>>> = Default::default();
    let acked_cursor: Arc<Mutex<BTreeMap<uuid::Uuid, u64>>> = Default::default();
    let sync_once = {
        let (pool, handed, acked_cursor) = (pool.clone(), handed.clone(), acked_cursor.clone());
        move |rng: &mut Rng| {
            let (store, handed, acked_cursor) = (pick(&pool, rng), handed.clone(), acked_cursor.clone());
            async move {
                let Ok(batch) = store.sync(b, "phone", None, None, 100).await else { return None };
                let mut newest: BTreeMap<uuid::Uuid, u64> = BTreeMap::new();
                for m in &batch {
                    let cursor = acked_cursor.lock().unwrap().get(&m.conversation_id).copied().unwrap_or(0);
                    assert!(m.seq > cursor, "seed {seed}: handed seq {} again, at or below acked {cursor}", m.seq);
                    handed.lock().unwrap().push((m.conversation_id, m.seq, m.client_msg_id.clone()));
                    newest.insert(m.conversation_id, m.seq);
                }
                let count = batch.len();
                if store.ack_delivered(b, "phone", newest.clone().into_iter().collect()).await.is_ok() {
                    acked_cursor.lock().unwrap().extend(newest);
                }
                Some(count)
            }
        }
    };
    let device = {
        let sync_once = sync_once.clone();
        let senders_done = Arc::new(tokio::sync::Notify::new());
        let done = senders_done.clone();
        let task = tokio::spawn(async move {
            let mut rng = Rng(seed * 104_729 + 5);
            loop {
                tokio::select! {
                    _ = done.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(rng.below(30))) => {}
                }
                sync_once(&mut rng).await;
            }
        });
        (task, senders_done)
    };
    for sender in senders {
        sender.await.unwrap();
    }
    sending.store(false, std::sync::atomic::Ordering::SeqCst);
    device.1.notify_one();
    device.0.await.unwrap();
    // Past every writer's budget, every gap left is settled: sync drains.
    tokio::time::sleep(options.lock_timeout * 2 + Duration::from_millis(500)).await;
    let mut rng = Rng(seed * 31 + 7);
    while sync_once(&mut rng).await != Some(0) {}

    let check = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    let acks = acks.lock().unwrap().clone();
    let mut lost = 0;
    let mut stored_all = BTreeSet::new();
    for id in [direct, group] {
        let all = check.history(id, HistoryRange::After(0), SeqBounds::ALL, 1000).await.unwrap();
        let head = super::reads::head(&check.inner, id, false).await.unwrap().unwrap();
        let mut seen = BTreeMap::new();
        for m in &all {
            stored_all.insert((id, m.seq, m.client_msg_id.clone()));
            if m.kind != crate::store::Kind::Text {
                continue;
            }
            assert!(
                seen.insert(m.client_msg_id.clone(), m.seq).is_none(),
                "seed {seed}: {} stored twice",
                m.client_msg_id
            );
        }
        let acked_here: BTreeMap<String, u64> =
            acks.iter().filter(|((conv, _), _)| *conv == id).map(|((_, client), seq)| (client.clone(), *seq)).collect();
        assert_eq!(seen, acked_here, "seed {seed}: stored messages differ from acked ones (client id -> seq)");
        let present: BTreeSet<u64> = all.iter().map(|m| m.seq).collect();
        lost += (1..=head.last_seq).filter(|seq| !present.contains(seq)).count();
        for (client, seq) in &acked_here {
            let sender = all.iter().find(|m| m.seq == *seq).unwrap().sender.clone();
            let resend = NewMessage {
                conversation_id: id,
                message_id: uuid::Uuid::now_v7(),
                sender,
                client_msg_id: client.clone(),
                body: String::new(),
                reply_to_seq: 0,
                sent_at_ms: messenger_platform::ids::now_ms(),
                attachments: Vec::new(),
            };
            let again = check.send(resend).await.unwrap();
            assert!(matches!(again, SendOutcome::Duplicate(ref m) if m.entry.seq == *seq), "seed {seed}: {again:?}");
        }
    }
    let handed: BTreeSet<_> = handed.lock().unwrap().iter().cloned().collect();
    assert_eq!(handed, stored_all, "seed {seed}: the device got other than what is stored");
    drop_keyspace(&check, &cluster).await;
    let kills = killer.await.unwrap();
    RunReport { acked: acks.len(), retries: retries.load(std::sync::atomic::Ordering::Relaxed), lost, kills }
}

/// The linearizability-style check over ten seeded runs (two at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_under_timeouts_retries_and_kills_stay_exactly_once_over_seeded_runs() {
    let (mut kills, mut lost) = (0, 0);
    for seeds in [1u64, 2, 3, 4, 5, 6, 7, 8, 9, 10].chunks(2) {
        let runs = futures::future::join_all(seeds.iter().map(|seed| linearizability_run(*seed))).await;
        for (seed, report) in seeds.iter().zip(runs) {
            eprintln!("seed {seed}: {report:?} ({} retried attempts)", report.retries);
            assert_eq!(report.acked, 90);
            kills += report.kills;
            lost += report.lost;
        }
    }
    // The runs must exercise what they check: instances died mid-send, seqs were lost.
    assert!(kills >= 10, "only {kills} kills over the runs");
    assert!(lost > 0, "no run lost a seq: the kills missed every window between reservation and rows");
}

/// `messenger migrate` from several pods at once: one applies the schema,
/// the others wait for it and say so; a later run has nothing to do.
#[tokio::test]
async fn concurrent_migrations_apply_the_schema_once_and_report_it() {
    let (mut cluster, options) = tokio::task::spawn_blocking(test_options).await.unwrap();
    cluster.migrate_on_start = false;
    let runs = (0..3).map(|_| super::migrate(&cluster));
    let reports: Vec<super::MigrationReport> =
        futures::future::join_all(runs).await.into_iter().map(|report| report.unwrap()).collect();
    let target = super::migrate::versions(&cluster).len() as u32;
    assert!(reports.iter().all(|report| report.to == target), "{reports:?}");
    let applying: Vec<&super::MigrationReport> = reports.iter().filter(|report| !report.applied.is_empty()).collect();
    assert_eq!(applying.len(), 1, "exactly one migrator applies: {reports:?}");
    assert_eq!(applying[0].from, 0);
    assert!(applying[0].to_string().contains("applied: CREATE TABLE IF NOT EXISTS"), "{}", applying[0]);
    let again = super::migrate(&cluster).await.unwrap();
    assert_eq!((again.from, again.to, again.applied.len()), (target, target, 0));
    assert!(again.to_string().contains("nothing to do"), "{again}");
    // The store works on the migrated keyspace.
    let store = super::ScyllaStore::connect(&cluster, &options).await.unwrap();
    crate::store::MessageStore::get_or_create_direct(&store, "m-a", "m-b", uuid::Uuid::now_v7(), 0).await.unwrap();
    drop_keyspace(&store, &cluster).await;
}

/// A re-added member's sync stops at a seq of an earlier range whose row is
/// not readable yet: reading on into the next range would hand a device
/// seqs past it, and its cursor would skip it for good.
#[tokio::test]
async fn sync_waits_at_a_missing_row_before_reading_a_later_range() {
    use crate::store::{Change, ChangeRequest, MessageStore, NewGroup};
    let (cluster, first, second, hold) = two_instances("held-range").await;
    let (a, b) = ("range-a", "range-b");
    let group = NewGroup {
        id: uuid::Uuid::now_v7(),
        creator: a.into(),
        title: "ranges".into(),
        members: vec![b.into()],
        now_ms: messenger_platform::ids::now_ms(),
    };
    let id = first.create_group(group, 10).await.unwrap().0.id; // 1
    let store = super::ScyllaStore { inner: first.inner.clone() };
    let held = tokio::spawn(async move { crate::store::contract::send(&store, id, a, "held-range", "held").await });
    hold.reached.notified().await; // 2, reserved, its rows held
    let change = |change: Change| ChangeRequest {
        conversation_id: id,
        actor: a.into(),
        change,
        now_ms: messenger_platform::ids::now_ms(),
        limits: crate::store::Limits { max_group_size: 10, edit_window_ms: 60_000 },
    };
    second.apply(change(Change::RemoveMember(b.into()))).await.unwrap(); // 3
    crate::store::contract::send(&second, id, a, "while-out", "while out").await.unwrap(); // 4
    second.apply(change(Change::AddMembers(vec![b.into()]))).await.unwrap(); // 5
    let seqs = |messages: Vec<crate::store::StoredMessage>| messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let synced = second.sync(b, "new-device", None, None, 100).await.unwrap();
    assert_eq!(seqs(synced), [1], "sync read past the missing seq 2 into the next range");
    // So does a gap fill (history after a seq) across b's ranges.
    let (service, _) =
        crate::service::tests::service_on(std::sync::Arc::new(super::ScyllaStore { inner: second.inner.clone() }));
    let after = service.history(b, &id.to_string(), crate::store::HistoryRange::After(0), 10).await.unwrap();
    assert_eq!(seqs(after.messages), [1], "history read past the missing seq 2 into the next range");
    hold.release.notify_one();
    held.await.unwrap().unwrap();
    assert_eq!(seqs(second.sync(b, "new-device", None, None, 100).await.unwrap()), [1, 2, 3, 5]);
    drop_keyspace(&second, &cluster).await;
}
