//! A frame- and message-size guard between a publisher and our ZMQ sockets.
//!
//! Why: the `zeromq` crate (0.7) trusts the 64-bit length of a ZMTP frame header and reserves
//! that many bytes for the frame at once; it has no maximum-message-size option. A publisher
//! (or anything at a registered endpoint: `POST /register` takes any host) announcing a frame of
//! 2^62 bytes makes that allocation fail, and Rust aborts the process on a failed allocation;
//! announcing tens of gigabytes makes the process reserve them. The crate also keeps appending
//! frames to one multipart message for as long as they carry the MORE flag: 128 frames of
//! 16 MiB, each under any per-frame limit, are one 2 GiB message held in memory. So our sockets
//! never connect to a publisher directly: they connect to a loopback port of this guard, which
//! connects onward (tcp or ipc) and passes bytes through both ways, reading the frame headers
//! of what the publisher sends. A frame announced longer than the limit, or a frame that would
//! take its multipart message past the message limits ([`MessageLimits`]: bytes of all its
//! frames together, number of frames), closes both connections before its body arrives; each
//! is counted in `kvindex_zmq_oversized_frames_total{reason}` ([`Oversized::label`]), logged,
//! and recorded as the guard's error ([`Guard::take_error`]). The SUB socket reconnects as
//! after any dropped connection (and a DEALER's replay attempt fails). Our own frames (the
//! subscription, replay requests) are passed through unread.

use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Counter: connections closed because the publisher sent a frame or a multipart message over
/// the limits, by `reason` ([`Oversized::label`]: `frame`, `message_bytes`, `message_frames`).
pub const METRIC_OVERSIZED_FRAMES: &str = "kvindex_zmq_oversized_frames_total";

/// Default limit of one message from a publisher, all its frames together (and so of any one
/// frame): far above a real batch (a stored event of a 128k-token prefill is under 1 MiB of
/// msgpack), far below what can hurt the process.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 20;

/// Default limit of the frames of one message. vLLM and SGLang send 3 (`[topic, seq,
/// payload]`, SERVICE.md §5.1) live and 4 in a replay reply as the DEALER receives it (`[b"",
/// topic, seq, payload]`, §7.2); a few more still reach the listener, which drops them as
/// malformed (`frame_count`). Each frame costs the `zeromq` crate a buffer entry whatever its
/// length, so an unbounded count of empty frames is an unbounded message too.
pub const DEFAULT_MAX_MESSAGE_FRAMES: u32 = 8;

/// Bytes of a ZMTP 3 greeting (signature, version, mechanism, as-server, filler).
const GREETING: u64 = 64;

/// What one message from a publisher may be. Commands (ZMTP's READY, PING, ...) are not part of
/// a message: each is only held to [`Self::max_bytes`] as a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Most bytes of one multipart message, all its frame bodies together (and so of one frame).
    pub max_bytes: u64,
    /// Most frames of one multipart message.
    pub max_frames: u32,
}

impl Default for MessageLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_frames: DEFAULT_MAX_MESSAGE_FRAMES,
        }
    }
}

/// What a publisher sent over the [`MessageLimits`]; the guard closes the connection on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Oversized {
    /// One frame header announced more bytes than the limit.
    #[error("a frame of {len} bytes, over the limit of {max} bytes")]
    Frame {
        /// The announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The frames of one multipart message (MORE flags) add up to more bytes than the limit.
    #[error(
        "a multipart message of at least {bytes} bytes, over the limit of {max} bytes per message"
    )]
    MessageBytes {
        /// The message's bytes so far, the frame just announced included.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// One multipart message has more frames than the limit.
    #[error("a multipart message of more than {max} frames")]
    MessageFrames {
        /// The limit.
        max: u32,
    },
}

impl Oversized {
    /// Metric label (`kvindex_zmq_oversized_frames_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Oversized::Frame { .. } => "frame",
            Oversized::MessageBytes { .. } => "message_bytes",
            Oversized::MessageFrames { .. } => "message_frames",
        }
    }
}

