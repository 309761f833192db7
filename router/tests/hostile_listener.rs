//! The telemetry listener and `/healthz` under a hostile or failing host: more connections
//! than the router has file descriptors, hundreds of idle connections, a producer that stops
//! publishing. The real router, replaying a recording; the numbers measured are printed
//! (`--nocapture`).

mod common;

use std::{
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    os::{
        fd::AsRawFd,
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::Path,
    process::{Child, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::*;

/// The attacks run one at a time, so that each one's threads and RSS are its own.
static ONE_ATTACK_AT_A_TIME: Mutex<()> = Mutex::new(());

/// More threads than this and the listener is not bounded (the router has about a dozen).
const MAX_THREADS: u64 = 40;
/// More RSS growth than this during an attack and the listener's memory is not bounded.
const MAX_RSS_GROWTH_KB: u64 = 10 * 1024;
/// How soon after the attack the endpoint must answer again.
const ANSWERS_AGAIN_WITHIN: Duration = Duration::from_secs(2);

/// A router replaying batches every 200 ms for minutes, serving telemetry on `port`, with at
/// most `open_files` file descriptors when given (RLIMIT_NOFILE, soft); its log goes to
/// `DIR/router.log`.
fn start_router(dir: &Path, port: u16, open_files: Option<u64>) -> Child {
    let recording = write_recording(dir, &small_batches(3));
    let out = dir.join("out.jsonl");
    let config = write_config(
        dir,
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 50\nreplay.repeat = 1000\n{}",
            recording.display(),
            test_consumer_table("c", &out, "")
        ),
    );
    let mut command = router();
    command
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(File::create(dir.join("router.log")).unwrap());
    if let Some(soft) = open_files {
        let hard = fd_limit().rlim_max;
        // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let child = command.spawn().expect("start router");
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "the router never listened on {port}"
    );
    wait_for_consumed(&out, 2);
    child
}

fn fd_limit() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

/// Lets this test process hold as many sockets as its hard limit allows.
fn raise_own_fd_limit() {
    let mut limit = fd_limit();
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit(2) reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// Threads and resident KiB of process `pid`, from /proc/PID/status.
fn threads_and_rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
    };
    (field("Threads:"), field("VmRSS:"))
}

/// The peak threads and RSS of `pid` sampled every 50 ms for `duration`.
fn peak_usage(pid: u32, duration: Duration) -> (u64, u64) {
    let end = Instant::now() + duration;
    let mut peak = (0, 0);
    while Instant::now() < end {
        let (threads, rss) = threads_and_rss_kb(pid);
        peak = (peak.0.max(threads), peak.1.max(rss));
        std::thread::sleep(Duration::from_millis(50));
    }
    peak
}

/// One `GET path` with second-long timeouts: the status and body, or what went wrong.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let address = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// How long until both `/healthz` and `/metrics` answer 200, polling for at most `limit`.
fn time_until_answering(port: u16, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let healthz = get(port, "/healthz");
        let metrics = get(port, "/metrics");
        match (&healthz, &metrics) {
            (Ok((200, _)), Ok((200, _))) => return Ok(start.elapsed()),
            _ if start.elapsed() > limit => {
                return Err(format!("/healthz: {healthz:?}\n/metrics: {metrics:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The value of the sample `series` (`name{labels}`) in the router's `/metrics`.
fn metric(port: u16, series: &str) -> f64 {
    let (_, exposition) = get(port, "/metrics").unwrap();
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
}

/// `count` connections to `port` that send nothing; the ones that could not be opened are
/// counted, not fatal (a listener that died refuses them).
fn open_idle_connections(port: u16, count: usize) -> (Vec<TcpStream>, usize) {
    let address = ([127, 0, 0, 1], port).into();
    let mut failed = 0;
    let open = (0..count)
        .filter_map(|_| {
            TcpStream::connect_timeout(&address, Duration::from_secs(2))
                .map_err(|_| failed += 1)
                .ok()
        })
        .collect();
    (open, failed)
}

/// Stops the router with SIGTERM; it must exit 0.
fn stop(child: Child) {
    signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(60));
}

/// Fails unless the router started by [`start_router`] in `dir` still runs.
fn assert_running(child: &mut Child, dir: &Path, during: &str) {
    if let Some(status) = child.try_wait().unwrap() {
        let log = std::fs::read_to_string(dir.join("router.log")).unwrap_or_default();
        panic!("the router exited ({status}) {during}:\n{log}");
    }
}

/// The router's threads and RSS during an attack stayed within the bounds.
fn assert_bounded(threads: u64, rss_kb: u64, rss_before_kb: u64, during: &str) {
    assert!(threads < MAX_THREADS, "{threads} threads during {during}");
    assert!(
        rss_kb < rss_before_kb + MAX_RSS_GROWTH_KB,
        "RSS from {rss_before_kb} to {rss_kb} KiB during {during}"
    );
}

#[test]
fn eleven_hundred_connections_under_ulimit_1024_leave_threads_bounded_and_the_listener_answering() {
    raise_own_fd_limit();
    let _alone = ONE_ATTACK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = start_router(dir.path(), port, Some(1024));
    let pid = child.id();
    let before = threads_and_rss_kb(pid);

    let (clients, failed) = open_idle_connections(port, 1100);
    let (threads, rss) = peak_usage(pid, Duration::from_secs(2));
    assert_running(&mut child, dir.path(), "while 1 100 connections were open");
    drop(clients);
    let answered_after = time_until_answering(port, ANSWERS_AGAIN_WITHIN);
    let after = threads_and_rss_kb(pid);
    println!(
        "1 100 connections under ulimit -n 1024 ({failed} could not connect): threads {} before, {threads} at most during, {} after; RSS {} KiB before, {rss} KiB at most during, {} KiB after; /healthz and /metrics answered {answered_after:?} after the clients closed",
        before.0, after.0, before.1, after.1
    );
    assert_bounded(threads, rss, before.1, "1 100 connections");
    answered_after.expect("/healthz and /metrics answer right after the clients close");
    assert!(
        metric(
            port,
            "router_telemetry_connections_refused_total{reason=\"connection_limit\"}"
        ) > 0.0
    );
    assert_eq!(
        get(port, "/nowhere"),
        Ok((404, "not found: try /metrics or /healthz\n".to_owned()))
    );
    assert_running(&mut child, dir.path(), "after 1 100 connections");
    stop(child);
}

#[test]
fn connections_beyond_the_file_descriptor_limit_pause_the_listener_which_then_answers_again() {
    raise_own_fd_limit();
    let _alone = ONE_ATTACK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Fewer descriptors than the listener takes connections: accept fails with EMFILE.
    let mut child = start_router(dir.path(), port, Some(64));

    let (clients, _) = open_idle_connections(port, 200);
    std::thread::sleep(Duration::from_secs(1));
    assert_running(&mut child, dir.path(), "while accept failed with EMFILE");
    drop(clients);
    let answered_after = time_until_answering(port, ANSWERS_AGAIN_WITHIN);
    println!("200 connections under ulimit -n 64: /healthz and /metrics answered {answered_after:?} after the clients closed");
    answered_after.expect("/healthz and /metrics answer right after the clients close");
    assert!(
        metric(
            port,
            "router_telemetry_connections_refused_total{reason=\"out_of_resources\"}"
        ) > 0.0,
        "the failed accepts are counted"
    );
    stop(child);
}

#[test]
fn six_hundred_idle_connections_leave_threads_and_memory_bounded_and_time_out() {
    raise_own_fd_limit();
    let _alone = ONE_ATTACK_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = start_router(dir.path(), port, None);
    let pid = child.id();
    let before = threads_and_rss_kb(pid);

    // Held past the listener's header timeout (5 s): it closes its side meanwhile.
    let (clients, failed) = open_idle_connections(port, 600);
    let (threads, rss) = peak_usage(pid, Duration::from_secs(6));
    assert_running(
        &mut child,
        dir.path(),
        "while 600 idle connections were open",
    );
    let answered_while_held = time_until_answering(port, ANSWERS_AGAIN_WITHIN);
    drop(clients);
    let answered_after = time_until_answering(port, ANSWERS_AGAIN_WITHIN);
    let after = threads_and_rss_kb(pid);
    println!(
        "600 idle connections ({failed} could not connect): threads {} before, {threads} at most during, {} after; RSS {} KiB before, {rss} KiB at most during, {} KiB after; answered {answered_while_held:?} after the header timeout with the clients still connected, {answered_after:?} after they closed",
        before.0, after.0, before.1, after.1
    );
    assert_bounded(threads, rss, before.1, "600 idle connections");
    answered_while_held.expect("idle connections are closed after the header timeout");
    answered_after.expect("/healthz and /metrics answer right after the clients close");
    assert!(metric(port, "router_telemetry_connections_timed_out_total") > 0.0);
    stop(child);
}

/// Reads from the FIFO `reader` until `lines` newlines have come (at most a minute).
fn read_lines(reader: &mut File, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut buffer) = (0, [0u8; 4096]);
    while seen < lines {
        assert!(Instant::now() < deadline, "only {seen} lines recorded");
        match reader.read(&mut buffer) {
            // 0: the router has not opened it yet.
            Ok(0) => std::thread::sleep(Duration::from_millis(10)),
            Ok(n) => seen += buffer[..n].iter().filter(|&&b| b == b'\n').count(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reading the recording FIFO: {e}"),
        }
    }
}

/// Polls `/healthz` (at most `limit`) until `wanted` accepts its status and body.
fn healthz_until(port: u16, limit: Duration, wanted: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        let answer = get(port, "/healthz").unwrap();
        if wanted(answer.0, &answer.1) || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_producer_that_stops_publishing_makes_healthz_503_with_the_reason_until_it_publishes_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The producer thread writes each batch to the recording before publishing it: a FIFO
    // whose reader stops reading blocks it there, as a FIFO perf map once blocked it in open.
    let fifo = dir.path().join("recording.fifo");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // SAFETY: fcntl(2) on a pipe this test holds; the smallest pipe fills at once.
    unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let recording = write_recording(dir.path(), &small_batches(3));
    let config = write_config(
        dir.path(),
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 50\nreplay.repeat = 1000\n{}",
            recording.display(),
            test_consumer_table("c", &dir.path().join("out.jsonl"), "")
        ),
    );
    let child = spawn_router(&config, &["--record", fifo.to_str().unwrap()]);
    assert!(wait_for_port(port, Duration::from_secs(30)));
    read_lines(&mut reader, 3);
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"), "while batches come");

    // Nothing read from now on: the producer blocks within a batch (every 200 ms), and
    // /healthz must say so after the least time allowed (10 s).
    let stalled = Instant::now();
    let (status, body) = healthz_until(port, Duration::from_secs(30), |status, _| status == 503);
    println!(
        "/healthz after {:?} of a stalled producer: {status} {body:?}",
        stalled.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("unhealthy: producer: no interval published for ")
            && body.contains("(interval 200ms, allowed 10s)"),
        "{body}"
    );
    let published = metric(port, "router_batches_published_total");

    // The reader goes away: the recording stops (EPIPE), the producer publishes again.
    drop(reader);
    let (status, body) = healthz_until(port, Duration::from_secs(10), |status, _| status == 200);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(metric(port, "router_batches_published_total") > published);
    let log = signal_and_expect_success(child, libc::SIGTERM, Duration::from_secs(60));
    assert!(log.contains("recording stopped"), "{log}");
}
