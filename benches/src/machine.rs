//! The machine a result was measured on, recorded in every benchmark's JSON and text output:
//! a figure without its machine and commit cannot be reproduced or compared.

use serde::Serialize;
use std::path::Path;
use std::process::Command;

/// Cores, CPU model, memory and the commit of the code that produced a result.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub mem_total_gib: f64,
    pub commit: String,
}

impl Machine {
    /// Read from `/proc` and `git` (`"unknown"` / `0` where they cannot be read).
    pub fn detect() -> Self {
        Self {
            nproc: cores(),
            cpu: proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
            mem_total_gib: proc_field("/proc/meminfo", "MemTotal")
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / (1024.0 * 1024.0)),
            commit: commit(),
        }
    }
}

/// Cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The value after `key:` on the first line of `path` that starts with `key`.
fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Short hash of the checked-out commit of this repository.
fn commit() -> String {
    Command::new("git")
        .arg("-C")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")))
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_machine() {
        let m = Machine::detect();
        assert!(m.nproc >= 1);
        assert!(!m.cpu.is_empty());
        // The tests run inside the repository, so the commit is a short hex hash.
        assert!(
            m.commit.len() >= 7 && m.commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{}",
            m.commit
        );
    }
}
