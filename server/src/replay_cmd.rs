//! `kvindex replay inspect|export|import|state|diff`: the command line over
//! `kvindex_persistence::tool`. Read-only on the data directory (except `import`, which writes
//! its target), so it can run beside a live server.
//!
//! Exit codes (also in `docs/operations.md`):
//! * 0 — success (`inspect`: no damage found);
//! * 1 — the command failed: I/O error, unreadable input line, bad argument value;
//! * 2 — usage error (unknown flag, missing argument; clap's own code);
//! * 3 — damage found: `inspect` found damaged regions or LSN gaps, or another command hit a
//!   corrupt segment or snapshot, or LSNs missing from the log (`export`, `state`);
//! * 4 — the position asked for is no longer available (compacted into a snapshot).

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};
use kvindex_engine::{Engine, LocalBlockHash, NamespaceKey};
use kvindex_persistence::tool::{self, StateSource};
use kvindex_persistence::{NamespaceSpec, PersistError, FIRST_LSN};
use serde::Deserialize;
use serde_json::json;
use thiserror::Error;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the command failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: damage found.
pub const EXIT_DAMAGE: i32 = 3;
/// Exit code: position unavailable.
pub const EXIT_UNAVAILABLE: i32 = 4;

/// `kvindex replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(subcommand)]
    pub command: ReplayCommand,
}

/// Partition options for a JSON-lines SOURCE.
#[derive(Args, Debug, Clone)]
pub struct JsonlNamespace {
    /// Model of the events when SOURCE is a JSON-lines file.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Routing group of the events when SOURCE is a JSON-lines file.
    #[arg(long, default_value = "default")]
    pub routing_group: String,
    /// Block size when SOURCE is a JSON-lines file [default: 16].
    #[arg(long)]
    pub block_size: Option<u32>,
}

/// The `replay` subcommands.
#[derive(Subcommand, Debug)]
pub enum ReplayCommand {
    /// Segments, snapshots, streams and every damaged region of a data directory.
    Inspect {
        /// Data directory.
        dir: PathBuf,
    },
    /// Write the logged RouterEvents as JSON lines to stdout.
    Export {
        /// Data directory.
        dir: PathBuf,
        /// First LSN [default: the oldest in the log].
        #[arg(long)]
        from: Option<u64>,
        /// Last LSN (inclusive) [default: the newest].
        #[arg(long)]
        to: Option<u64>,
        /// Only this worker's events.
        #[arg(long)]
        worker: Option<u64>,
    },
    /// Append RouterEvent JSON lines to the log of a (new) data directory. Every line is
    /// checked before any is written: a refused line leaves the directory as it was.
    Import {
        /// JSON-lines file (one RouterEvent per line); a regular file, since it is read twice.
        file: PathBuf,
        /// Target data directory (created if needed; must not be in use by a server).
        #[arg(long)]
        to: PathBuf,
        /// Partition model.
        #[arg(long, default_value = "default")]
        model: String,
        /// Partition routing group.
        #[arg(long, default_value = "default")]
        routing_group: String,
        /// Partition block size.
        #[arg(long)]
        block_size: u32,
    },
    /// Rebuild the index as of a position and print it, dump it or query it.
    State {
        /// Data directory, or a RouterEvent JSON-lines file.
        source: PathBuf,
        /// Position: LSN for a data directory, event count for a JSON-lines file
        /// [default: the end].
        #[arg(long)]
        at: Option<u64>,
        /// Print the index as Dynamo's /dump JSON.
        #[arg(long)]
        dump: bool,
        /// Answer the queries of this JSON-lines file, one answer line per query line.
        #[arg(long, value_name = "FILE")]
        queries: Option<PathBuf>,
        /// Print per-partition statistics (workers, blocks, memory).
        #[arg(long)]
        stats: bool,
        #[command(flatten)]
        ns: JsonlNamespace,
    },
    /// Which (worker, dp_rank) gained or lost which blocks between two positions (JSON lines).
    Diff {
        /// Data directory, or a RouterEvent JSON-lines file.
        source: PathBuf,
        /// Earlier position.
        #[arg(long)]
        from: u64,
        /// Later position.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        ns: JsonlNamespace,
    },
}

