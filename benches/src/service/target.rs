//! The processes under test: `kvindex serve` (the real binary, temp data directory) and Dynamo
//! 1.6.1's `python -m dynamo.indexer`, each on a free loopback port, stderr to a file, killed on
//! drop.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::HttpConn;
use super::ServiceError;

/// Which server a [`TargetProcess`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// `kvindex serve --fsync <policy>`.
    Kvindex {
        /// Path of the `kvindex` binary.
        bin: PathBuf,
        /// `--fsync` value (`never`, `interval:<ms>`, `always`).
        fsync: String,
    },
    /// `<python> -m dynamo.indexer`.
    Dynamo {
        /// Python interpreter with `ai-dynamo-runtime==1.6.1` installed.
        python: PathBuf,
    },
}

impl TargetKind {
    /// Short label for reports: `kvindex fsync=never`, `dynamo`.
    pub fn label(&self) -> String {
        match self {
            TargetKind::Kvindex { fsync, .. } => format!("kvindex fsync={fsync}"),
            TargetKind::Dynamo { .. } => "dynamo".into(),
        }
    }
}

/// A running server under test; killed (SIGKILL) and reaped on drop.
pub struct TargetProcess {
    child: Child,
    /// Loopback address of its HTTP API.
    pub addr: SocketAddr,
    /// What runs.
    pub kind: TargetKind,
    dir: tempfile::TempDir,
}

/// A loopback port nobody listens on right now (bind to port 0, read, release).
pub fn free_port() -> Result<u16, ServiceError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ServiceError::io("bind :0"))?;
    Ok(l.local_addr()
        .map_err(ServiceError::io("local_addr"))?
        .port())
}

/// Does `python` have Dynamo's standalone indexer (`python -m dynamo.indexer --help` exits 0)?
pub fn dynamo_available(python: &Path) -> bool {
    Command::new(python)
        .args(["-m", "dynamo.indexer", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl TargetProcess {
    /// Start `kind` with `threads` event threads and wait (bounded) until `/health` answers 200.
    pub async fn start(kind: TargetKind, threads: usize) -> Result<Self, ServiceError> {
        let dir = tempfile::Builder::new()
            .prefix("service-load-")
            .tempdir()
            .map_err(ServiceError::io("create temp dir"))?;
        let port = free_port()?;
        let log_path = dir.path().join("stderr.log");
        let log = File::create(&log_path).map_err(ServiceError::io("create log file"))?;
        let mut cmd = match &kind {
            TargetKind::Kvindex { bin, fsync } => {
                let mut c = Command::new(bin);
                c.arg("serve")
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .arg("--data-dir")
                    .arg(dir.path().join("data"))
                    .args(["--fsync", fsync, "--threads", &threads.to_string()]);
                c
            }
            TargetKind::Dynamo { python } => {
                let mut c = Command::new(python);
                c.args(["-m", "dynamo.indexer", "--port", &port.to_string()])
                    .args(["--threads", &threads.to_string()]);
                c
            }
        };
        cmd.env("RUST_LOG", "warn")
            .env_remove("DYN_ROUTER_MIN_INITIAL_WORKERS")
            .env_remove("DYN_KV_INDEXER_TEST_ENDPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .map_err(ServiceError::io(format!("spawn {}", kind.label())))?;
        let mut target = Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            kind,
            dir,
        };
        target.wait_healthy(Duration::from_secs(60)).await?;
        Ok(target)
    }

    async fn wait_healthy(&mut self, limit: Duration) -> Result<(), ServiceError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            self.check_alive()?;
            if let Ok(mut conn) = HttpConn::connect(self.addr).await {
                if conn.get("/health").await.is_ok_and(|a| a.status == 200) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(ServiceError::Timeout {
            what: format!("{} to answer /health", self.kind.label()),
            seconds: limit.as_secs_f64(),
        })
    }

    /// Fail with the log tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), ServiceError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ServiceError::Exited {
                name: self.kind.label(),
                status: status.to_string(),
                log: self.log_tail(20),
            }),
            Ok(None) => Ok(()),
            Err(e) => Err(ServiceError::io("wait for target")(e)),
        }
    }

    /// The last `n` lines of the process's stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Process id (for RSS readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 when unknown).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU time (user + system, all threads) process `pid` has used so far, in seconds: the
/// server's own cost, which other jobs on a shared machine do not inflate the way they inflate
/// wall time.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)` field; utime and stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Resident set size of process `pid` in bytes (`/proc/<pid>/statm` × page size).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_and_rss_are_readable_and_monotonic() {
        let ticks = clock_ticks_per_second();
        assert!(ticks > 0.0);
        let pid = std::process::id();
        let first = cpu_seconds(pid, ticks).expect("own /proc/<pid>/stat");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let second = cpu_seconds(pid, ticks).expect("own /proc/<pid>/stat");
        assert!(first >= 0.0 && second >= first, "{first} then {second}");
        assert!(rss_bytes(pid).is_some_and(|b| b > 0));
        assert_eq!(cpu_seconds(u32::MAX, ticks), None);
    }
}
