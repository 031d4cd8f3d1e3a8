//! The `kvindex` binary. Today: `kvindex demo` (the engine on the shared trace). The HTTP/ZMQ/NATS
//! service (`kvindex serve`) and `kvindex replay` arrive with their issues.

use clap::{Parser, Subcommand};

mod demo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kvindex: which worker already holds the longest prefix of this request's KV cache?
#[derive(Parser, Debug)]
#[command(name = "kvindex", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay the shared production trace into the index and query it.
    Demo(demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
    }
}