/// Why a replay command failed.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("{0}")]
    Input(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

impl ReplayError {
    /// The documented exit code of this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ReplayError::Persist(
                PersistError::Corrupt { .. }
                | PersistError::MissingRecords { .. }
                | PersistError::CorruptSnapshot { .. }
                | PersistError::SegmentTooLarge { .. },
            ) => EXIT_DAMAGE,
            ReplayError::Persist(
                PersistError::Unavailable(_)
                | PersistError::CompactedAway { .. }
                | PersistError::SnapshotFormatTooOld { .. },
            ) => EXIT_UNAVAILABLE,
            _ => EXIT_FAILED,
        }
    }
}

/// Run a replay command; returns the exit code.
pub fn run(args: ReplayArgs) -> i32 {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = execute(args.command, &mut out).and_then(|code| {
        out.flush()?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = out.flush();
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn source_of(path: &Path, ns: &JsonlNamespace) -> StateSource {
    if path.is_dir() {
        StateSource::DataDir(path.to_owned())
    } else {
        StateSource::JsonLines {
            path: path.to_owned(),
            namespace: NamespaceSpec::new(
                ns.model.clone(),
                ns.routing_group.clone(),
                ns.block_size.unwrap_or(16),
            ),
        }
    }
}

/// The first LSN of the oldest segment in `dir` (segment names carry it).
fn oldest_lsn(dir: &Path) -> Result<u64, ReplayError> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        ReplayError::Input(format!(
            "cannot read the data directory {}: {e}",
            dir.display()
        ))
    })?;
    Ok(rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("seg-")?
                .strip_suffix(".kvlog")?
                .parse::<u64>()
                .ok()
        })
        .min()
        .unwrap_or(FIRST_LSN))
}

fn execute(cmd: ReplayCommand, out: &mut dyn Write) -> Result<i32, ReplayError> {
    match cmd {
        ReplayCommand::Inspect { dir } => {
            if !dir.is_dir() {
                return Err(ReplayError::Input(format!(
                    "{} is not a directory; pass a kvindex data directory (--data-dir of `kvindex serve`)",
                    dir.display()
                )));
            }
            let report = tool::inspect(&dir)?;
            write!(out, "{report}")?;
            Ok(if report.is_clean() {
                EXIT_OK
            } else {
                EXIT_DAMAGE
            })
        }
        ReplayCommand::Export {
            dir,
            from,
            to,
            worker,
        } => {
            let from = match from {
                Some(f) => f,
                None => oldest_lsn(&dir)?,
            };
            let n = tool::export_jsonl(&dir, from, to.unwrap_or(u64::MAX), worker, out)?;
            eprintln!("exported {n} events");
            Ok(EXIT_OK)
        }
        ReplayCommand::Import {
            file,
            to,
            model,
            routing_group,
            block_size,
        } => {
            let r = tool::import(&file, &to, &model, &routing_group, block_size)?;
            writeln!(
                out,
                "imported {} events into {} (LSN {}..{}) as model={model} routing_group={routing_group} block_size={block_size}",
                r.events,
                to.display(),
                r.first_lsn,
                r.next_lsn
            )?;
            Ok(EXIT_OK)
        }
        ReplayCommand::State {
            source,
            at,
            dump,
            queries,
            stats,
            ns,
        } => {
            let src = source_of(&source, &ns);
            let state = tool::state(&src, at)?;
            let engine = &state.engine;
            if dump {
                write_dump(engine, out)?;
            }
            if let Some(q) = &queries {
                run_queries(engine, q, out)?;
            }
            if stats || (!dump && queries.is_none()) {
                write_stats(engine, state.position, out)?;
            }
            Ok(EXIT_OK)
        }
        ReplayCommand::Diff {
            source,
            from,
            to,
            ns,
        } => {
            let src = source_of(&source, &ns);
            for d in tool::diff(&src, from, to)? {
                let block = |b: &tool::BlockRef| json!({"path": b.path, "ext": b.ext});
                let line = json!({
                    "model_name": d.namespace.model_name,
                    "routing_group": d.namespace.routing_group,
                    "worker_id": d.stream.worker_id,
                    "dp_rank": d.stream.dp_rank,
                    "gained": d.gained.iter().map(block).collect::<Vec<_>>(),
                    "lost": d.lost.iter().map(block).collect::<Vec<_>>(),
                });
                writeln!(out, "{line}")?;
            }
            Ok(EXIT_OK)
        }
    }
}

