//! The durable JetStream consumer: pulls event messages from the configured stream, logs them
//! through [`intake::process`] and acknowledges each one only after it is durable in our log
//! (at-least-once). A bad message is terminated (`term`: never redelivered) and counted; a log
//! failure is `nak`ed so the message comes back later. A stream or consumer that cannot be set
//! up (server down, wrong stream subjects) is retried with backoff and logged.
//!
//! Errors on the way are logged and counted in `kvindex_nats_jetstream_errors_total{stage}`:
//! `setup` (stream or consumer not ready), `pull` (the pull stream reported an error instead of
//! a message), `info` (a message without a parsable `$JS.ACK` reply subject: it is logged and
//! applied like a core NATS message, without the stream sequence, so a redelivery of it cannot
//! be recognised as durable; also a stream sequence too large for the tagged layout, past
//! 2^47 - 1), `ack` (an acknowledgement not sent: the message is redelivered after the ack
//! wait, and recognised as durable when it was logged), `floor` (the consumer's ack floor could
//! not be read, or not stored as the handled floor: the set of logged sequences is pruned at
//! the next try), `identity` (the stored stream identity unreadable or damaged: a new epoch is
//! used).
//!
//! Deduplication: the log keeps the exact set of JetStream sequences it holds, tagged with the
//! stream's epoch ([`super::stream_epoch`]); at setup the stream's identity picks the epoch
//! (a new one when the log holds a sequence of it, or its handled floor is, past the stream's
//! last one: a stream restored from a backup), the identity is read again once the consumer
//! exists, and the set is pruned of other epochs and of sequences at or below the consumer's
//! ack floor (JetStream never redelivers those), at setup and every [`PRUNE_EVERY`] (then to
//! the floor read one period earlier, so that a copy already delivered is still recognised),
//! when the identity is checked again too (a change sets the consumer up again). That periodic
//! check runs when a pull brings something once the period has elapsed, before that batch is
//! handled: a stream re-created while the consumer was idle for the period has none of its
//! messages logged under the old stream's epoch (the batch is given back, and redelivered to
//! the consumer set up again). A re-creation less than a period after the last check can still
//! have one period's messages logged under the old epoch (best effort; a deleted stream usually
//! takes its consumer along, whose pulls then fail and set the consumer up again at once).
//!
//! Before the set is pruned to a floor, the floor is stored with the epoch
//! (`jetstream-stream.json`) as the *handled floor* ([`advance_floor`]): a consumer deleted and
//! created again (the data directory kept) delivers the whole stream anew, with delivery counts
//! of 1, and the pruned set (and the snapshots taken of it) no longer knows those messages. A
//! consumer kvindex creates starts after the handled floor ([`deliver_policy`]), and a message
//! at or below it (a consumer created by someone else, delivering all) is acknowledged as a
//! duplicate. Every message is checked, whatever its delivery count; besides the durable set
//! and the floor, against the sequences this process logged that the durable set does not hold
//! yet ([`HandledSeqs`]: under `--fsync interval` the set takes them in at the next fsync,
//! after their ack).
//!
//! A log failure naks a message; copies of one stream sequence in a batch (a message delivered
//! twice) get a single nak, on the latest copy: each nak queues a redelivery.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::Client;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::intake::{self, Delivery, HandledSeqs, Incoming, Outcome, Source};
use super::metrics::{JS_ACKS, JS_DEDUP_RANGES, JS_ERRORS, SUBSCRIPTION_UP};
use super::stream_epoch::{self, Epoch, EpochError, LoggedEpochs, StreamIdentity};
use super::{backoff, stopped, stopping, TestHold};
use crate::config::JetStreamConfig;
use crate::http::SharedState;
use kvindex_persistence::tagged_source_seq;
use kvindex_server::nats_subjects::Subjects;