/// Where a [`FrameCheck`] is in the publisher's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Greeting bytes still to pass.
    Greeting(u64),
    /// Next byte: a frame's flags.
    Flags,
    /// Reading a frame's length: 1 byte, or 8 (big-endian) for a long frame.
    Len { flags: u8, got: u8, acc: u64 },
    /// Body bytes still to pass.
    Body(u64),
}

/// Where a [`FrameCheck`] stopped the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    /// Bytes of the last piece fed that come before the offending frame's header.
    pub(crate) passed: usize,
    /// What was over the limits.
    pub(crate) oversized: Oversized,
}

/// ZMTP frame flags.
const FLAG_MORE: u8 = 0b001;
const FLAG_LONG: u8 = 0b010;
const FLAG_COMMAND: u8 = 0b100;

/// Follows the frame and message boundaries of a ZMTP 3 byte stream, fed in pieces of any
/// size, and rejects the first frame announced longer than the limit or taking its multipart
/// message past the [`MessageLimits`] (checked on the frame's header, before its body).
#[derive(Debug, Clone)]
pub(crate) struct FrameCheck {
    state: State,
    limits: MessageLimits,
    /// Frames of the current multipart message (those with MORE so far), commands not counted.
    message_frames: u32,
    /// Body bytes of those frames.
    message_bytes: u64,
}

impl FrameCheck {
    pub(crate) fn new(limits: MessageLimits) -> Self {
        Self {
            state: State::Greeting(GREETING),
            limits,
            message_frames: 0,
            message_bytes: 0,
        }
    }

    /// Account for the next bytes of the stream. `Err`: a frame over the limits was announced
    /// (the check stays failed: feed nothing more); [`Cut::passed`] bytes of `buf` come before
    /// that frame.
    pub(crate) fn feed(&mut self, buf: &[u8]) -> Result<(), Cut> {
        let mut rest = buf;
        // Where the header of the frame being read starts in `buf` (0: in an earlier piece).
        let mut header_at = 0;
        while let Some(&byte) = rest.first() {
            match self.state {
                State::Greeting(left) | State::Body(left) => {
                    let k = left.min(rest.len() as u64);
                    rest = &rest[k as usize..];
                    self.state = match (self.state, left - k) {
                        (_, 0) => State::Flags,
                        (State::Greeting(_), left) => State::Greeting(left),
                        (_, left) => State::Body(left),
                    };
                }
                State::Flags => {
                    header_at = buf.len() - rest.len();
                    rest = &rest[1..];
                    self.state = State::Len {
                        flags: byte,
                        got: 0,
                        acc: 0,
                    };
                }
                State::Len { flags, got, acc } => {
                    rest = &rest[1..];
                    let acc = acc << 8 | byte as u64;
                    let got = got + 1;
                    if got < if flags & FLAG_LONG != 0 { 8 } else { 1 } {
                        self.state = State::Len { flags, got, acc };
                        continue;
                    }
                    self.frame(flags, acc).map_err(|oversized| Cut {
                        passed: header_at,
                        oversized,
                    })?;
                    self.state = if acc == 0 {
                        State::Flags
                    } else {
                        State::Body(acc)
                    };
                }
            }
        }
        Ok(())
    }

    /// Check a frame of `len` bytes whose header has `flags`, and account for it in its message.
    fn frame(&mut self, flags: u8, len: u64) -> Result<(), Oversized> {
        let max = self.limits.max_bytes;
        if len > max {
            return Err(Oversized::Frame { len, max });
        }
        if flags & FLAG_COMMAND != 0 {
            // Not part of a message: the `zeromq` crate hands commands over on their own.
            return Ok(());
        }
        let frames = self.message_frames.saturating_add(1);
        if frames > self.limits.max_frames {
            return Err(Oversized::MessageFrames {
                max: self.limits.max_frames,
            });
        }
        let bytes = self.message_bytes.saturating_add(len);
        if bytes > max {
            return Err(Oversized::MessageBytes { bytes, max });
        }
        if flags & FLAG_MORE != 0 {
            self.message_frames = frames;
            self.message_bytes = bytes;
        } else {
            // The last frame: the next one starts a new message.
            self.message_frames = 0;
            self.message_bytes = 0;
        }
        Ok(())
    }
}

