//! Helpers shared by the router's integration tests: build the plugins, write recordings,
//! run the real `router` binary with a deadline.
#![allow(dead_code)]

pub mod datadog_peer;
pub mod otlp_peer;
pub mod sampling;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use plugin_api::{
    fixtures::{synthetic_batch, BatchShape},
    ProfileBatch,
};

/// The real router binary.
pub fn router_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_router"))
}

/// The folder with the router and the workspace's plugins, built once per test run.
pub fn plugin_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--quiet",
            "-p",
            "test-consumer",
            "-p",
            "other-contract-consumer",
            "-p",
            "consumer-perfdata",
            "-p",
            "consumer-datadog",
            "-p",
            "consumer-otlp",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the plugins");
        assert!(status.success(), "building the plugins failed");
        router_bin().parent().unwrap().to_owned()
    })
}

/// Path of a plugin built by this workspace.
pub fn plugin(lib_name: &str) -> PathBuf {
    plugin_dir().join(format!("lib{lib_name}.so"))
}

/// Small synthetic batches, `count` of them, one after the other in time.
pub fn small_batches(count: usize) -> Vec<ProfileBatch> {
    let shape = BatchShape {
        samples: 200,
        unique_stacks: 20,
        depth: 8,
        processes: 3,
        kernel_frames: 2,
    };
    (0..count)
        .map(|i| synthetic_batch(shape, 1_700_000_000_000_000_000 + i as u64 * 10_000_000_000))
        .collect()
}

/// Writes `batches` as a recording in `dir`.
pub fn write_recording(dir: &Path, batches: &[ProfileBatch]) -> PathBuf {
    let path = dir.join("recording.jsonl");
    let text: String = batches
        .iter()
        .map(|b| serde_json::to_string(b).unwrap() + "\n")
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes `text` as `agent.toml` in `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `[consumers.NAME]` table for the test consumer writing to `output`.
pub fn test_consumer_table(name: &str, output: &Path, extra: &str) -> String {
    format!(
        "[consumers.{name}]\nplugin = \"{}\"\noutput = \"{}\"\n{extra}\n",
        plugin("test_consumer").display(),
        output.display()
    )
}

/// A router command with a clean environment for our variables; the plugins it loads from
/// its own folder are built first.
pub fn router() -> Command {
    plugin_dir();
    let mut cmd = Command::new(router_bin());
    for (key, _) in std::env::vars() {
        if key.starts_with("ROUTER_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Starts `router --config CONFIG` (plus `args`) with its output piped.
pub fn spawn_router(config: &Path, args: &[&str]) -> Child {
    router()
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start router")
}

/// Sends `signal` to `child`, waits (at most `limit`) and returns its log; fails the test
/// unless it exited 0.
pub fn signal_and_expect_success(child: Child, signal: i32, limit: Duration) -> String {
    // SAFETY: kill(2) on a child process we started.
    unsafe { libc::kill(child.id() as i32, signal) };
    expect_success(wait_with_limit(child, limit))
}

/// The log of a finished run; fails the test unless it exited 0.
pub fn expect_success(out: Output) -> String {
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    log
}

/// Runs `cmd` to completion, killing it after `limit`.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start router");
    wait_with_limit(child, limit)
}

/// Waits for `child`, killing it after `limit` (the test then fails on its status). Its output
/// pipes are drained meanwhile, so a chatty child never blocks on a full pipe.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = stderr.join().unwrap();
    if killed {
        stderr.extend_from_slice(b"\n[test: killed after the time limit]");
    }
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr,
    }
}

/// Stdout and stderr of a finished run, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits (at most a minute) until the test consumer wrote at least `count` consume lines to
/// `path`.
pub fn wait_for_consumed(path: &Path, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() || consumed(path).len() < count {
        assert!(
            Instant::now() < deadline,
            "{} never had {count} batches",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON lines the test consumer wrote.
pub fn consumer_lines(path: &Path) -> Vec<serde_json::Value> {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        f.read_to_string(&mut text).unwrap();
    }
    // The plugin may be writing the last line right now: only whole lines count.
    let whole = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `consume` lines among them.
pub fn consumed(path: &Path) -> Vec<serde_json::Value> {
    consumer_lines(path)
        .into_iter()
        .filter(|l| l["call"] == "consume")
        .collect()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A process killed when dropped (a test peer).
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP request as a scripted server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Request line, e.g. `POST /api/v2/profile HTTP/1.1`.
    pub request_line: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl SeenRequest {
    /// The value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a scripted server does with a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer with this status and body.
    Status(u16, &'static str),
    /// Read the request and never answer (until the connection is dropped).
    Hang,
}

/// An HTTP/1.1 server on 127.0.0.1 answering requests with a script (the last reply repeats),
/// recording each request. For failure modes the real peers cannot produce on demand.
pub struct ScriptedServer {
    /// Its port.
    pub port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<SeenRequest>>>,
    /// The replies still to give, and how many were given.
    script: std::sync::Arc<std::sync::Mutex<(Vec<Reply>, usize)>>,
}

impl ScriptedServer {
    /// Starts the server with its replies, in order. A Datadog Agent's `GET /info` is
    /// answered 404 (an Agent too old to have one), outside the script and not recorded.
    pub fn start(replies: Vec<Reply>) -> ScriptedServer {
        Self::start_with_info(Reply::Status(404, ""), replies)
    }

    /// [`ScriptedServer::start`], answering `GET /info` with `info`.
    pub fn start_with_info(info: Reply, replies: Vec<Reply>) -> ScriptedServer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let script = std::sync::Arc::new(std::sync::Mutex::new((replies, 0usize)));
        let scripted = script.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                let record = record.clone();
                let script = script.clone();
                let info = info.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    reader.read_line(&mut request_line).unwrap_or(0);
                    let mut headers = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = line.trim_end().split_once(':') {
                            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                        }
                    }
                    let length: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; length];
                    let _ = std::io::Read::read_exact(&mut reader, &mut body);
                    let reply = if request_line.starts_with("GET /info ") {
                        info
                    } else {
                        record.lock().unwrap().push(SeenRequest {
                            request_line: request_line.trim_end().to_owned(),
                            headers,
                            body,
                        });
                        let mut script = script.lock().unwrap();
                        let (replies, n) = &mut *script;
                        let reply = replies[(*n).min(replies.len() - 1)].clone();
                        *n += 1;
                        reply
                    };
                    match reply {
                        Reply::Status(code, text) => {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 {code} Scripted\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                                text.len()
                            );
                        }
                        Reply::Hang => std::thread::sleep(Duration::from_secs(30)),
                    }
                });
            }
        });
        ScriptedServer {
            port,
            seen,
            script: scripted,
        }
    }

    /// From now on, answers with `replies` instead (in order, the last one repeating).
    pub fn set_replies(&self, replies: Vec<Reply>) {
        *self.script.lock().unwrap() = (replies, 0);
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// Compiles the spin workload; returns its path and its symbols' addresses.
pub fn spin_binary(dir: &Path) -> (PathBuf, std::collections::HashMap<String, u64>) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/spin.c");
    let binary = dir.join("spin");
    let status = Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&binary)
        .arg(source)
        .status()
        .unwrap();
    assert!(status.success());
    let nm = Command::new("nm").arg(&binary).output().unwrap();
    let symbols = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let address = u64::from_str_radix(f.next()?, 16).ok()?;
            let _kind = f.next()?;
            Some((f.next()?.to_owned(), address))
        })
        .collect();
    (binary, symbols)
}
