//! Event messages from NATS (core or JetStream) into the index through the very path of
//! `POST /events`: subject → partition, payload → RouterEvents, [`submit_events`] (one log
//! record per message, in arrival order), then [`Submitted::finish`] (durable under `--fsync`
//! and applied). A batch of messages is submitted first and waited for second, so one fsync
//! covers many messages.
//!
//! * Payload: one RouterEvent or an array of them, JSON or named-field msgpack. A
//!   `Content-Type` header picks the format; without one, a payload starting with `{` or `[`
//!   (after whitespace) is JSON, anything else msgpack.
//! * Partition: the subject's `<model>.<group>`; a `Kvindex-Block-Size` header creates it when
//!   missing (like `POST /events?block_size=`). Unknown partition, wrong block size, bad
//!   subject or payload: the message is refused, counted in
//!   `kvindex_nats_messages_rejected_total{reason}` and logged.
//! * JetStream: every event of a message is logged with the tagged source sequence
//!   `TAG | epoch << 47 | stream_sequence` (the epoch names the stream's identity, see
//!   [`super::stream_epoch`]). The log keeps the exact set of these that are durable; a message
//!   whose sequence is in it, or at or below the epoch's handled floor, or logged by this
//!   process and not yet in that set ([`HandledSeqs`]), was handled already: it is
//!   acknowledged without being applied again, whatever its delivery count (a consumer created
//!   again delivers everything the stream retains as first deliveries).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use kvindex_engine::{NamespaceKey, RouterEvent};
use serde_json::json;

use super::metrics::{EVENTS_ACCEPTED, RECEIVED, REJECTED};
use crate::http::errors::ApiError;
use crate::http::events::{
    decode, format_of_media_type, submit_events, EventsAck, EventsTarget, Format, SourceSeq,
    Submitted,
};
use crate::http::AppState;
use crate::ingest::IngestError;
use crate::partitions::RegistryError;
use kvindex_persistence::{split_tagged, PersistError, TaggedSeqs};
use kvindex_server::nats_subjects::Subjects;

/// High bit marking a source sequence as a JetStream stream sequence (never an `event_id` or a
/// ZMQ sequence in practice), so ZMQ resumption ignores watermarks written by JetStream.
pub const JETSTREAM_SEQ_TAG: u64 = kvindex_persistence::SOURCE_SEQ_TAG;

/// Header that creates the subject's partition with this block size when it is missing.
pub const BLOCK_SIZE_HEADER: &str = "Kvindex-Block-Size";

/// Where a message came from (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Core,
    JetStream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Core => "core",
            Source::JetStream => "jetstream",
        }
    }
}

/// JetStream delivery facts of a message.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The tagged source sequence its events are logged with: `TAG | epoch << 47 |
    /// stream_sequence` ([`kvindex_persistence::tagged_source_seq`]).
    pub source_seq: u64,
    pub delivered: i64,
}

/// What the JetStream consumer knows it handled besides the log's durable set (which it also
/// checks, [`HandledSeqs::covers`]):
///
/// * the **handled floor** of the current epoch: every stream sequence at or below it was
///   handled (logged, or refused for good) and acknowledged. It is stored in
///   `jetstream-stream.json` before the durable set is pruned to it, so the messages the pruning
///   forgets are still recognised when a consumer created again delivers them;
/// * the sequences this process **logged** whose acknowledgement condition was met (the record
///   written; under `--fsync interval:<ms>` the durable set takes them in only at the next
///   fsync, so a redelivery arriving meanwhile — an ack wait that ran out, a lost ack — would be
///   applied a second time, possibly after newer events of the same worker). After a crash the
///   log's recovery rebuilds the durable set from what the log kept, which these are part of
///   unless the machine lost them too (then the acknowledged message is lost, as `interval`
///   allows, and a redelivery of it is applied).
///
/// The logged sequences are pruned with the durable set: to the current epoch, and above the
/// floor.
#[derive(Debug, Default)]
pub struct HandledSeqs {
    inner: Mutex<HandledInner>,
}