/// A running guard for one publisher endpoint: our socket connects to [`Guard::endpoint`].
/// Dropping it stops the guard and closes its connections.
pub(crate) struct Guard {
    endpoint: String,
    task: JoinHandle<()>,
    /// Why the last connection onward failed, if it did: our socket only sees the guard close
    /// the loopback connection, so this is the cause to report.
    last_error: Arc<Mutex<Option<String>>>,
    /// Bumped each time a relayed connection ends (for any reason: the publisher closed, a
    /// frame over the limit, the connection onward failed, our socket closed).
    ended: watch::Receiver<u64>,
}

impl Guard {
    /// Resolves once a connection relayed by this guard has ended since the guard started
    /// (at once if one already has). A socket connected through a fresh guard holds its only
    /// connection, so this is the end of that socket's connection to the publisher, seen
    /// whether or not the socket itself notices: the `zeromq` crate (0.7) keeps a SUB socket
    /// that lost its connection during the handshake "connected" forever, with no peer and
    /// no reconnection.
    pub(crate) async fn connection_ended(&mut self) {
        // An error means the guard's task is gone, and its connections with it.
        let _ = self.ended.changed().await;
    }

    /// The loopback endpoint to connect to instead of the publisher's.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The error of the last failed connection onward (taken: reported once).
    pub(crate) fn take_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the guard connects onward.
#[derive(Debug, Clone)]
enum Remote {
    Tcp(String),
    #[cfg(unix)]
    Ipc(std::path::PathBuf),
}

fn remote_of(endpoint: &str) -> io::Result<Remote> {
    if let Some(addr) = endpoint.strip_prefix("tcp://") {
        return Ok(Remote::Tcp(addr.to_string()));
    }
    #[cfg(unix)]
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        return Ok(Remote::Ipc(path.into()));
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!("no transport for ZMQ endpoint {endpoint}"),
    ))
}