/// Messages handled per log group commit, at most.
const BATCH: usize = 256;
/// Messages asked for per pull request (async-nats' default for `Consumer::messages`, made
/// explicit because the client's subscription buffer, [`super::connect::SUBSCRIPTION_CAPACITY`],
/// must hold what is in flight: the client asks for the next batch once half of one is
/// delivered, so at most 1.5 batches), capped at the consumer's `max_batch` as the client does.
pub(super) const PULL_BATCH: usize = 200;
/// Idle heartbeat of the pull requests (async-nats' default for `Consumer::messages`; the
/// client lowers it to half the request expiry if needed).
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);
/// Delay before a `nak`ed message (log failure) is redelivered.
const NAK_DELAY: Duration = Duration::from_secs(5);
/// Pull errors in a row, with no message between them, after which the consumer is set up
/// again. The client's message stream does not end when the server lost the stream and the
/// consumer (a restart with memory storage or a new volume): it yields errors for good
/// ("stream not found", then a missed heartbeat every 30 s). The first error is the clear
/// one, and setting up again after a transient error costs one consumer lookup, so one is
/// enough.
const MAX_PULL_ERRORS_IN_A_ROW: u32 = 1;
/// How long giving messages back waits for them to be flushed to the server.
const GIVE_BACK_FLUSH: Duration = Duration::from_secs(2);
/// How often the set of logged sequences is pruned below the consumer's ack floor.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// A consumer ready to pull, its stream, and the identity and epoch it was set up with.
struct Ready {
    consumer: consumer::PullConsumer,
    stream: stream::Stream,
    identity: StreamIdentity,
    epoch: u16,
}

/// The stream's identity as it is now (a re-created stream has another creation time) and its
/// last sequence.
async fn identity_of(stream: &stream::Stream, name: &str) -> Result<(StreamIdentity, u64), String> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| format!("stream {name} info: {e}"))?;
    Ok((
        StreamIdentity {
            stream: name.to_owned(),
            created_ns: info.created.unix_timestamp_nanos().to_string(),
        },
        info.state.last_sequence,
    ))
}

/// Run an epoch file operation (file I/O with an fsync) off the async workers.
async fn epoch_io<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EpochError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
}

async fn setup(
    client: &Client,
    cfg: &JetStreamConfig,
    subjects: &Subjects,
    state: &SharedState,
    handled: &HandledSeqs,
) -> Result<Ready, String> {
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: vec![subjects.events_wildcard()],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", cfg.stream))?;
    let (identity, last_sequence) = identity_of(&stream, &cfg.stream).await?;
    let dir = state.durable.log().dir().to_path_buf();
    let logged = LoggedEpochs {
        in_use: state.durable.tagged_groups(),
        recovered_max: state.durable.recovered_max_tagged_group(),
    };
    let (d, id, l) = (dir.clone(), identity.clone(), logged.clone());
    let mut current = epoch_io(move || stream_epoch::epoch_for(&d, &id, &l))
        .await
        .map_err(|e| format!("stream {} epoch: {e}", cfg.stream))?;
    // The same identity, but the log holds a sequence of its epoch the stream has not reached,
    // or the handled floor is past it: the stream was restored (from a backup: same creation
    // time) and numbers its messages again from an older last sequence. Its messages must not
    // be taken for the logged ones.
    let last_logged = state.durable.tagged_last(current.epoch);
    if stream_epoch::sequences_reused(last_logged, current.floor, last_sequence) {
        tracing::warn!(
            stream = %cfg.stream,
            epoch = current.epoch,
            last_logged,
            handled_floor = current.floor,
            last_sequence,
            "the log holds stream sequences past the stream's last one (restored from a backup?): a new epoch is used"
        );
        let (d, id) = (dir.clone(), identity.clone());
        current =
            epoch_io(move || stream_epoch::new_epoch(&d, &id, &logged, "stream sequences reused"))
                .await
                .map_err(|e| format!("stream {} epoch: {e}", cfg.stream))?;
    }
    let consumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            consumer::pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: deliver_policy(current.floor),
                filter_subject: subjects.events_wildcard(),
                ack_wait: cfg.ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {} on stream {}: {e}", cfg.consumer, cfg.stream))?;
    // Re-created between the info read and the consumer: the epoch (and the consumer's ack
    // floor) would belong to another stream. Set up again.
    let (now, _) = identity_of(&stream, &cfg.stream).await?;
    if now != identity {
        // Created just now on the new stream, it would start after the old stream's floor and
        // skip the new stream's first messages for good: deleted, to be created again under
        // the new stream's epoch.
        if created_from_floor(&consumer.cached_info().config.deliver_policy, current.floor) {
            if let Err(e) = stream.delete_consumer(&cfg.consumer).await {
                tracing::warn!(
                    stream = %cfg.stream,
                    consumer = %cfg.consumer,
                    error = %e,
                    "consumer created from the floor of the stream's previous identity not deleted; delete it so that the new stream is consumed from its start"
                );
            }
        }
        return Err(format!(
            "stream {} was re-created during the consumer setup (created {} then {})",
            cfg.stream, identity.created_ns, now.created_ns
        ));
    }
    let Epoch { epoch, floor } = current;
    // The messages handled before (at or below the stored floor) are recognised from here on,
    // even if this consumer (created again) delivers them.
    handled.set_floor(epoch, floor);
    advance_floor(
        state,
        handled,
        &identity,
        epoch,
        consumer.cached_info().ack_floor.stream_sequence,
    )
    .await;
    Ok(Ready {
        consumer,
        stream,
        identity,
        epoch,
    })
}

