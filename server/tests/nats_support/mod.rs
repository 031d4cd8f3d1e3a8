//! NATS test support: a real `nats-server` on a free loopback port (JetStream on, store in a
//! temp directory), killed when the guard drops, and a blocking wrapper around an `async-nats`
//! client. When `nats-server` is not installed the tests FAIL with instructions (they never pass
//! silently): `scripts/test.sh` installs the Debian package `nats-server` first.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;

use crate::common::Server;

/// Where `nats-server` is: `$NATS_SERVER_BIN`, then `$PATH`, then the Debian locations.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `nats-server -js`; killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Start on a free port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Start on `port` and wait (bounded) until it accepts connections.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, tempfile::tempdir().expect("temp dir"))
    }

    /// Kill the server and start it again on the same port with the same JetStream store.
    pub fn restart(mut self) -> Self {
        self.kill();
        let port = self.port;
        let store = std::mem::replace(&mut self._store, tempfile::tempdir().expect("temp dir"));
        drop(self);
        Self::start_with(port, store)
    }

    /// Kill the server and start it again on the same port with an empty JetStream store: its
    /// streams and consumers are gone (memory storage, or a replaced volume).
    pub fn restart_empty(mut self) -> Self {
        self.kill();
        let port = self.port;
        drop(self);
        Self::start_on(port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn start_with(port: u16, store: tempfile::TempDir) -> Self {
        let bin = nats_server_bin().unwrap_or_else(|| {
            panic!(
                "nats-server is not installed, and the NATS tests need a real server: run \
                 ./scripts/test.sh (it installs the Debian package `nats-server`), or \
                 `apt-get install -y nats-server`, or set NATS_SERVER_BIN"
            )
        });
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut server = NatsServer {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        for _ in 0..400 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("nats-server exited at start-up: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not listen on port {port}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A reply: payload and headers.
pub struct Reply {
    pub payload: Vec<u8>,
    pub headers: Option<HeaderMap>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    }
}

/// A blocking NATS client for tests.
pub struct Client {
    rt: tokio::runtime::Runtime,
    pub inner: async_nats::Client,
}

impl Client {
    pub fn connect(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let inner = rt
            .block_on(async_nats::connect(url))
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        Client { rt, inner }
    }

    /// Fire-and-forget publish (flushed).
    pub fn publish(&self, subject: &str, payload: Vec<u8>) {
        self.rt.block_on(async {
            self.inner
                .publish(subject.to_owned(), payload.into())
                .await
                .expect("publish");
            self.inner.flush().await.expect("flush");
        })
    }

    /// Publish with headers (flushed).
    pub fn publish_with_headers(&self, subject: &str, headers: HeaderMap, payload: Vec<u8>) {
        self.rt.block_on(async {
            self.inner
                .publish_with_headers(subject.to_owned(), headers, payload.into())
                .await
                .expect("publish");
            self.inner.flush().await.expect("flush");
        })
    }

    /// Request/reply; retried while nobody answers yet (bounded: about 20 s).
    pub fn request(&self, subject: &str, headers: Option<HeaderMap>, payload: Vec<u8>) -> Reply {
        self.rt.block_on(async {
            let mut last = String::new();
            for _ in 0..200 {
                let req = async_nats::Request::new()
                    .payload(payload.clone().into())
                    .timeout(Some(Duration::from_secs(10)));
                let req = match &headers {
                    Some(h) => req.headers(h.clone()),
                    None => req,
                };
                match self.inner.send_request(subject.to_owned(), req).await {
                    Ok(m) => {
                        return Reply {
                            payload: m.payload.to_vec(),
                            headers: m.headers,
                        }
                    }
                    Err(e) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            panic!("no reply on {subject}: {last}");
        })
    }

    /// Publish to JetStream and wait for the stream's acknowledgement; the stream sequence.
    pub fn js_publish(&self, subject: &str, headers: Option<HeaderMap>, payload: Vec<u8>) -> u64 {
        self.rt.block_on(async {
            let js = jetstream::new(self.inner.clone());
            let ack = match headers {
                Some(h) => js
                    .publish_with_headers(subject.to_owned(), h, payload.into())
                    .await
                    .expect("js publish"),
                None => js
                    .publish(subject.to_owned(), payload.into())
                    .await
                    .expect("js publish"),
            };
            ack.await.expect("js publish ack").sequence
        })
    }

    /// Whether JetStream has a stream named `name`.
    pub fn stream_exists(&self, name: &str) -> bool {
        self.rt.block_on(async {
            jetstream::new(self.inner.clone())
                .get_stream(name)
                .await
                .is_ok()
        })
    }

    /// Delete stream `name` (and its consumers).
    pub fn delete_stream(&self, name: &str) {
        self.rt.block_on(async {
            jetstream::new(self.inner.clone())
                .delete_stream(name)
                .await
                .expect("delete stream");
        })
    }

    /// Delete the durable consumer `name` of stream `stream`.
    pub fn delete_consumer(&self, stream: &str, name: &str) {
        self.rt.block_on(async {
            jetstream::new(self.inner.clone())
                .get_stream(stream)
                .await
                .expect("stream")
                .delete_consumer(name)
                .await
                .expect("delete consumer");
        })
    }

    /// Create the durable pull consumer `name` of stream `stream` as an operator might: explicit
    /// acks, every message of the stream (deliver all), filter `filter`.
    pub fn create_consumer_delivering_all(&self, stream: &str, name: &str, filter: &str) {
        self.rt.block_on(async {
            jetstream::new(self.inner.clone())
                .get_stream(stream)
                .await
                .expect("stream")
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    filter_subject: filter.to_owned(),
                    ..Default::default()
                })
                .await
                .expect("create consumer");
        })
    }

    /// A core subscription to `subject`, known to the server when this returns.
    pub fn subscribe(&self, subject: &str) -> async_nats::Subscriber {
        self.rt.block_on(async {
            let sub = self
                .inner
                .subscribe(subject.to_owned())
                .await
                .expect("subscribe");
            self.inner.flush().await.expect("flush");
            sub
        })
    }

    /// The next message of `sub` (bounded: about 60 s, then panics).
    pub fn next_message(&self, sub: &mut async_nats::Subscriber) -> async_nats::Message {
        use futures::StreamExt;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .expect("no message within 60 s")
                .expect("subscription ended")
        })
    }

    /// Create stream `name` capturing `subjects` (fails if it exists).
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        self.rt.block_on(async {
            jetstream::new(self.inner.clone())
                .create_stream(jetstream::stream::Config {
                    name: name.to_owned(),
                    subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                })
                .await
                .expect("create stream");
        })
    }

    /// `(num_ack_pending, num_redelivered, num_pending)` of a durable consumer.
    pub fn consumer_state(&self, stream: &str, consumer: &str) -> (usize, usize, u64) {
        self.rt.block_on(async {
            let js = jetstream::new(self.inner.clone());
            let mut c: jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await
                .expect("stream")
                .get_consumer(consumer)
                .await
                .expect("consumer");
            let info = c.info().await.expect("consumer info");
            (info.num_ack_pending, info.num_redelivered, info.num_pending)
        })
    }
}

/// Publish an empty message whose header block carries a status line (`NATS/1.0 <code>
/// <description>`), as only servers send (JetStream's replies to pull requests); a client
/// library cannot, so this speaks the protocol over a raw connection to `nats`.
pub fn publish_status(nats: &NatsServer, subject: &str, code: u16, description: &str) {
    use std::io::{BufRead, BufReader, Write};
    let stream = TcpStream::connect(("127.0.0.1", nats.port)).expect("connect to nats-server");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO");
    assert!(line.starts_with("INFO"), "{line}");
    let header = format!("NATS/1.0 {code} {description}\r\n\r\n");
    let mut w = stream;
    write!(
        w,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\n\
         HPUB {subject} {len} {len}\r\n{header}\r\nPING\r\n",
        len = header.len()
    )
    .expect("publish");
    line.clear();
    reader.read_line(&mut line).expect("PONG");
    assert_eq!(line.trim_end(), "PONG", "nats-server refused the message");
}

/// Headers with one `(name, value)`.
pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, *v);
    }
    h
}

/// Sum of the series of metric `name` whose labels include every `labels` pair, from a
/// Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `s`'s `/metrics` text.
pub fn metrics(s: &Server) -> String {
    s.get("/metrics").text()
}

/// Metric `name` on `s`, summed over the series whose labels include every `labels` pair.
pub fn metric(s: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&metrics(s), name, labels)
}

/// Wait until `s` reports its NATS `subscription` up (the NATS server has it).
pub fn wait_subscribed(s: &Server, subscription: &str) {
    wait_until(&format!("NATS subscription {subscription} up"), || {
        metric(
            s,
            "kvindex_nats_subscription_up",
            &[("subscription", subscription)],
        ) == 1.0
    });
}

/// Wait (bounded, like [`wait_until`]) until `s` has logged a line containing `text`; panic
/// with the log otherwise. A line is never asserted at once after the metric that counts the
/// same event was seen: kvindex counts before it logs, and its log reaches [`Server::stderr`]
/// through a pipe and a reader thread, so the line may not be there yet.
pub fn wait_logged(s: &Server, text: &str) {
    for _ in 0..600 {
        if s.stderr().contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {text:?} in the log:\n{}", s.stderr());
}

/// Wait (bounded, generous) until `cond` holds; panic with `what` otherwise.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}
