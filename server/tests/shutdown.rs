//! Graceful shutdown of `kvindex serve` (docs/operations.md, "Shutdown"): a second signal ends a
//! stalled shutdown at once, the shutdown budget cuts a stalled drain, and a signal during
//! start-up stops it cleanly. Shutdown is held deterministically (a request whose body never
//! comes, an access log that is a FIFO nobody reads); no test asserts on timing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Poll (bounded) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// A `POST /query` in flight on `s` that never gets its body: returned once the handler reads
/// the body (hyper then answers `100 Continue`), so the drain at shutdown waits for it.
fn held_request(s: &Server) -> TcpStream {
    let mut c = TcpStream::connect(&s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(
        b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 50\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("100 Continue") {
        let n = c.read(&mut buf).expect("read 100 Continue");
        assert!(
            n > 0,
            "closed before 100 Continue: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    c
}

fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => unreachable!(),
    }
}

/// A shutdown held by a request that never finishes (a read deadline and a budget of an
/// hour) ends at the second signal, with 128 + that signal's number, after a best-effort sync.
#[test]
fn a_second_signal_ends_a_held_shutdown_at_once() {
    for (first, second, code) in [
        (libc::SIGTERM, libc::SIGINT, 130),
        (libc::SIGINT, libc::SIGTERM, 143),
    ] {
        let (_dir, data) = data_dir();
        let s = start(
            &data,
            &[
                "--http-read-timeout-ms",
                "3600000",
                "--shutdown-timeout-s",
                "3600",
            ],
            &[],
        );
        register(&s, 1, "m", 4);
        let _held = held_request(&s);
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(s.pid(), first);
        }
        let shutting_down = format!("{} received, shutting down", name(first));
        wait_for(&shutting_down, || s.stderr().contains(&shutting_down));
        let (status, log) = s.signal(second);
        let log = log.join("\n");
        assert_eq!(status.code(), Some(code), "{log}");
        for line in [
            &format!("{} received during the shutdown", name(second)),
            "event log synced before the forced exit",
        ] {
            assert!(log.contains(line), "{line}: {log}");
        }
        assert!(!log.contains("event log synced and closed"), "{log}");
    }
}

/// A drain held by a stalled request is cut at the shutdown budget (well before the read
/// deadline): the cut is logged, the log synced, and the exit is still 0.
#[test]
fn the_shutdown_budget_cuts_a_stalled_drain() {
    let (_dir, data) = data_dir();
    let s = start(
        &data,
        &[
            "--http-read-timeout-ms",
            "3600000",
            "--shutdown-timeout-s",
            "1",
        ],
        &[],
    );
    let _held = held_request(&s);
    let (status, log) = s.terminate();
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("shutdown budget (--shutdown-timeout-s) spent: open HTTP connections cut off")
            && log.contains("connections=1"),
        "{log}"
    );
    assert!(log.contains("event log synced"), "{log}");
}

#[test]
fn a_zero_shutdown_budget_is_refused() {
    let (code, _, err) = run(&["serve", "--shutdown-timeout-s", "0"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Exception: --shutdown-timeout-s must be at least 1"),
        "{err}"
    );
}

/// Start-up held before recovery: the access log is a FIFO, whose open waits for a reader.
/// Returned once the signal handlers are installed (they come first).
fn held_start_up(
    dir: &tempfile::TempDir,
    data: &std::path::Path,
) -> (Starting, std::path::PathBuf) {
    use std::os::unix::ffi::OsStrExt;
    let fifo = dir.path().join("access.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let fifo_arg = fifo.to_str().unwrap().to_owned();
    let starting = spawn(
        data,
        &["--access-log", &fifo_arg],
        &[("RUST_LOG", "info,kvindex::shutdown=debug")],
    );
    wait_for("the signal handlers", || {
        starting.logged(&["SIGINT / SIGTERM handlers installed"])
    });
    (starting, fifo)
}

/// A SIGTERM while start-up is held (before recovery, long before HTTP listens) stops
/// start-up at the next step: nothing is served, exit 0, and the data directory is usable.
#[test]
fn a_signal_during_start_up_stops_it_cleanly() {
    let (dir, data) = data_dir();
    let (mut starting, fifo) = held_start_up(&dir, &data);
    starting.kill(libc::SIGTERM);
    wait_for("the signal handled", || {
        starting.logged(&["SIGTERM received, shutting down"]) || starting.exited().is_some()
    });
    // Release the hold: give the FIFO a reader.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open the FIFO")
    };
    let (status, log) = starting.wait_exit();
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("shutdown requested during start-up: stopping before serving"),
        "{log}"
    );
    for never in ["recovered the index", "HTTP server listening"] {
        assert!(!log.contains(never), "{never}: {log}");
    }
    // The data directory is usable: a normal start on it serves.
    let s = start(&data, &[], &[]);
    assert_eq!(s.get("/health").status, 200);
}

/// A start-up stuck in a step (the FIFO never gets a reader) ends at the second signal.
#[test]
fn a_second_signal_ends_a_stuck_start_up() {
    let (dir, data) = data_dir();
    let (mut starting, _fifo) = held_start_up(&dir, &data);
    starting.kill(libc::SIGTERM);
    wait_for("the first signal handled", || {
        starting.logged(&["SIGTERM received, shutting down"]) || starting.exited().is_some()
    });
    starting.kill(libc::SIGINT);
    let (status, log) = starting.wait_exit();
    let log = log.join("\n");
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("SIGINT received during the shutdown"), "{log}");
    assert!(!log.contains("HTTP server listening"), "{log}");
}
