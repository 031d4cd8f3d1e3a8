//! A frame-size guard between a publisher and our ZMQ sockets.
//!
//! Why: the `zeromq` crate (0.7) trusts the 64-bit length of a ZMTP frame header and reserves
//! that many bytes for the frame at once; it has no maximum-message-size option. A publisher
//! (or anything at a registered endpoint: `POST /register` takes any host) announcing a frame of
//! 2^62 bytes makes that allocation fail, and Rust aborts the process on a failed allocation;
//! announcing tens of gigabytes makes the process reserve them. So our sockets never connect to
//! a publisher directly: they connect to a loopback port of this guard, which connects onward
//! (tcp or ipc) and passes bytes through both ways, reading the frame headers of what the
//! publisher sends. A frame announced longer than the limit closes both connections before its
//! body arrives, counted in `kvindex_zmq_oversized_frames_total`; the SUB socket reconnects as
//! after any dropped connection (and a DEALER's replay attempt fails). Our own frames (the
//! subscription, replay requests) are passed through unread.

use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Counter: connections closed because the publisher announced a frame over the limit.
pub const METRIC_OVERSIZED_FRAMES: &str = "kvindex_zmq_oversized_frames_total";

/// Default limit of one frame from a publisher: far above a real batch (a stored event of a
/// 128k-token prefill is under 1 MiB of msgpack), far below what can hurt the process.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 64 << 20;

/// Bytes of a ZMTP 3 greeting (signature, version, mechanism, as-server, filler).
const GREETING: u64 = 64;

/// Where a [`FrameCheck`] is in the publisher's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Greeting bytes still to pass.
    Greeting(u64),
    /// Next byte: a frame's flags.
    Flags,
    /// Reading a frame's length: 1 byte, or 8 (big-endian) for a long frame.
    Len { long: bool, got: u8, acc: u64 },
    /// Body bytes still to pass.
    Body(u64),
}

/// Follows the frame boundaries of a ZMTP 3 byte stream, fed in pieces of any size, and
/// rejects the first frame announced longer than the limit.
#[derive(Debug, Clone)]
pub(crate) struct FrameCheck {
    state: State,
    max: u64,
}

impl FrameCheck {
    pub(crate) fn new(max: u64) -> Self {
        Self {
            state: State::Greeting(GREETING),
            max,
        }
    }

    /// Account for the next bytes of the stream. `Err(len)`: a frame announces `len` bytes,
    /// more than the limit (the check stays failed: feed nothing more).
    pub(crate) fn feed(&mut self, mut buf: &[u8]) -> Result<(), u64> {
        while let Some(&byte) = buf.first() {
            match self.state {
                State::Greeting(left) | State::Body(left) => {
                    let k = left.min(buf.len() as u64);
                    buf = &buf[k as usize..];
                    self.state = match (self.state, left - k) {
                        (_, 0) => State::Flags,
                        (State::Greeting(_), rest) => State::Greeting(rest),
                        (_, rest) => State::Body(rest),
                    };
                }
                State::Flags => {
                    buf = &buf[1..];
                    self.state = State::Len {
                        long: byte & 0b10 != 0,
                        got: 0,
                        acc: 0,
                    };
                }
                State::Len { long, got, acc } => {
                    buf = &buf[1..];
                    let acc = acc << 8 | byte as u64;
                    let got = got + 1;
                    self.state = if got < if long { 8 } else { 1 } {
                        State::Len { long, got, acc }
                    } else if acc > self.max {
                        return Err(acc);
                    } else if acc == 0 {
                        State::Flags
                    } else {
                        State::Body(acc)
                    };
                }
            }
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

/// Start a guard for the publisher at `endpoint` (tcp or ipc) with a frame limit of
/// `max_frame` bytes.
pub(crate) async fn start(endpoint: &str, max_frame: u64) -> io::Result<Guard> {
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
                        if let Err(error) = relay(ours, &remote, max_frame, &errors).await {
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

/// Connect onward and pass bytes both ways until either side closes, checking the frames
/// the publisher sends.
/// A failure to connect onward is recorded in `errors` *before* our side of the loopback
/// connection closes, so that whoever sees the close finds the cause.
async fn relay(
    ours: TcpStream,
    remote: &Remote,
    max_frame: u64,
    errors: &Mutex<Option<String>>,
) -> io::Result<()> {
    ours.set_nodelay(true)?;
    let record = |e: io::Error| {
        *errors.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        e
    };
    match remote {
        Remote::Tcp(addr) => {
            let theirs = TcpStream::connect(addr.as_str()).await.map_err(record)?;
            theirs.set_nodelay(true)?;
            pump(ours, theirs, max_frame).await
        }
        #[cfg(unix)]
        Remote::Ipc(path) => {
            let theirs = tokio::net::UnixStream::connect(path)
                .await
                .map_err(record)?;
            pump(ours, theirs, max_frame).await
        }
    }
}

async fn pump<T>(ours: TcpStream, theirs: T, max_frame: u64) -> io::Result<()>
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
        let mut check = FrameCheck::new(max_frame);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = their_read.read(&mut buf).await?;
            if n == 0 {
                return our_write.shutdown().await;
            }
            if let Err(len) = check.feed(&buf[..n]) {
                metrics::counter!(METRIC_OVERSIZED_FRAMES).increment(1);
                tracing::warn!(
                    frame_bytes = len,
                    max_frame_bytes = max_frame,
                    "ZMQ publisher announced a frame over the limit; connection closed"
                );
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame of {len} bytes over the limit of {max_frame}"),
                ));
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
            let mut check = FrameCheck::new(1000);
            let (good, bad) = stream.split_at(good_len);
            for piece in good.chunks(chunk) {
                assert_eq!(check.feed(piece), Ok(()), "chunks of {chunk}");
            }
            let caught = bad
                .chunks(chunk)
                .map(|p| check.feed(p))
                .find(|r| r.is_err());
            assert_eq!(caught, Some(Err(1 << 62)), "chunks of {chunk}");
        }
        // The limit itself passes; one byte more does not.
        let mut at = FrameCheck::new(300);
        assert_eq!(at.feed(&greeting()), Ok(()));
        assert_eq!(at.feed(&frame(0b010, &[1u8; 300])), Ok(()));
        assert_eq!(at.feed(&frame(0b010, &[1u8; 301])), Err(301));
        // A short frame's one-byte length is checked too.
        let mut small = FrameCheck::new(10);
        assert_eq!(small.feed(&greeting()), Ok(()));
        assert_eq!(small.feed(&[0, 11]), Err(11));
    }

    /// Bytes pass through the guard unchanged both ways; a publisher announcing an oversized
    /// frame gets its connection closed, and our side sees the close without the frame's body.
    #[tokio::test]
    async fn the_guard_relays_bytes_and_closes_on_an_oversized_frame() {
        let publisher = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let endpoint = format!("tcp://{}", publisher.local_addr().expect("addr"));
        let guard = start(&endpoint, 1000).await.expect("guard");
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

    /// The guard reports the end of a relayed connection, whichever side ended it, and not
    /// before.
    #[tokio::test]
    async fn the_guard_reports_when_a_connection_ends() {
        let publisher = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let endpoint = format!("tcp://{}", publisher.local_addr().expect("addr"));
        let mut guard = start(&endpoint, 1000).await.expect("guard");
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
        assert!(start("inproc://x", 10).await.is_err());
    }
}