/// Where a consumer kvindex creates starts: after the epoch's handled floor (everything at or
/// below it was handled, and acknowledged by a consumer since deleted), or at the stream's
/// first message.
fn deliver_policy(handled_floor: u64) -> consumer::DeliverPolicy {
    if handled_floor == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: handled_floor.saturating_add(1),
        }
    }
}

/// Whether a consumer of deliver policy `policy` starts where [`deliver_policy`] starts one
/// after the handled floor `handled_floor` (a consumer created from it).
fn created_from_floor(policy: &consumer::DeliverPolicy, handled_floor: u64) -> bool {
    handled_floor > 0 && *policy == deliver_policy(handled_floor)
}

/// Every message at or below `ack_floor` was handled: store it as the epoch's handled floor
/// (when above the stored one), then prune the set of logged sequences and `handled` to it.
/// Stored first: the set (and the snapshots taken of it) forgets those sequences, and the
/// stored floor is what still recognises them when a consumer created again delivers them. If
/// it cannot be stored (counted as a `floor` error, logged) nothing is pruned below the floor
/// stored before; tried again at the next check.
async fn advance_floor(
    state: &SharedState,
    handled: &HandledSeqs,
    identity: &StreamIdentity,
    epoch: u16,
    ack_floor: u64,
) {
    let dir = state.durable.log().dir().to_path_buf();
    let id = identity.clone();
    match epoch_io(move || stream_epoch::raise_floor(&dir, &id, epoch, ack_floor)).await {
        Ok(_) => handled.set_floor(epoch, ack_floor),
        Err(e) => {
            count_error(ErrorStage::Floor);
            tracing::warn!(
                stream = %identity.stream,
                epoch,
                ack_floor,
                error = %e,
                "JetStream handled floor not stored; logged sequences pruned later"
            );
        }
    }
    prune(state, epoch, handled.floor(epoch));
}

/// [`PULL_BATCH`], capped at the consumer's `max_batch` (0 or less: no cap; a pull request
/// above it is refused with `409 Exceeded MaxRequestBatch`).
fn pull_batch(max_batch: i64) -> usize {
    match usize::try_from(max_batch) {
        Ok(max) if max > 0 => PULL_BATCH.min(max),
        _ => PULL_BATCH,
    }
}

/// Forget the logged sequences the handled floor covers: those of other epochs, and those at
/// or below `handled_floor` (stored: every message there is acknowledged or terminated).
fn prune(state: &SharedState, epoch: u16, handled_floor: u64) {
    let ranges = state.durable.prune_tagged_seqs(epoch, handled_floor);
    metrics::gauge!(JS_DEDUP_RANGES).set(ranges as f64);
}