#[derive(Debug, Default)]
struct HandledInner {
    /// `(epoch, floor)`.
    floor: Option<(u16, u64)>,
    logged: TaggedSeqs,
}

impl HandledSeqs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandledInner> {
        // The data stays consistent whatever panicked while holding the lock (each change is
        // one call on it).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the message of tagged sequence `source_seq` was handled already: at or below the
    /// floor, logged by this process, or in the log's durable set.
    pub fn covers(&self, state: &AppState, source_seq: u64) -> bool {
        {
            let h = self.lock();
            let below_floor = match (h.floor, split_tagged(source_seq)) {
                (Some((epoch, floor)), Some((group, seq))) => group == epoch && seq <= floor,
                _ => false,
            };
            if below_floor || h.logged.contains(source_seq) {
                return true;
            }
        }
        state.durable.tagged_seq_durable(source_seq)
    }

    /// `source_seq` was logged and its acknowledgement condition met.
    pub fn record(&self, source_seq: u64) {
        self.lock().logged.insert(source_seq);
    }

    /// The handled floor of `epoch` (0: none known).
    pub fn floor(&self, epoch: u16) -> u64 {
        match self.lock().floor {
            Some((e, f)) if e == epoch => f,
            _ => 0,
        }
    }

    /// The handled floor of `epoch` is `floor` (stored): raise it (a floor of another epoch is
    /// replaced), and forget the logged sequences of other epochs and at or below it.
    pub fn set_floor(&self, epoch: u16, floor: u64) {
        let mut h = self.lock();
        let floor = match h.floor {
            Some((e, f)) if e == epoch => f.max(floor),
            _ => floor,
        };
        h.floor = Some((epoch, floor));
        h.logged.retain_above(epoch, floor);
    }
}

/// One event message, transport details stripped.
#[derive(Debug)]
pub struct Incoming {
    pub subject: String,
    pub content_type: Option<String>,
    pub block_size: Option<String>,
    pub payload: Bytes,
    pub delivery: Option<Delivery>,
}

impl Incoming {
    /// From a NATS message (core or the inner message of a JetStream one).
    pub fn from_message(m: &async_nats::Message, delivery: Option<Delivery>) -> Self {
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Self {
            subject: m.subject.to_string(),
            content_type: header("Content-Type"),
            block_size: header(BLOCK_SIZE_HEADER),
            payload: m.payload.clone(),
            delivery,
        }
    }
}

/// What became of a message.
#[derive(Debug)]
pub enum Outcome {
    /// Logged durably and applied.
    Accepted(EventsAck),
    /// A JetStream redelivery that is already durable, or a second copy of a message of the
    /// same batch (delivered twice): not applied again.
    Duplicate,
    /// Refused. `retry`: a failure on our side (the log), not the message's fault.
    Rejected {
        reason: &'static str,
        error: String,
        retry: bool,
    },
}

impl Outcome {
    /// The reply body for a request-style event message.
    pub fn reply_body(&self) -> Vec<u8> {
        let v = match self {
            Outcome::Accepted(ack) => {
                serde_json::to_value(ack).unwrap_or_else(|e| json!({"error": e.to_string()}))
            }
            Outcome::Duplicate => json!({"status": "ok", "accepted": 0, "duplicate": true}),
            Outcome::Rejected { error, .. } => json!({"error": error}),
        };
        v.to_string().into_bytes()
    }
}

fn rejected(reason: &'static str, error: impl ToString) -> Outcome {
    Outcome::Rejected {
        reason,
        error: error.to_string(),
        retry: false,
    }
}

