//! The `kvindex` binary: `kvindex serve` (the HTTP service, Dynamo-compatible), `kvindex capture`
//! (record a live ZMQ stream into an event log), `kvindex replay` (tools over a data directory)
//! and `kvindex demo` (the engine on the shared trace).
//!
//! Event path: source (ZMQ listeners through [`listeners`] and [`zmq_source`], `POST /events`,
//! peer recovery) → [`ingest`] → the durable log and the engine. Query path:
//! [`http`] → [`partitions`] (lock-free view) → the engine's lock-free walk.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod access_log;
mod capture;
mod cli;
mod config;
mod demo;
mod endpoint;
mod http;
mod ingest;
mod listeners;
mod metrics;
mod nats;
mod partitions;
mod peers;
mod replay_cmd;
mod serve;
mod shutdown;
#[cfg(test)]
mod test_support;
mod zmq_source;

use cli::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing("info");
            match serve::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Dynamo reports start-up failures as `Exception: <message>`, exit 1.
                    eprintln!("Exception: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Capture(args) => {
            init_tracing("info");
            ExitCode::from(capture::run(&args) as u8)
        }
        Command::Replay(args) => {
            init_tracing("warn");
            ExitCode::from(replay_cmd::run(args) as u8)
        }
        Command::Demo(args) => {
            init_tracing("warn");
            match demo::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