/// Periodic check: the stream is still the one set up (else `false`: set the consumer up
/// again, under the new identity's epoch), then [`advance_floor`] to the ack floor read at the
/// previous check (`floor`, which becomes the current one). Not the current floor: a copy of
/// a message redelivered before its first copy's ack moved the floor past it may still sit in
/// the client's buffer or the batch about to be handled, and must still be found in the set;
/// one period later it has been handled.
async fn check_and_prune(
    state: &SharedState,
    handled: &HandledSeqs,
    ready: &Ready,
    floor: &mut Option<u64>,
) -> bool {
    match identity_of(&ready.stream, &ready.identity.stream).await {
        Ok((now, _)) if now != ready.identity => {
            tracing::warn!(
                stream = %ready.identity.stream,
                was = %ready.identity.created_ns,
                now = %now.created_ns,
                "JetStream stream re-created; setting the consumer up again"
            );
            return false;
        }
        Ok(_) => {}
        Err(e) => {
            count_error(ErrorStage::Floor);
            tracing::warn!(error = %e, "JetStream stream info not read; checked again later");
            return true;
        }
    }
    match ready.consumer.get_info().await {
        Ok(info) => {
            if let Some(previous) = lagged_floor(floor, info.ack_floor.stream_sequence) {
                advance_floor(state, handled, &ready.identity, ready.epoch, previous).await;
            }
        }
        Err(e) => {
            count_error(ErrorStage::Floor);
            tracing::warn!(error = %e, "JetStream consumer info not read; logged sequences pruned later");
        }
    }
    true
}

/// The floor to prune to once `read` was read: the one read at the previous check (none at
/// the first), `read` kept for the next one.
fn lagged_floor(floor: &mut Option<u64>, read: u64) -> Option<u64> {
    floor.replace(read)
}

fn count_ack(kind: &'static str) {
    metrics::counter!(JS_ACKS, "kind" => kind).increment(1);
}

/// Where a JetStream error happened (the `stage` label of [`JS_ERRORS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorStage {
    Setup,
    Pull,
    Info,
    Ack,
    Floor,
}

impl ErrorStage {
    fn as_str(self) -> &'static str {
        match self {
            ErrorStage::Setup => "setup",
            ErrorStage::Pull => "pull",
            ErrorStage::Info => "info",
            ErrorStage::Ack => "ack",
            ErrorStage::Floor => "floor",
        }
    }
}

fn count_error(stage: ErrorStage) {
    metrics::counter!(JS_ERRORS, "stage" => stage.as_str()).increment(1);
}

/// The delivery facts of `m`, or `None` (counted and logged) when its reply subject is not a
/// parsable `$JS.ACK` subject or its stream sequence does not fit the tagged layout: it is then
/// handled like a core NATS message (logged with its events' ids rather than refused for the
/// missing info, so its data is not lost), and a redelivery of it cannot be recognised as
/// already durable.
fn delivery_of(m: &jetstream::Message, epoch: u16) -> Option<Delivery> {
    match m.info() {
        Ok(i) => match tagged_source_seq(epoch, i.stream_sequence) {
            Some(source_seq) => Some(Delivery {
                source_seq,
                delivered: i.delivered,
            }),
            None => {
                count_error(ErrorStage::Info);
                tracing::warn!(
                    subject = %m.subject,
                    stream_sequence = i.stream_sequence,
                    "JetStream stream sequence past 2^47 - 1; handled like a core NATS message (no redelivery deduplication)"
                );
                None
            }
        },
        Err(e) => {
            count_error(ErrorStage::Info);
            tracing::warn!(
                subject = %m.subject,
                reply = m.reply.as_deref().unwrap_or("<none>"),
                error = %e,
                "JetStream message without delivery info; handled like a core NATS message (no redelivery deduplication)"
            );
            None
        }
    }
}

/// The acknowledgement a handled message gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// Logged and applied.
    Ack,
    /// Already durable (or another copy of a message of the batch): acknowledged, not applied.
    Duplicate,
    /// Refused for good: never redelivered.
    Term,
    /// Not logged (our failure): redelivered after [`NAK_DELAY`].
    Nak,
}

impl Reply {
    fn kind(self) -> AckKind {
        match self {
            Reply::Ack | Reply::Duplicate => AckKind::Ack,
            Reply::Term => AckKind::Term,
            Reply::Nak => AckKind::Nak(Some(NAK_DELAY)),
        }
    }

    /// The `kind` label of [`JS_ACKS`].
    fn label(self) -> &'static str {
        match self {
            Reply::Ack => "ack",
            Reply::Duplicate => "duplicate",
            Reply::Term => "term",
            Reply::Nak => "nak",
        }
    }
}