fn write_stats(engine: &Engine, position: u64, out: &mut dyn Write) -> Result<(), ReplayError> {
    writeln!(out, "position {position}")?;
    for key in engine.namespaces() {
        let Some(ns) = engine.namespace(&key) else {
            continue;
        };
        let mem = ns.memory();
        writeln!(
            out,
            "{key} block_size {}: {} workers, {} (block, worker) pairs, {} blocks, {} bytes",
            ns.block_size(),
            ns.get_workers().len(),
            ns.current_size(),
            mem.live_nodes,
            mem.node_bytes + mem.heap_bytes
        )?;
        for (w, n) in ns.worker_block_counts() {
            writeln!(
                out,
                "  worker {} dp_rank {}: {n} blocks",
                w.worker_id, w.dp_rank
            )?;
        }
    }
    Ok(())
}

fn write_dump(engine: &Engine, out: &mut dyn Write) -> Result<(), ReplayError> {
    let mut map = serde_json::Map::new();
    for key in engine.namespaces() {
        let Some(ns) = engine.namespace(&key) else {
            continue;
        };
        let events = ns
            .dump()
            .map_err(|e| ReplayError::Input(format!("dump of {key}: {e}")))?;
        map.insert(
            key.to_string(),
            json!({
                "block_size": ns.block_size(),
                "events": events,
                "model_name": key.model_name,
                "routing_group": key.routing_group,
            }),
        );
    }
    serde_json::to_writer(&mut *out, &map).map_err(|e| ReplayError::Input(e.to_string()))?;
    writeln!(out)?;
    Ok(())
}

/// One line of a `--queries` file.
#[derive(Deserialize)]
struct QueryLine {
    block_hashes: Option<Vec<u64>>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
    model_name: Option<String>,
    routing_group: Option<String>,
}

fn run_queries(engine: &Engine, path: &Path, out: &mut dyn Write) -> Result<(), ReplayError> {
    let file = std::fs::File::open(path).map_err(|e| {
        ReplayError::Input(format!(
            "cannot open the queries file {}: {e}",
            path.display()
        ))
    })?;
    let namespaces = engine.namespaces();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let bad = |reason: String| {
            ReplayError::Input(format!("{} line {line_no}: {reason}", path.display()))
        };
        let line = line.map_err(|e| bad(format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let q: QueryLine = serde_json::from_str(&line).map_err(|e| {
            bad(format!(
                "{e}; expected {{\"block_hashes\":[u64...]}} or {{\"token_ids\":[u32...],\"block_size\":B}}"
            ))
        })?;
        let key = match (&q.model_name, &namespaces[..]) {
            (Some(m), _) => NamespaceKey::new(
                m.clone(),
                q.routing_group.clone().unwrap_or_else(|| "default".into()),
            ),
            (None, [only]) => only.clone(),
            (None, []) => {
                writeln!(out, "{}", json!({"matches": []}))?;
                continue;
            }
            (None, _) => {
                return Err(bad(
                    "the index has several partitions; add \"model_name\" (and \"routing_group\") to the query".into(),
                ))
            }
        };
        let Some(ns) = engine.namespace(&key) else {
            writeln!(out, "{}", json!({"matches": []}))?;
            continue;
        };
        let locals: Vec<LocalBlockHash> = match (&q.block_hashes, &q.token_ids) {
            (Some(h), _) => h.iter().map(|&v| LocalBlockHash(v)).collect(),
            (None, Some(t)) => compute_block_hash_for_seq(
                t,
                q.block_size.unwrap_or(ns.block_size()),
                &HashOptions {
                    lora_name: q.lora_name.as_deref(),
                    cache_namespace: q.cache_salt.as_deref(),
                    ..HashOptions::default()
                },
            ),
            (None, None) => {
                return Err(bad("needs \"block_hashes\" or \"token_ids\"".into()));
            }
        };
        let matches: Vec<_> = ns
            .find_matches(&locals, false)
            .sorted()
            .into_iter()
            .map(|(w, n)| json!({"worker_id": w.worker_id, "dp_rank": w.dp_rank, "blocks": n}))
            .collect();
        writeln!(out, "{}", json!({ "matches": matches }))?;
    }
    Ok(())
}