/// The metric reason and retryability of an intake error.
fn classify(e: &ApiError) -> (&'static str, bool) {
    match e {
        ApiError::Registry(RegistryError::NoIndexer { .. })
        | ApiError::Ingest(IngestError::NoIndexer { .. }) => ("unknown_partition", false),
        ApiError::Registry(RegistryError::BlockSizeMismatch { .. })
        | ApiError::Ingest(IngestError::ZeroBlockSize { .. })
        | ApiError::ZeroBlockSize => ("block_size", false),
        // Retryable: a limit the operator can raise (`--max-event-partitions`,
        // `--max-partitions`), or that frees up when a worker registers (or a partition is
        // dropped); a JetStream message is then naked, not terminated.
        ApiError::Registry(
            RegistryError::PartitionLimit { .. } | RegistryError::TooManyPartitions { .. },
        ) => ("partition_limit", true),
        ApiError::Ingest(IngestError::Log(PersistError::RecordTooLarge { .. })) => {
            ("too_large", false)
        }
        ApiError::ReservedEventId { .. } => ("reserved_event_id", false),
        ApiError::Ingest(IngestError::Log(_)) | ApiError::Internal(_) => ("log", true),
        ApiError::Registry(
            RegistryError::File { .. }
            | RegistryError::Index(_)
            | RegistryError::DropNotLogged { .. },
        ) => ("log", true),
        _ => ("invalid", false),
    }
}

fn from_error(e: ApiError) -> Outcome {
    let (reason, retry) = classify(&e);
    Outcome::Rejected {
        reason,
        error: e.to_string(),
        retry,
    }
}

fn sniff(payload: &[u8]) -> Format {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') => Format::Json,
        _ => Format::Msgpack,
    }
}

/// Subject, headers and payload checked: the partition target and the events.
fn parse(
    subjects: &Subjects,
    m: &Incoming,
) -> Result<(NamespaceKey, EventsTarget, Vec<RouterEvent>), Outcome> {
    let key = subjects
        .parse_events(&m.subject)
        .map_err(|e| rejected("subject", e))?;
    let block_size = match &m.block_size {
        None => None,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(0) => {
                return Err(rejected(
                    "block_size",
                    format!(
                        "invalid {BLOCK_SIZE_HEADER} header {v:?}: {}",
                        ApiError::ZeroBlockSize
                    ),
                ))
            }
            Ok(bs) => Some(bs),
            Err(e) => {
                return Err(rejected(
                    "block_size",
                    format!("invalid {BLOCK_SIZE_HEADER} header {v:?}: {e}"),
                ))
            }
        },
    };
    let format = match &m.content_type {
        Some(ct) => format_of_media_type(ct).ok_or_else(|| {
            rejected(
                "decode",
                format!(
                    "unsupported Content-Type {ct:?} (application/json or application/msgpack)"
                ),
            )
        })?,
        None => sniff(&m.payload),
    };
    let events = decode(format, &m.payload).map_err(|e| rejected("decode", e))?;
    let target = EventsTarget {
        model_name: Some(key.model_name.clone()),
        routing_group: Some(key.routing_group.clone()),
        block_size,
    };
    Ok((key, target, events))
}

/// A JetStream message handled already, whatever its delivery count: its own stream sequence
/// is in the exact set of logged ones, or at or below the handled floor ([`HandledSeqs`]), so a
/// message overtaken by a newer one (a crash, a nak) is not taken for one already logged. Not
/// only redeliveries: a consumer created again (deleted, the data directory kept) delivers the
/// stream's messages anew, with a delivery count of 1. Without `handled` (a batch handled
/// outside the consumer), only the log's durable set.
fn already_handled(state: &AppState, handled: Option<&HandledSeqs>, d: Delivery) -> bool {
    match handled {
        Some(h) => h.covers(state, d.source_seq),
        None => state.durable.tagged_seq_durable(d.source_seq),
    }
}

enum Stage {
    Done(Outcome),
    Pending(Submitted),
    /// Another copy of the batch's message at this index (the same tagged source sequence:
    /// JetStream delivered it twice): not logged again, it shares that message's fate.
    SameAs(usize),
}

/// The outcome of a second copy of a message whose first copy had `first`: logged (or already
/// durable) → a duplicate; refused → refused alike.
fn outcome_of_copy(first: &Outcome) -> Outcome {
    match first {
        Outcome::Accepted(_) | Outcome::Duplicate => Outcome::Duplicate,
        Outcome::Rejected {
            reason,
            error,
            retry,
        } => Outcome::Rejected {
            reason,
            error: error.clone(),
            retry: *retry,
        },
    }
}