/// The reply to each message of a batch (stream sequences `seqs`, `None` when unknown) after
/// its outcome. A nak queues a redelivery, so a message held twice in the batch (delivered
/// twice: both copies are refused alike) gets one nak, on its latest copy, as in
/// [`give_back`]; its other copies get no reply (`None`). Acks and terms are sent to every
/// copy: they queue nothing.
fn replies(seqs: &[Option<u64>], outcomes: &[Outcome]) -> Vec<Option<Reply>> {
    let mut naked = std::collections::HashSet::new();
    let mut replies: Vec<Option<Reply>> = seqs
        .iter()
        .zip(outcomes)
        .rev()
        .map(|(seq, o)| match o {
            Outcome::Accepted(_) => Some(Reply::Ack),
            Outcome::Duplicate => Some(Reply::Duplicate),
            Outcome::Rejected { retry: false, .. } => Some(Reply::Term),
            Outcome::Rejected { retry: true, .. } => {
                seq.is_none_or(|s| naked.insert(s)).then_some(Reply::Nak)
            }
        })
        .collect();
    replies.reverse();
    replies
}

/// What became of a batch.
enum Handled {
    /// Logged, applied and acknowledged (or left to the ack wait): go on.
    Done,
    /// Shutdown came during a test hold: stop; these messages were not handled and are to be
    /// given back once unsubscribed ([`give_back`]).
    Stopped(Vec<jetstream::Message>),
}

/// Log, apply and acknowledge one batch.
async fn handle(
    state: &SharedState,
    subjects: &Arc<Subjects>,
    handled: &Arc<HandledSeqs>,
    hold: TestHold,
    shutdown: &mut watch::Receiver<bool>,
    epoch: u16,
    messages: Vec<jetstream::Message>,
) -> Handled {
    let batch: Vec<Incoming> = messages
        .iter()
        .map(|m| Incoming::from_message(&m.message, delivery_of(m, epoch)))
        .collect();
    if hold == TestHold::BeforeLog
        && !hold_until_shutdown("before_log", batch.len(), shutdown).await
    {
        return Handled::Stopped(messages);
    }
    let (st, subj, h) = (Arc::clone(state), Arc::clone(subjects), Arc::clone(handled));
    let outcomes = match tokio::task::spawn_blocking(move || {
        intake::process(&st, &subj, Source::JetStream, &batch, Some(&h))
    })
    .await
    {
        Ok(o) => o,
        Err(e) => {
            // Nothing acknowledged: JetStream redelivers after the ack wait.
            tracing::error!(error = %e, "JetStream batch processing failed");
            return Handled::Done;
        }
    };
    if hold == TestHold::BeforeAck
        && !hold_until_shutdown("before_ack", messages.len(), shutdown).await
    {
        // Logged, not acknowledged: left to the ack wait (the test kills the process here).
        return Handled::Stopped(Vec::new());
    }
    let seqs: Vec<Option<u64>> = messages
        .iter()
        .map(|m| m.info().ok().map(|i| i.stream_sequence))
        .collect();
    for (m, reply) in messages.iter().zip(replies(&seqs, &outcomes)) {
        let Some(reply) = reply else { continue };
        let label = reply.label();
        match m.ack_with(reply.kind()).await {
            Ok(()) => count_ack(label),
            // Redelivered after the ack wait; a logged one is then recognised as durable.
            Err(e) => {
                count_error(ErrorStage::Ack);
                tracing::warn!(subject = %m.subject, kind = label, error = %e, "JetStream acknowledgement not sent");
            }
        }
    }
    Handled::Done
}