/// Start a guard for the publisher at `endpoint` (tcp or ipc) holding what it sends to
/// `limits`.
pub(crate) async fn start(endpoint: &str, limits: MessageLimits) -> io::Result<Guard> {
    let remote = remote_of(endpoint)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let local = format!("tcp://{}", listener.local_addr()?);
    let publisher = endpoint.to_string();
    let last_error: Arc<Mutex<Option<String>>> = Arc::default();
    let errors = Arc::clone(&last_error);
    let (ended_tx, ended) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        // Connections end with the accept loop: aborting it drops this set, which aborts them.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next(), if !connections.is_empty() => {
                    ended_tx.send_modify(|n| *n += 1);
                    continue;
                }
            };
            match accepted {
                Ok((ours, _)) => {
                    let (remote, publisher) = (remote.clone(), publisher.clone());
                    let errors = Arc::clone(&errors);
                    connections.spawn(async move {
                        if let Err(error) = relay(ours, &remote, &publisher, limits, &errors).await
                        {
                            tracing::debug!(%publisher, %error, "ZMQ guard connection ended");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%publisher, %error, "ZMQ guard: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(Guard {
        endpoint: local,
        task,
        last_error,
        ended,
    })
}

fn record_error(errors: &Mutex<Option<String>>, error: String) {
    *errors.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
}

/// Connect onward and pass bytes both ways until either side closes, checking the frames
/// the publisher sends.
/// A failure to connect onward, or the cut-off of a publisher over the limits, is recorded in
/// `errors` *before* our side of the loopback connection closes, so that whoever sees the
/// close finds the cause.
async fn relay(
    ours: TcpStream,
    remote: &Remote,
    publisher: &str,
    limits: MessageLimits,
    errors: &Mutex<Option<String>>,
) -> io::Result<()> {
    ours.set_nodelay(true)?;
    let record = |e: io::Error| {
        record_error(errors, e.to_string());
        e
    };
    match remote {
        Remote::Tcp(addr) => {
            let theirs = TcpStream::connect(addr.as_str()).await.map_err(record)?;
            theirs.set_nodelay(true)?;
            pump(ours, theirs, publisher, limits, errors).await
        }
        #[cfg(unix)]
        Remote::Ipc(path) => {
            let theirs = tokio::net::UnixStream::connect(path)
                .await
                .map_err(record)?;
            pump(ours, theirs, publisher, limits, errors).await
        }
    }
}

async fn pump<T>(
    ours: TcpStream,
    theirs: T,
    publisher: &str,
    limits: MessageLimits,
    errors: &Mutex<Option<String>>,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut our_read, mut our_write) = tokio::io::split(ours);
    let (mut their_read, mut their_write) = tokio::io::split(theirs);
    let upstream = async {
        tokio::io::copy(&mut our_read, &mut their_write).await?;
        their_write.shutdown().await
    };
    let downstream = async {
        let mut check = FrameCheck::new(limits);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = their_read.read(&mut buf).await?;
            if n == 0 {
                return our_write.shutdown().await;
            }
            if let Err(cut) = check.feed(&buf[..n]) {
                // What came before the offending frame passes: complete messages in the
                // same read are not lost with the connection.
                our_write.write_all(&buf[..cut.passed]).await?;
                let oversized = cut.oversized;
                metrics::counter!(METRIC_OVERSIZED_FRAMES, "reason" => oversized.label())
                    .increment(1);
                tracing::warn!(
                    %publisher,
                    reason = oversized.label(),
                    max_message_bytes = limits.max_bytes,
                    max_message_frames = limits.max_frames,
                    "ZMQ publisher sent {oversized}; connection closed"
                );
                let error =
                    format!("connection closed by the frame guard: the publisher sent {oversized}");
                record_error(errors, error.clone());
                return Err(io::Error::new(io::ErrorKind::InvalidData, error));
            }
            our_write.write_all(&buf[..n]).await?;
        }
    };
    // Either direction ending ends the relay; dropping the halves closes both connections.
    tokio::select! {
        r = upstream => r,
        r = downstream => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = vec![0u8; GREETING as usize];
        g[0] = 0xff;
        g[9] = 0x7f;
        g[10] = 3;
        g
    }

    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![flags];
        if flags & 0b10 != 0 {
            f.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            f.push(body.len() as u8);
        }
        f.extend_from_slice(body);
        f
    }

    fn limits(max_bytes: u64) -> MessageLimits {
        MessageLimits {
            max_bytes,
            ..MessageLimits::default()
        }
    }

    /// The error of a check that fails on this piece.
    fn oversized(r: Result<(), Cut>) -> Option<Oversized> {
        r.err().map(|cut| cut.oversized)
    }

    /// Frames within the limit pass in any split of the stream, short and long, empty
    /// included; the first frame over the limit is reported with its announced length.
    #[test]
    fn frames_are_followed_across_any_split_and_the_oversized_one_is_caught() {
        let mut stream = greeting();
        stream.extend(frame(0b100, b"\x05READY")); // a command
        stream.extend(frame(0b001, b"topic")); // more
        stream.extend(frame(0b001, &[0u8; 8])); // the sequence
        stream.extend(frame(0b010, &[7u8; 300])); // long, last
        stream.extend(frame(0b000, &[])); // empty
        let good_len = stream.len();
        // A long frame announcing 2^62 bytes.
        stream.push(0b010);
        stream.extend_from_slice(&(1u64 << 62).to_be_bytes());
        for chunk in [1, 2, 3, 7, 64, 65, 1000] {
            let mut check = FrameCheck::new(limits(1000));
            let (good, bad) = stream.split_at(good_len);
            for piece in good.chunks(chunk) {
                assert_eq!(check.feed(piece), Ok(()), "chunks of {chunk}");
            }
            let caught = bad
                .chunks(chunk)
                .map(|p| check.feed(p))
                .find(|r| r.is_err());
            assert_eq!(
                caught.and_then(oversized),
                Some(Oversized::Frame {
                    len: 1 << 62,
                    max: 1000
                }),
                "chunks of {chunk}"
            );
        }
        // The limit itself passes; one byte more does not.
        let mut at = FrameCheck::new(limits(300));
        assert_eq!(at.feed(&greeting()), Ok(()));
        assert_eq!(at.feed(&frame(0b010, &[1u8; 300])), Ok(()));
        assert_eq!(
            oversized(at.feed(&frame(0b010, &[1u8; 301]))),
            Some(Oversized::Frame { len: 301, max: 300 })
        );
        // A short frame's one-byte length is checked too.
        let mut small = FrameCheck::new(limits(10));
        assert_eq!(small.feed(&greeting()), Ok(()));
        assert_eq!(
            oversized(small.feed(&[0, 11])),
            Some(Oversized::Frame { len: 11, max: 10 })
        );
    }

    /// Feed a long frame's header and `len` body bytes (in pieces of one reused buffer: the
    /// check works on lengths, nothing of the size is allocated).
    fn feed_long_frame(check: &mut FrameCheck, more: bool, len: u64) -> Result<(), Cut> {
        let mut header = vec![FLAG_LONG | if more { FLAG_MORE } else { 0 }];
        header.extend_from_slice(&len.to_be_bytes());
        check.feed(&header)?;
        let zeros = [0u8; 64 << 10];
        let mut left = len;
        while left > 0 {
            let k = left.min(zeros.len() as u64);
            check.feed(&zeros[..k as usize])?;
            left -= k;
        }
        Ok(())
    }

    /// The review's attack: frames of 16 MiB, each under the 64 MiB frame limit, all with
    /// MORE, so that the `zeromq` crate keeps appending them to one message (128 of them grew
    /// the process by 2 GiB). The fifth takes the message past 64 MiB and is refused on its
    /// header; a message of exactly the limit passes, and the next message starts from zero.
    #[test]
    fn frames_with_more_are_summed_per_message_and_the_message_limit_holds() {
        const MIB16: u64 = 16 << 20;
        let mut check = FrameCheck::new(MessageLimits::default());
        assert_eq!(check.feed(&greeting()), Ok(()));
        for _ in 0..4 {
            assert_eq!(feed_long_frame(&mut check, true, MIB16), Ok(()));
        }
        assert_eq!(
            feed_long_frame(&mut check, true, MIB16).map_err(|c| c.oversized),
            Err(Oversized::MessageBytes {
                bytes: 5 * MIB16,
                max: DEFAULT_MAX_MESSAGE_BYTES
            })
        );

        // Exactly the limit (4 × 16 MiB and an empty last frame) passes, twice in a row: a
        // frame without MORE ends the message and the count starts again.
        let mut check = FrameCheck::new(MessageLimits::default());
        assert_eq!(check.feed(&greeting()), Ok(()));
        for _ in 0..2 {
            for _ in 0..4 {
                assert_eq!(feed_long_frame(&mut check, true, MIB16), Ok(()));
            }
            assert_eq!(check.feed(&frame(0, &[])), Ok(()));
        }
        // One byte more than the limit, in the last frame.
        for _ in 0..4 {
            assert_eq!(feed_long_frame(&mut check, true, MIB16), Ok(()));
        }
        assert_eq!(
            oversized(check.feed(&frame(0, &[1]))),
            Some(Oversized::MessageBytes {
                bytes: DEFAULT_MAX_MESSAGE_BYTES + 1,
                max: DEFAULT_MAX_MESSAGE_BYTES
            })
        );
    }

    /// A message of more frames than the limit is refused on the first frame too many, empty
    /// frames included (each costs the `zeromq` crate a buffer entry); commands between them
    /// do not count, and the count starts again with each message.
    #[test]
    fn the_frames_of_one_message_are_counted() {
        let max = DEFAULT_MAX_MESSAGE_FRAMES;
        let mut check = FrameCheck::new(MessageLimits::default());
        assert_eq!(check.feed(&greeting()), Ok(()));
        // Many messages of the wire protocol's shapes: live [topic, seq, payload], replay
        // [b"", topic, seq, payload], and a message of exactly the limit.
        for _ in 0..1000 {
            let mut live = frame(FLAG_MORE, b"kv@0");
            live.extend(frame(FLAG_MORE, &7u64.to_be_bytes()));
            live.extend(frame(0, b"\x93\x01\x90\xc0"));
            assert_eq!(check.feed(&live), Ok(()));
            let mut replay = frame(FLAG_MORE, b"");
            replay.extend(live);
            assert_eq!(check.feed(&replay), Ok(()));
        }
        for i in 0..max {
            let flags = if i + 1 < max { FLAG_MORE } else { 0 };
            assert_eq!(check.feed(&frame(flags, b"")), Ok(()));
            // A PING command in between.
            assert_eq!(check.feed(&frame(FLAG_COMMAND, b"\x04PING")), Ok(()));
        }
        // One frame too many.
        for _ in 0..max {
            assert_eq!(check.feed(&frame(FLAG_MORE, b"")), Ok(()));
        }
        assert_eq!(
            oversized(check.feed(&frame(0, b""))),
            Some(Oversized::MessageFrames { max })
        );
        for (o, label) in [
            (Oversized::Frame { len: 2, max: 1 }, "frame"),
            (
                Oversized::MessageBytes { bytes: 2, max: 1 },
                "message_bytes",
            ),
            (Oversized::MessageFrames { max: 1 }, "message_frames"),
        ] {
            assert_eq!(o.label(), label);
        }
    }

    /// The bytes of a piece that come before the offending frame's header are reported, so
    /// that complete messages read together with it are not lost; a header split across
    /// pieces leaves nothing of the last one to pass.
    #[test]
    fn a_cut_reports_the_bytes_before_the_offending_frame() {
        let mut good = frame(FLAG_MORE, b"topic");
        good.extend(frame(FLAG_MORE, &[0u8; 8]));
        good.extend(frame(0, b"payload"));
        let mut bad = vec![FLAG_LONG];
        bad.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut piece = good.clone();
        piece.extend(&bad);
        let mut check = FrameCheck::new(limits(1000));
        assert_eq!(check.feed(&greeting()), Ok(()));
        assert_eq!(check.feed(&piece).map_err(|c| c.passed), Err(good.len()));

        let mut check = FrameCheck::new(limits(1000));
        assert_eq!(check.feed(&greeting()), Ok(()));
        assert_eq!(check.feed(&piece[..good.len() + 3]), Ok(()));
        assert_eq!(
            check.feed(&piece[good.len() + 3..]).map_err(|c| c.passed),
            Err(0)
        );
    }

    /// Bytes pass through the guard unchanged both ways; a publisher announcing an oversized
    /// frame gets its connection closed, and our side sees the close without the frame's body.
    #[tokio::test]
    async fn the_guard_relays_bytes_and_closes_on_an_oversized_frame() {
        let publisher = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let endpoint = format!("tcp://{}", publisher.local_addr().expect("addr"));
        let guard = start(&endpoint, limits(1000)).await.expect("guard");
        let local = guard
            .endpoint()
            .strip_prefix("tcp://")
            .expect("tcp")
            .to_string();
        let mut ours = TcpStream::connect(local)
            .await
            .expect("connect to the guard");
        let (mut theirs, _) = publisher.accept().await.expect("the guard connects onward");

        // Ours to theirs, unread.
        ours.write_all(b"subscribe me").await.expect("write");
        let mut got = [0u8; 12];
        theirs.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"subscribe me");

        // Theirs to ours: a greeting and a frame within the limit pass.
        let mut ok = greeting();
        ok.extend(frame(0b000, b"hello"));
        theirs.write_all(&ok).await.expect("write");
        let mut back = vec![0u8; ok.len()];
        ours.read_exact(&mut back).await.expect("read");
        assert_eq!(back, ok);

        // An oversized frame: the guard closes our connection before any of it arrives.
        let mut bad = vec![0b010];
        bad.extend_from_slice(&(1u64 << 62).to_be_bytes());
        bad.extend_from_slice(b"body");
        theirs.write_all(&bad).await.expect("write");
        let mut rest = Vec::new();
        let n = ours.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "nothing of the oversized frame may pass: {rest:?}");
        drop(guard);
    }

    /// A publisher whose frames, each within the limit, add up to a message over it (MORE
    /// flags) is cut off at the frame that crosses it: the complete message before it still
    /// arrives, nothing of the crossing frame does, and the guard says why.
    #[tokio::test]
    async fn the_guard_closes_on_a_multipart_message_over_the_limit_and_says_why() {
        let publisher = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let endpoint = format!("tcp://{}", publisher.local_addr().expect("addr"));
        let guard = start(&endpoint, limits(1000)).await.expect("guard");
        let local = guard.endpoint().strip_prefix("tcp://").expect("tcp");
        let mut ours = TcpStream::connect(local).await.expect("connect");
        let (mut theirs, _) = publisher.accept().await.expect("onward");

        let mut good = greeting();
        good.extend(frame(FLAG_MORE, b"topic"));
        good.extend(frame(FLAG_MORE, &[0u8; 8]));
        good.extend(frame(FLAG_LONG, &[1u8; 900]));
        // Three frames of 400 bytes with MORE: the third takes the message past 1000.
        let mut bad = Vec::new();
        for _ in 0..3 {
            bad.extend(frame(FLAG_LONG | FLAG_MORE, &[2u8; 400]));
        }
        let mut all = good.clone();
        all.extend(&bad);
        theirs.write_all(&all).await.expect("write");
        let mut got = Vec::new();
        // Bounded: without the message limit the connection stays open.
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            ours.read_to_end(&mut got),
        )
        .await;
        assert!(closed.is_ok(), "the guard kept the connection open");
        // The first 800 bytes of the second message may pass (they were within the limit),
        // nothing of its third frame does.
        let cut_at = good.len() + 2 * (9 + 400);
        assert!(
            got.len() >= good.len() && got.len() <= cut_at,
            "{}",
            got.len()
        );
        assert_eq!(got[..], all[..got.len()]);
        let error = guard.take_error().expect("the cause is recorded");
        assert!(
            error.contains("multipart message of at least 1200 bytes"),
            "{error}"
        );
    }

    /// The guard reports the end of a relayed connection, whichever side ended it, and not
    /// before.
    #[tokio::test]
    async fn the_guard_reports_when_a_connection_ends() {
        let publisher = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let endpoint = format!("tcp://{}", publisher.local_addr().expect("addr"));
        let mut guard = start(&endpoint, limits(1000)).await.expect("guard");
        let local = guard.endpoint().to_string();
        let local = local.strip_prefix("tcp://").expect("tcp");
        for publisher_hangs_up in [true, false] {
            let mut ours = TcpStream::connect(local).await.expect("connect");
            let (mut theirs, _) = publisher.accept().await.expect("onward");
            // Alive: a round trip passes and no end is reported.
            theirs.write_all(b"x").await.expect("write");
            let mut one = [0u8; 1];
            ours.read_exact(&mut one).await.expect("read");
            tokio::select! {
                biased;
                () = guard.connection_ended() => panic!("an end reported on a live connection"),
                () = tokio::task::yield_now() => {}
            }
            if publisher_hangs_up {
                drop(theirs);
            } else {
                drop(ours);
            }
            guard.connection_ended().await;
        }
    }

    /// An endpoint of another transport has no guard.
    #[tokio::test]
    async fn inproc_endpoints_have_no_guard() {
        assert!(start("inproc://x", limits(10)).await.is_err());
    }
}