/// Log and apply a batch of messages in order (blocking: call from a blocking thread). One
/// outcome per message, in the same order. Counted in the `kvindex_nats_*` metrics and logged.
/// `handled`: the JetStream consumer's [`HandledSeqs`], checked for every message with a
/// stream sequence and told of each one logged.
pub fn process(
    state: &AppState,
    subjects: &Subjects,
    source: Source,
    batch: &[Incoming],
    handled: Option<&HandledSeqs>,
) -> Vec<Outcome> {
    let label = source.as_str();
    let mut stages = Vec::with_capacity(batch.len());
    // Tagged source sequence → index of its first copy in the batch. A message redelivered
    // while an earlier delivery of it is still in the batch is in neither the durable set
    // (not logged yet) nor to be logged twice.
    let mut first_copy: HashMap<u64, usize> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        metrics::counter!(RECEIVED, "source" => label).increment(1);
        if let Some(d) = m.delivery {
            if let Some(&first) = first_copy.get(&d.source_seq) {
                stages.push(Stage::SameAs(first));
                continue;
            }
            first_copy.insert(d.source_seq, i);
        }
        let stage = match parse(subjects, m) {
            Err(o) => Stage::Done(o),
            Ok((_key, target, events)) => {
                if m.delivery
                    .is_some_and(|d| already_handled(state, handled, d))
                {
                    Stage::Done(Outcome::Duplicate)
                } else {
                    let seq = match m.delivery {
                        Some(d) => SourceSeq::Fixed(d.source_seq),
                        None => SourceSeq::EventId,
                    };
                    match submit_events(state, &target, events, seq, None) {
                        Ok(s) => Stage::Pending(s),
                        Err(e) => Stage::Done(from_error(e)),
                    }
                }
            }
        };
        stages.push(stage);
    }
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(stages.len());
    for s in stages {
        let o = match s {
            Stage::Done(o) => o,
            Stage::Pending(s) => match s.finish(state) {
                Ok(ack) => Outcome::Accepted(ack),
                Err(e) => from_error(e),
            },
            // `first` is an earlier index: its outcome is known.
            Stage::SameAs(first) => outcomes.get(first).map_or_else(
                || Outcome::Rejected {
                    reason: "log",
                    error: "copy of a message not handled".into(),
                    retry: true,
                },
                outcome_of_copy,
            ),
        };
        outcomes.push(o);
    }
    for (m, o) in batch.iter().zip(&outcomes) {
        match o {
            Outcome::Accepted(ack) => {
                metrics::counter!(EVENTS_ACCEPTED, "source" => label)
                    .increment(ack.accepted as u64);
                // Its acknowledgement condition is met: a copy of it is a duplicate from now
                // on, even before the log's durable set takes it in (the next fsync).
                if let (Some(h), Some(d)) = (handled, m.delivery) {
                    h.record(d.source_seq);
                }
            }
            Outcome::Duplicate => {
                tracing::debug!(
                    subject = %m.subject,
                    delivered = m.delivery.map(|d| d.delivered),
                    "JetStream message already handled; not applied again"
                );
            }
            Outcome::Rejected {
                reason,
                error,
                retry,
            } => {
                metrics::counter!(REJECTED, "source" => label, "reason" => *reason).increment(1);
                if *retry {
                    tracing::error!(source = label, subject = %m.subject, %error, "NATS event message not logged");
                } else {
                    tracing::warn!(source = label, subject = %m.subject, reason = *reason, %error, "NATS event message refused");
                }
            }
        }
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_format_is_sniffed_when_no_content_type() {
        assert_eq!(sniff(b"  {\"a\":1}"), Format::Json);
        assert_eq!(sniff(b"\n[ ]"), Format::Json);
        assert_eq!(sniff(&[0x82, 0xa1]), Format::Msgpack);
        assert_eq!(sniff(&[0x91]), Format::Msgpack);
        assert_eq!(sniff(b""), Format::Msgpack);
    }

    #[test]
    fn subject_header_and_payload_errors_are_classified() {
        let subjects = Subjects::new("kvindex");
        let msg =
            |subject: &str, ct: Option<&str>, bs: Option<&str>, payload: &'static [u8]| Incoming {
                subject: subject.into(),
                content_type: ct.map(str::to_owned),
                block_size: bs.map(str::to_owned),
                payload: Bytes::from_static(payload),
                delivery: None,
            };
        let reason = |m: &Incoming| match parse(&subjects, m) {
            Err(Outcome::Rejected { reason, retry, .. }) => {
                assert!(!retry);
                reason
            }
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            reason(&msg("kvindex.events.m", None, None, b"{}")),
            "subject"
        );
        assert_eq!(
            reason(&msg("kvindex.events.m.g", None, None, b"{not json")),
            "decode"
        );
        assert_eq!(
            reason(&msg("kvindex.events.m.g", None, None, &[0xc1])),
            "decode"
        );
        assert_eq!(
            reason(&msg("kvindex.events.m.g", Some("text/plain"), None, b"{}")),
            "decode"
        );
        assert_eq!(
            reason(&msg("kvindex.events.m.g", None, Some("x"), b"[]")),
            "block_size"
        );
        assert_eq!(
            reason(&msg("kvindex.events.m.g", None, Some("0"), b"[]")),
            "block_size"
        );
        let ok = msg(
            "kvindex.events.m%2E1.g",
            Some("application/json"),
            Some("16"),
            b"[]",
        );
        let Ok((key, target, events)) = parse(&subjects, &ok) else {
            panic!("valid message refused")
        };
        assert_eq!(key, NamespaceKey::new("m.1", "g"));
        assert_eq!(target.block_size, Some(16));
        assert!(events.is_empty());
    }

    /// `Kvindex-Block-Size: 0` would create a partition of block size 0, which indexes
    /// nothing and keeps every later registration of its model out (409): refused, as
    /// `POST /events?block_size=0` is, and nothing is created. A message without events
    /// creates no partition either.
    #[test]
    fn a_zero_block_size_header_and_an_empty_message_create_no_partition() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::http::unregister_race::open(dir.path());
        let subjects = Subjects::new("kvindex");
        let msg = |bs: &str, payload: &'static [u8]| Incoming {
            subject: "kvindex.events.m.default".into(),
            content_type: Some("application/json".into()),
            block_size: Some(bs.into()),
            payload: Bytes::from_static(payload),
            delivery: None,
        };
        let event = serde_json::to_vec(&crate::test_support::one_block_store(7, 0, 1)).unwrap();
        let with_event = Incoming {
            payload: Bytes::from(event),
            ..msg("0", b"")
        };
        let outcomes = process(
            &state,
            &subjects,
            Source::Core,
            &[with_event, msg("0", b"[]")],
            None,
        );
        for o in &outcomes {
            match o {
                Outcome::Rejected {
                    reason,
                    error,
                    retry,
                } => {
                    assert_eq!(*reason, "block_size");
                    assert!(error.contains("at least 1"), "{error}");
                    assert!(!retry);
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        let outcomes = process(&state, &subjects, Source::Core, &[msg("16", b"[]")], None);
        assert!(
            matches!(&outcomes[..], [Outcome::Accepted(ack)] if ack.accepted == 0),
            "{outcomes:?}"
        );
        assert!(state.partitions.view().partitions.is_empty());
    }

    /// `Kvindex-Block-Size` creates partitions only up to `--max-event-partitions`
    /// partitions without a registered worker; past it the message is refused for good.
    #[test]
    fn events_create_partitions_only_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = crate::http::unregister_race::open(dir.path());
        std::sync::Arc::get_mut(&mut state)
            .expect("the only holder")
            .max_event_partitions = 1;
        let subjects = Subjects::new("kvindex");
        let event = serde_json::to_vec(&crate::test_support::one_block_store(7, 0, 1)).unwrap();
        let msg = |model: &str| Incoming {
            subject: format!("kvindex.events.{model}.default"),
            content_type: Some("application/json".into()),
            block_size: Some("4".into()),
            payload: Bytes::from(event.clone()),
            delivery: None,
        };
        let outcomes = process(
            &state,
            &subjects,
            Source::Core,
            &[msg("a"), msg("b"), msg("a")],
            None,
        );
        assert!(
            matches!(
                &outcomes[..],
                [
                    Outcome::Accepted(_),
                    Outcome::Rejected {
                        reason: "partition_limit",
                        retry: true,
                        ..
                    },
                    Outcome::Accepted(_)
                ]
            ),
            "{outcomes:?}"
        );
        assert_eq!(state.partitions.view().partitions.len(), 1);
    }

    /// A JetStream message of stream sequence 5 (epoch 1) with one store of `worker`,
    /// creating partition `m.default` (block size 4) if needed; `delivered`: its delivery count.
    fn copy_of_seq_5(worker: u64, delivered: i64) -> Incoming {
        let event = crate::test_support::one_block_store(worker, 0, 5);
        let source_seq =
            kvindex_persistence::tagged_source_seq(1, 5).expect("sequence 5 fits the layout");
        Incoming {
            subject: "kvindex.events.m.default".into(),
            content_type: Some("application/json".into()),
            block_size: Some("4".into()),
            payload: Bytes::from(serde_json::to_vec(&event).expect("an event serializes")),
            delivery: Some(Delivery {
                source_seq,
                delivered,
            }),
        }
    }

    /// JetStream delivered a message twice in one pull batch (a nak and an expired ack wait
    /// both queued it): the second copy is in neither the durable set (the first is not
    /// logged yet when it is seen) nor to be logged again. It shares the first copy's outcome
    /// (a duplicate of an accepted message) and the event is logged once. Without the
    /// grouping, both copies were logged and accepted.
    #[test]
    fn a_message_delivered_twice_in_one_batch_is_logged_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::http::unregister_race::open(dir.path());
        let subjects = Subjects::new("kvindex");
        let before = state.durable.log().next_lsn();
        let batch = [copy_of_seq_5(7, 1), copy_of_seq_5(7, 2)];
        let outcomes = process(&state, &subjects, Source::JetStream, &batch, None);
        assert!(
            matches!(&outcomes[..], [Outcome::Accepted(ack), Outcome::Duplicate] if ack.accepted == 1),
            "{outcomes:?}"
        );
        assert_eq!(
            state.durable.log().next_lsn() - before,
            1,
            "the event was logged once"
        );
        // Both copies were copies of one durable message: a later redelivery is a duplicate
        // too.
        let again = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 3)],
            None,
        );
        assert!(matches!(&again[..], [Outcome::Duplicate]), "{again:?}");
        assert_eq!(state.durable.log().next_lsn() - before, 1);
    }

    /// A consumer created again (deleted, the data directory kept) delivers the stream's
    /// messages anew with a delivery count of 1: one whose sequence is in the log's durable set
    /// is a duplicate all the same. (The check was skipped for first deliveries: logged and
    /// applied again.)
    #[test]
    fn a_first_delivery_already_in_the_log_is_not_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::http::unregister_race::open(dir.path());
        let subjects = Subjects::new("kvindex");
        let first = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 1)],
            None,
        );
        assert!(matches!(&first[..], [Outcome::Accepted(_)]), "{first:?}");
        let after = state.durable.log().next_lsn();
        for handled in [None, Some(&HandledSeqs::default())] {
            let again = process(
                &state,
                &subjects,
                Source::JetStream,
                &[copy_of_seq_5(7, 1)],
                handled,
            );
            assert!(matches!(&again[..], [Outcome::Duplicate]), "{again:?}");
        }
        assert_eq!(state.durable.log().next_lsn(), after, "not logged again");
    }

    /// The set of logged sequences forgets what is at or below the ack floor; the handled floor
    /// (stored with the epoch) still recognises those messages, whatever their delivery count,
    /// but only in its own epoch.
    #[test]
    fn a_message_at_or_below_the_handled_floor_is_not_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::http::unregister_race::open(dir.path());
        let subjects = Subjects::new("kvindex");
        let handled = HandledSeqs::default();
        handled.set_floor(1, 5);
        handled.set_floor(1, 3);
        let before = state.durable.log().next_lsn();
        let out = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 1)],
            Some(&handled),
        );
        assert!(matches!(&out[..], [Outcome::Duplicate]), "{out:?}");
        assert_eq!(state.durable.log().next_lsn(), before, "nothing logged");
        // The floor of another epoch says nothing of epoch 1's sequence 5.
        handled.set_floor(2, 10);
        let out = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 1)],
            Some(&handled),
        );
        assert!(matches!(&out[..], [Outcome::Accepted(_)]), "{out:?}");
    }

    /// Under `--fsync interval:<ms>` a message is acknowledged once written, and the log's
    /// durable set takes its sequence in only at the next fsync. A redelivery arriving
    /// meanwhile (an ack wait that ran out, a lost ack) is a duplicate all the same: the
    /// consumer's [`HandledSeqs`] holds what it logged. (It was applied a second time.)
    #[test]
    fn under_fsync_interval_a_redelivery_before_the_fsync_is_not_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = kvindex_persistence::DurableConfig::default();
        config.log.fsync =
            kvindex_persistence::FsyncPolicy::Interval(std::time::Duration::from_secs(3600));
        let state = crate::http::unregister_race::open_configured(
            dir.path(),
            config,
            std::sync::Arc::new(crate::listeners::NoListeners),
        );
        let subjects = Subjects::new("kvindex");
        let handled = HandledSeqs::default();
        handled.set_floor(1, 0);
        let first = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 1)],
            Some(&handled),
        );
        assert!(matches!(&first[..], [Outcome::Accepted(_)]), "{first:?}");
        let seq = kvindex_persistence::tagged_source_seq(1, 5).expect("fits");
        assert!(
            !state.durable.tagged_seq_durable(seq),
            "written, not yet synced: not in the durable set"
        );
        let after = state.durable.log().next_lsn();
        let again = process(
            &state,
            &subjects,
            Source::JetStream,
            &[copy_of_seq_5(7, 2)],
            Some(&handled),
        );
        assert!(matches!(&again[..], [Outcome::Duplicate]), "{again:?}");
        assert_eq!(state.durable.log().next_lsn(), after, "not logged again");
        // Pruned with the durable set: at or below the floor it is the floor that tells.
        handled.set_floor(1, 5);
        assert!(handled.covers(&state, seq));
        assert!(handled.lock().logged.is_empty());
    }

    /// The second copy of a refused message is refused alike (retryable or not): it is the same
    /// message.
    #[test]
    fn a_copy_of_a_refused_message_is_refused_alike() {
        let first = Outcome::Rejected {
            reason: "log",
            error: "disk full".into(),
            retry: true,
        };
        assert!(matches!(
            outcome_of_copy(&first),
            Outcome::Rejected {
                reason: "log",
                retry: true,
                ..
            }
        ));
        assert!(matches!(
            outcome_of_copy(&Outcome::Duplicate),
            Outcome::Duplicate
        ));
    }

    #[test]
    fn log_failures_are_retryable_and_partition_errors_are_not() {
        let e = ApiError::Registry(RegistryError::NoIndexer {
            model: "m".into(),
            group: "g".into(),
        });
        assert_eq!(classify(&e), ("unknown_partition", false));
        let e = ApiError::Ingest(IngestError::Log(PersistError::EmptyBatch));
        assert_eq!(classify(&e), ("log", true));
        // `Kvindex-Block-Size` would create the partition, but the drop of its previous one
        // still cannot be logged: a log failure, redelivered (JetStream) once it may work.
        let e = ApiError::Registry(RegistryError::DropNotLogged {
            model: "m".into(),
            group: "g".into(),
            reason: "disk full".into(),
        });
        assert_eq!(classify(&e), ("log", true));
    }
}