/// Give messages that will not be handled back to the server at once (a nak without delay), so
/// that they are redelivered before anything newer instead of after the ack wait (which would
/// apply them late, after newer messages of the same worker, or refuse a newer message that
/// needs the partition an older one creates). Best effort: a failed nak leaves them to the
/// ack wait.
///
/// Call it only once the pull subscription is dropped (unsubscribed): the server redelivers a
/// nak'd message at once to a pull request with interest, and while we are still subscribed
/// that is ours, which is going away: the redelivery would be lost in it and wait for the ack
/// wait after all. The unsubscribe goes out first on the same connection, so the server has
/// no interest of ours left when the naks arrive. Then flush, so the naks reach the server
/// before the process exits (publishes are buffered).
async fn give_back(client: &Client, messages: &[jetstream::Message]) {
    if messages.is_empty() {
        return;
    }
    // One nak per stream sequence, for its latest delivery: a message redelivered after its
    // ack wait may be held twice, and each nak queues a redelivery.
    let mut seen = std::collections::HashSet::new();
    let mut latest: Vec<&jetstream::Message> = messages
        .iter()
        .rev()
        .filter(|m| m.info().map_or(true, |i| seen.insert(i.stream_sequence)))
        .collect();
    latest.reverse();
    for m in latest {
        match m.ack_with(AckKind::Nak(None)).await {
            Ok(()) => count_ack("returned"),
            Err(e) => {
                count_error(ErrorStage::Ack);
                tracing::warn!(subject = %m.subject, error = %e, "JetStream message not given back");
            }
        }
    }
    match tokio::time::timeout(GIVE_BACK_FLUSH, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            count_error(ErrorStage::Ack);
            tracing::warn!(error = %e, "JetStream messages given back, flush failed; they may wait for the ack wait");
        }
        Err(_) => {
            count_error(ErrorStage::Ack);
            tracing::warn!(
                "JetStream messages given back, flush timed out; they may wait for the ack wait"
            );
        }
    }
}

/// Test hook (`KVINDEX_TEST_NATS_HOLD`): stop here until shutdown, so a test can kill the
/// process between JetStream delivery and the log append / the ack.
async fn hold_until_shutdown(point: &str, n: usize, shutdown: &mut watch::Receiver<bool>) -> bool {
    tracing::warn!(messages = n, "test hold {point}: JetStream messages held");
    stopped(shutdown).await;
    false
}

