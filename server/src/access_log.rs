//! The `--access-log` file: one JSON line per request (SERVICE.md §3.13), reopened by
//! `POST /reopen_logs` so logrotate can rename it away.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One access-log line.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    pub ts: String,
    pub trace_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub duration_ms: f64,
}

/// The open access-log file.
pub struct AccessLog {
    path: PathBuf,
    file: Mutex<File>,
    local_time: bool,
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Open (create or append to) `path`.
    pub fn open(path: &Path, local_time: bool) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(open(path)?),
            local_time,
        })
    }

    /// Reopen the file at its path (after a rename by logrotate).
    pub fn reopen(&self) -> std::io::Result<()> {
        let f = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = f;
        Ok(())
    }

    /// The timestamp format of this log, for now.
    pub fn timestamp(&self) -> String {
        format_timestamp(SystemTime::now(), self.local_time)
    }

    /// Append one line; a write failure is logged, never returned to the client.
    pub fn write(&self, rec: &AccessRecord<'_>) {
        let Ok(mut line) = serde_json::to_vec(rec) else {
            return;
        };
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(&line) {
            tracing::warn!(path = %self.path.display(), error = %e, "access log write failed");
        }
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The local UTC offset in seconds at `secs` since the epoch.
fn local_offset(secs: i64) -> i64 {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain data, fully written by localtime_r on success; both pointers are
    // valid for the call.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            0
        } else {
            tm.tm_gmtoff
        }
    }
}

/// `2026-11-23T23:55:57.327Z` (UTC), or `2026-11-24T00:55:57.327+01:00` in local time.
pub fn format_timestamp(t: SystemTime, local: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let millis = d.subsec_millis();
    let offset = if local { local_offset(secs) } else { 0 };
    let shifted = secs + offset;
    let (y, mo, day) = civil_from_days(shifted.div_euclid(86_400));
    let sod = shifted.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    let base = format!("{y:04}-{mo:02}-{day:02}T{h:02}:{mi:02}:{s:02}.{millis:03}");
    if !local {
        return format!("{base}Z");
    }
    let sign = if offset < 0 { '-' } else { '+' };
    let o = offset.abs();
    format!("{base}{sign}{:02}:{:02}", o / 3600, (o % 3600) / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_timestamps_have_millis_and_z() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_478_157_327);
        assert_eq!(format_timestamp(t, false), "2026-11-23T23:55:57.327Z");
        assert_eq!(
            format_timestamp(UNIX_EPOCH, false),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_timestamp(leap, false), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn local_timestamps_carry_an_offset() {
        let ts = format_timestamp(SystemTime::now(), true);
        let (_, offset) = ts.split_at(23);
        assert!(
            offset.len() == 6 && (offset.starts_with('+') || offset.starts_with('-')),
            "{ts}"
        );
    }
}
