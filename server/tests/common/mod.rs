//! Test harness: the real `kvindex` binary on a free loopback port with a temp data directory,
//! and a minimal HTTP/1.1 client (raw bytes in, status/headers/body out) so tests can send
//! exactly what they mean, invalid UTF-8 and wrong content types included. Every wait is a
//! bounded loop; no test asserts on timing.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A two-thread tokio runtime, for tests that stay synchronous while driving async publishers
/// and clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh temporary directory and the data directory path inside it (not created: the server
/// makes it). Keep the `TempDir` alive as long as the directory is used.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("data");
    (d, p)
}

/// A `tcp://` endpoint nothing listens on (a port bound, then freed).
pub fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("tcp://{}", l.local_addr().expect("addr"))
}

/// Wait (bounded) until `data_dir` holds a snapshot file.
pub fn wait_for_snapshot(data_dir: &Path) {
    for _ in 0..100 {
        let snap = std::fs::read_dir(data_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".kvsnap"));
        if snap {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no snapshot written");
}

/// Tokens `1..=n`.
pub fn tokens(n: u32) -> Vec<u32> {
    (1..=n).collect()
}

/// `(engine hash, local hash)` pairs for the first `n` local hashes of `h`, engine hashes
/// counting up from `base` (the block list of [`stored`]).
pub fn chain(h: &[u64], n: usize, base: u64) -> Vec<(u64, u64)> {
    h.iter()
        .take(n)
        .enumerate()
        .map(|(i, &l)| (base + i as u64, l))
        .collect()
}

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kvindex")
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running `kvindex serve`.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Spawn `kvindex serve` on 127.0.0.1:0 with `data_dir` and `extra` flags; wait (bounded) for
/// the "HTTP server listening on" line.
pub fn start(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    try_start(data_dir, extra, env).unwrap_or_else(|(log, status)| {
        panic!(
            "server did not start ({status:?}); stderr:\n{}",
            log.join("\n")
        )
    })
}

/// Like [`start`], but returns the stderr lines and exit status if it never listens.
pub fn try_start(
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<Server, (Vec<String>, Option<ExitStatus>)> {
    spawn(data_dir, extra, env).listening()
}

/// A `kvindex serve` spawned by [`spawn`], perhaps not listening yet: its stderr can be read
/// during start-up. Killed when dropped.
pub struct Starting {
    child: Option<Child>,
    data_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

/// Spawn `kvindex serve` as [`start`] does, without waiting for it to listen.
pub fn spawn(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Starting {
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .args(["--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("DYN_ROUTER_MIN_INITIAL_WORKERS")
        .env_remove("DYN_KV_INDEXER_TEST_ENDPOINTS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn kvindex");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Starting {
        child: Some(child),
        data_dir: data_dir.to_owned(),
        log,
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Starting {
    /// Whether a stderr line so far contains every one of `parts`.
    pub fn logged(&self, parts: &[&str]) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Send `sig` to the process.
    pub fn kill(&self, sig: i32) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait (bounded) for the exit status; the stderr lines.
    pub fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        for _ in 0..600 {
            if let Some(status) = self.exited() {
                // Let the stderr reader drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log.lock().unwrap().clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "kvindex did not exit; stderr:\n{}",
            self.log.lock().unwrap().join("\n")
        );
    }

    /// Wait (bounded) for the "HTTP server listening on" line; the stderr lines and the exit
    /// status if it never comes.
    pub fn listening(mut self) -> Result<Server, (Vec<String>, Option<ExitStatus>)> {
        let Some(child) = self.child.take() else {
            return Err((self.log.lock().unwrap().clone(), None));
        };
        let (log, data_dir) = (Arc::clone(&self.log), self.data_dir.clone());
        wait_listening(child, &data_dir, log)
    }
}

fn wait_listening(
    mut child: Child,
    data_dir: &Path,
    log: Arc<Mutex<Vec<String>>>,
) -> Result<Server, (Vec<String>, Option<ExitStatus>)> {
    for _ in 0..600 {
        let addr = log.lock().unwrap().iter().find_map(|l| {
            l.split("HTTP server listening on ")
                .nth(1)
                .map(|a| a.trim().to_owned())
        });
        if let Some(addr) = addr {
            return Ok(Server {
                child,
                addr,
                data_dir: data_dir.to_owned(),
                log,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            return Err((log.lock().unwrap().clone(), Some(status)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let lines = log.lock().unwrap().clone();
    Err((lines, None))
}

/// Run the binary to completion with `args`; (exit code, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("DYN_ROUTER_MIN_INITIAL_WORKERS")
        .env_remove("DYN_KV_INDEXER_TEST_ENDPOINTS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run kvindex");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Server {
    /// Send one request (`Connection: close`) and read the whole response.
    pub fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(req.as_bytes()).unwrap();
        // The server may answer (413) before reading everything; ignore write errors then.
        let _ = s.write_all(body);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        parse_response(&buf, method == "HEAD")
    }

    pub fn get(&self, path: &str) -> Resp {
        self.raw("GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Resp {
        self.raw(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn post_raw_json(&self, path: &str, body: &[u8]) -> Resp {
        self.raw("POST", path, &[("Content-Type", "application/json")], body)
    }

    /// The value of one metric line `name{labels} value` (labels as written), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(self) -> (ExitStatus, Vec<String>) {
        self.signal(libc::SIGTERM)
    }

    /// SIGTERM (which must exit 0), then a new server on the same data directory with `extra`
    /// flags.
    pub fn restart(self, extra: &[&str]) -> Server {
        let data_dir = self.data_dir.clone();
        let (status, log) = self.terminate();
        assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
        start(&data_dir, extra, &[])
    }

    /// Send `sig` and wait (bounded) for the exit status.
    pub fn signal(mut self, sig: i32) -> (ExitStatus, Vec<String>) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the stderr reader drain the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return (status, self.log.lock().unwrap().clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("server did not exit after SIGTERM");
    }

    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn parse_response(buf: &[u8], head: bool) -> Resp {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head_text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let raw = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if head {
        Vec::new()
    } else if chunked {
        dechunk(raw)
    } else {
        raw.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&raw[..pos])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        raw = &raw[pos + 2..];
        if size == 0 || raw.len() < size {
            break;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[(size + 2).min(raw.len())..];
    }
    out
}

/// Local block hashes of `tokens` with block size `bs` (Dynamo's formula, seed 1337), for
/// building events; checked against the golden value in a test.
pub fn local_hashes(tokens: &[u32], bs: usize) -> Vec<u64> {
    tokens
        .chunks_exact(bs)
        .map(|c| {
            let bytes: Vec<u8> = c.iter().flat_map(|t| t.to_le_bytes()).collect();
            xxh3(&bytes)
        })
        .collect()
}

fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, 1337)
}

/// A RouterEvent storing a chain: `blocks` = (engine hash, local hash), under `parent`.
pub fn stored(
    worker: u64,
    dp: u32,
    id: u64,
    parent: Option<u64>,
    blocks: &[(u64, u64)],
) -> serde_json::Value {
    serde_json::json!({
        "worker_id": worker,
        "event": {
            "event_id": id,
            "dp_rank": dp,
            "data": {"stored": {
                "parent_hash": parent,
                "blocks": blocks.iter().map(|(b, t)| serde_json::json!({"block_hash": b, "tokens_hash": t})).collect::<Vec<_>>()
            }}
        }
    })
}

/// A RouterEvent removing blocks by engine hash.
pub fn removed(worker: u64, dp: u32, id: u64, hashes: &[u64]) -> serde_json::Value {
    serde_json::json!({
        "worker_id": worker,
        "event": {"event_id": id, "dp_rank": dp, "data": {"removed": {"block_hashes": hashes}}}
    })
}

/// Register `instance` (dp 0) for model `m`, group default, block size `bs`.
pub fn register(s: &Server, instance: u64, model: &str, bs: u32) {
    let r = s.post_json(
        "/register",
        &serde_json::json!({"instance_id": instance, "endpoint": "tcp://127.0.0.1:18101", "model_name": model, "block_size": bs}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}