/// Consume until shutdown.
pub async fn run(
    client: Client,
    cfg: JetStreamConfig,
    subjects: Arc<Subjects>,
    state: SharedState,
    hold: TestHold,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    // Kept across setups: what this process logged stays recognised under the same epoch.
    let handled = Arc::new(HandledSeqs::default());
    while !stopping(&shutdown) {
        let consumer = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            c = setup(&client, &cfg, &subjects, &state, &handled) => c,
        };
        let messages = match consumer {
            Ok(r) => {
                let batch = pull_batch(r.consumer.cached_info().config.max_batch);
                r.consumer
                    .stream()
                    .max_messages_per_batch(batch)
                    .heartbeat(PULL_HEARTBEAT)
                    .messages()
                    .await
                    .map(|m| (m, r))
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        let (messages, ready) = match messages {
            Ok(m) => m,
            Err(e) => {
                count_error(ErrorStage::Setup);
                attempt += 1;
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "JetStream consumer not ready");
                tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        attempt = 0;
        tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, "JetStream durable consumer started");
        metrics::gauge!(SUBSCRIPTION_UP, "subscription" => "jetstream").set(1.0);
        let mut chunks = Box::pin(messages.ready_chunks(BATCH));
        let mut errors_in_a_row = 0u32;
        let mut pruned_at = tokio::time::Instant::now();
        // The ack floor read at the last periodic check (see `check_and_prune`).
        let mut floor = None;
        let mut unhandled = Vec::new();
        loop {
            let chunk = tokio::select! {
                _ = stopped(&mut shutdown) => None,
                c = chunks.next() => c,
            };
            let Some(chunk) = chunk else { break };
            let mut batch = Vec::with_capacity(chunk.len());
            for r in chunk {
                match r {
                    Ok(m) => {
                        errors_in_a_row = 0;
                        batch.push(m);
                    }
                    Err(e) => {
                        errors_in_a_row += 1;
                        count_error(ErrorStage::Pull);
                        tracing::warn!(error = %e, errors_in_a_row, "JetStream pull failed");
                    }
                }
            }
            // The stream's identity is checked before the batch is handled: a stream
            // re-created while the consumer was idle must not have its first messages logged
            // under the old stream's epoch. A changed identity gives the batch back (after
            // unsubscribing, below) and sets the consumer up again under the new epoch.
            if pruned_at.elapsed() >= PRUNE_EVERY {
                pruned_at = tokio::time::Instant::now();
                if !check_and_prune(&state, &handled, &ready, &mut floor).await {
                    unhandled = batch;
                    break;
                }
            }
            if !batch.is_empty() {
                if let Handled::Stopped(not_handled) = handle(
                    &state,
                    &subjects,
                    &handled,
                    hold,
                    &mut shutdown,
                    ready.epoch,
                    batch,
                )
                .await
                {
                    unhandled = not_handled;
                    break;
                }
            }
            if errors_in_a_row >= MAX_PULL_ERRORS_IN_A_ROW {
                tracing::warn!(
                    errors_in_a_row,
                    "JetStream pulls keep failing: the server may have lost the consumer"
                );
                break;
            }
        }
        // Shutdown or a consumer set up again: what the client already received is given back
        // rather than left to the ack wait — after unsubscribing (see `give_back`). (Bounded: a
        // stream yielding ready errors must not hold shutdown.)
        for _ in 0..64 {
            let Some(Some(rest)) = chunks.next().now_or_never() else {
                break;
            };
            unhandled.extend(rest.into_iter().filter_map(Result::ok));
        }
        drop(chunks);
        give_back(&client, &unhandled).await;
        metrics::gauge!(SUBSCRIPTION_UP, "subscription" => "jetstream").set(0.0);
        if !stopping(&shutdown) {
            tracing::warn!("JetStream message stream ended; setting the consumer up again");
            tokio::select! {
                _ = stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(backoff(1)) => {}
            }
        }
    }
    tracing::info!("JetStream consumer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pull_batch_is_capped_at_the_consumers_max_batch() {
        assert_eq!(pull_batch(0), PULL_BATCH);
        assert_eq!(pull_batch(-1), PULL_BATCH);
        assert_eq!(pull_batch(50), 50);
        assert_eq!(pull_batch(10_000), PULL_BATCH);
    }

    fn refused(retry: bool) -> Outcome {
        Outcome::Rejected {
            reason: if retry { "log" } else { "decode" },
            error: "refused".into(),
            retry,
        }
    }

    /// A consumer kvindex creates starts after the handled floor; with none, at the first
    /// message of the stream.
    #[test]
    fn a_created_consumer_starts_after_the_handled_floor() {
        assert_eq!(deliver_policy(0), consumer::DeliverPolicy::All);
        assert_eq!(
            deliver_policy(41),
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 42 }
        );
        // A stream re-created during the setup: only a consumer started from the floor is
        // taken for one created from it (and deleted).
        assert!(created_from_floor(&deliver_policy(41), 41));
        assert!(!created_from_floor(&deliver_policy(41), 40));
        assert!(!created_from_floor(&consumer::DeliverPolicy::All, 41));
        assert!(!created_from_floor(&consumer::DeliverPolicy::All, 0));
    }

    /// The periodic pruning lags one check behind the ack floor: a copy delivered before the
    /// floor moved past its sequence is still recognised while it is handled.
    #[test]
    fn pruning_uses_the_ack_floor_of_the_previous_check() {
        let mut floor = None;
        assert_eq!(
            lagged_floor(&mut floor, 10),
            None,
            "nothing pruned at the first check"
        );
        assert_eq!(lagged_floor(&mut floor, 25), Some(10));
        assert_eq!(lagged_floor(&mut floor, 25), Some(25));
    }

    /// Copies of one stream sequence refused for retry get one nak between them, on the
    /// latest copy: each nak would queue a redelivery. Other replies go to every copy.
    #[test]
    fn a_message_held_twice_and_refused_for_retry_is_naked_once() {
        let seqs = [
            Some(5),
            Some(6),
            Some(5),
            None,
            None,
            Some(7),
            Some(7),
            Some(5),
        ];
        let outcomes = [
            refused(true),
            refused(true),
            refused(true),
            refused(true),
            refused(true),
            refused(false),
            refused(false),
            refused(true),
        ];
        assert_eq!(
            replies(&seqs, &outcomes),
            [
                None,
                Some(Reply::Nak),
                None,
                // Without a sequence the copies cannot be told apart: each is naked.
                Some(Reply::Nak),
                Some(Reply::Nak),
                Some(Reply::Term),
                Some(Reply::Term),
                Some(Reply::Nak),
            ]
        );
        let outcomes = [
            Outcome::Duplicate,
            refused(true),
            Outcome::Duplicate,
            refused(true),
        ];
        assert_eq!(
            replies(&[Some(1), Some(2), Some(1), Some(3)], &outcomes),
            [
                Some(Reply::Duplicate),
                Some(Reply::Nak),
                Some(Reply::Duplicate),
                Some(Reply::Nak),
            ]
        );
    }
}
