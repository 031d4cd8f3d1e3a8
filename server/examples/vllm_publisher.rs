//! A stand-in for a vLLM engine's KV-event publisher, for trying kvindex's ZMQ ingestion by hand.
//!
//! It binds a PUB socket (and a ROUTER replay socket) and publishes `KVEventBatch`es exactly as
//! vLLM does (SERVICE.md §5): stores of token chains, removals of some of them, and optionally a
//! final `AllBlocksCleared`. Knobs create the failure cases the listener must survive.
//!
//! ```sh
//! cargo run -p kvindex-server --example vllm_publisher -- \
//!     --endpoint tcp://127.0.0.1:5557 --replay-endpoint tcp://127.0.0.1:5558 \
//!     --batches 1000 --block-size 16 --interval-ms 5
//! # then register worker 1 with endpoint tcp://127.0.0.1:5557, replay tcp://127.0.0.1:5558
//! ```

use std::time::Duration;

use clap::{Parser, ValueEnum};
use kvindex_server::zmq::test_publisher::{
    EventEncoding, ExtraKeyValue, PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Encoding {
    Positional,
    Map,
}

/// Publish vLLM-shaped KV events on a ZMQ PUB socket.
#[derive(Parser, Debug)]
struct Args {
    /// PUB endpoint to bind.
    #[arg(long, default_value = "tcp://127.0.0.1:5557")]
    endpoint: String,
    /// ROUTER replay endpoint to bind ("none" for no replay socket).
    #[arg(long, default_value = "tcp://127.0.0.1:5558")]
    replay_endpoint: String,
    /// Number of store batches to publish.
    #[arg(long, default_value_t = 100)]
    batches: u64,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Blocks per stored chain.
    #[arg(long, default_value_t = 4)]
    blocks_per_store: u32,
    /// `data_parallel_rank` written into every batch.
    #[arg(long, default_value_t = 0)]
    dp_rank: u32,
    /// Pause between batches.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// Event encoding.
    #[arg(long, value_enum, default_value = "positional")]
    encoding: Encoding,
    /// LoRA adapter name written into stores.
    #[arg(long)]
    lora_name: Option<String>,
    /// Cache salt written into each chain's first-block `extra_keys`, as vLLM does.
    #[arg(long)]
    cache_salt: Option<String>,
    /// Every N-th batch is kept for replay but not sent live (a gap replay can fill); 0 = never.
    #[arg(long, default_value_t = 0)]
    unsent_every: u64,
    /// Remove every N-th chain one batch after storing it; 0 = never.
    #[arg(long, default_value_t = 3)]
    remove_every: u64,
    /// Stop serving replays after this many batches (the replay endpoint "dies").
    #[arg(long)]
    kill_replay_after: Option<u64>,
    /// Publish `AllBlocksCleared` at the end.
    #[arg(long)]
    clear_at_end: bool,
    /// Seconds to wait before the first batch (time to register the worker).
    #[arg(long, default_value_t = 2)]
    startup_delay_s: u64,
    /// Seconds to keep serving replays after the last batch, so a listener registered late
    /// still catches up (Ctrl-C ends it earlier).
    #[arg(long, default_value_t = 2)]
    linger_s: u64,
}

/// A small deterministic generator, so runs are reproducible without extra dependencies.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let replay_endpoint = (args.replay_endpoint != "none").then(|| args.replay_endpoint.clone());
    let publisher = VllmPublisher::bind(PublisherConfig {
        endpoint: args.endpoint.clone(),
        replay_endpoint,
        ..PublisherConfig::loopback()
    })
    .await?;
    eprintln!(
        "publishing on {} (replay: {})",
        publisher.endpoint(),
        publisher.replay_endpoint().unwrap_or("none")
    );
    tokio::time::sleep(Duration::from_secs(args.startup_delay_s)).await;

    let encoding = match args.encoding {
        Encoding::Positional => EventEncoding::Positional,
        Encoding::Map => EventEncoding::Map,
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let tokens_per_chain = (args.block_size * args.blocks_per_store) as usize;
    let mut pending_removal: Option<Vec<u64>> = None;
    for i in 0..args.batches {
        let mut events = Vec::new();
        if let Some(hashes) = pending_removal.take() {
            events.push(PublishEvent::removed(hashes));
        }
        let token_ids: Vec<u32> = (0..tokens_per_chain)
            .map(|_| (rng.next() % 32_000) as u32)
            .collect();
        if i == 0 {
            // Something to query: `/query` with these token ids finds this worker.
            eprintln!("seq 0 stores token_ids {token_ids:?}");
        }
        let block_hashes: Vec<u64> = (0..args.blocks_per_store).map(|_| rng.next()).collect();
        let extra_keys = args.cache_salt.as_ref().map(|salt| {
            let mut first = Vec::new();
            if let Some(lora) = &args.lora_name {
                first.push(ExtraKeyValue::Str(lora.clone()));
            }
            first.push(ExtraKeyValue::Str(salt.clone()));
            let mut keys = vec![Some(first)];
            keys.resize(args.blocks_per_store as usize, None);
            keys
        });
        if args.remove_every > 0 && i % args.remove_every == 0 {
            pending_removal = Some(block_hashes.clone());
        }
        events.push(PublishEvent::Stored {
            block_hashes,
            parent_block_hash: None,
            token_ids,
            block_size: args.block_size,
            medium: Some("GPU".into()),
            lora_name: args.lora_name.clone(),
            extra_keys,
        });
        let batch = PublishBatch {
            ts: i as f64,
            events,
            dp_rank: Some(args.dp_rank),
            encoding,
            ..PublishBatch::default()
        };
        if args.unsent_every > 0 && i % args.unsent_every == args.unsent_every - 1 {
            let seq = publisher.publish_unsent(&batch);
            eprintln!("seq {seq}: kept for replay only");
        } else {
            publisher.publish(&batch).await?;
        }
        if args.kill_replay_after == Some(i + 1) {
            publisher.kill_replay();
            eprintln!("replay endpoint stopped");
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    if args.clear_at_end {
        publisher
            .publish(&PublishBatch::new(vec![PublishEvent::Cleared]).with_dp_rank(args.dp_rank))
            .await?;
    }
    eprintln!(
        "published {} batches; serving replays for {} s more",
        publisher.next_seq(),
        args.linger_s
    );
    // Keep serving replays so a lagging (or late) listener can catch up.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(args.linger_s)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
