//! `router::python` on real CPython processes: each test starts an interpreter on a small
//! script that prints (as JSON) the addresses of some code objects, the lines CPython's own
//! `co_positions()` gives each of their code units, and where `_PyRuntime` and
//! `_PyEval_EvalFrameDefault` are (from `ctypes`); the script then blocks reading stdin,
//! three Python calls deep. The test checks that [`detect`] finds the same anchors, that
//! [`CodeReader::resolve`] names every code object and gives every code unit CPython's line,
//! and that walking the frame chain from `_PyRuntime` with the version's layout (as the
//! probe does) finds the blocked thread's stack.
//!
//! Interpreters: Debian's /usr/bin/python3.11 (non-PIE, libpython inside the executable) and
//! pyenv's 3.11, 3.12 and 3.13 (PIE, libpython3.X.so); those not installed are skipped, but
//! one must be.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use router::process::ProcessInfo;
use router::python::{detect, read_memory, CodeReader, PythonProcess, CODE_UNIT_SIZE};
use serde_json::Value;

/// The script; `# NAME` markers name the lines the blocked stack must show.
const SCRIPT: &str = r#"import ctypes, json, sys


class K:
    def method(self):
        x = 1
        def inner(y):
            return wait(y + x)  # CALL-wait
        return inner(2)  # CALL-inner


def outer():
    def nested():
        return 42
    return nested


def café():
    return "latin-1"


def 函数():
    return "UCS-2"


def wait(value):
    sys.stdin.readline()  # BLOCK
    return value


codes = {
    "K.method": K.method.__code__,
    "outer.<locals>.nested": outer().__code__,
    "café": café.__code__,
    "函数": 函数.__code__,
    "wait": wait.__code__,
    "<module>": sys._getframe().f_code,
}
api = ctypes.pythonapi
print(json.dumps({
    "codes": {
        name: {
            "id": id(code),
            "first": code.co_firstlineno,
            "file": code.co_filename,
            "lines": [p[0] for p in code.co_positions()],
        }
        for name, code in codes.items()
    },
    "runtime": ctypes.addressof(ctypes.c_char.in_dll(api, "_PyRuntime")),
    "eval": ctypes.cast(api._PyEval_EvalFrameDefault, ctypes.c_void_p).value,
    "hexversion": sys.hexversion,
}), flush=True)
K().method()  # CALL-method
"#;

/// The line of the script holding `marker`.
fn line_of(marker: &str) -> u32 {
    let index = SCRIPT
        .lines()
        .position(|line| line.ends_with(marker))
        .unwrap_or_else(|| panic!("no {marker} in the script"));
    u32::try_from(index + 1).unwrap()
}

/// A child process, killed and reaped however the test ends.
struct Python {
    child: Child,
    pid: u32,
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `interpreter` on the script (in a directory whose name needs UCS-4) and returns it
/// with the JSON it printed.
fn start(interpreter: &Path, dir: &Path) -> (Python, Value, PathBuf) {
    let script_dir = dir.join("scripts-ï-\u{10000}");
    fs::create_dir_all(&script_dir).unwrap();
    let script = script_dir.join("workload.py");
    fs::write(&script, SCRIPT).unwrap();
    let mut child = Command::new(interpreter)
        .arg(&script)
        .env("PYTHONUTF8", "1")
        .env_remove("PYTHONHOME")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|err| panic!("{interpreter:?}: {err}"));
    let stdout = child.stdout.take().unwrap();
    let pid = child.id();
    let python = Python { child, pid };
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = send.send(line);
    });
    let line = receive
        .recv_timeout(Duration::from_secs(60))
        .expect("the script prints its facts");
    let facts: Value = serde_json::from_str(&line)
        .unwrap_or_else(|err| panic!("{interpreter:?} printed {line:?}: {err}"));
    (python, facts, script)
}

fn read_u64(pid: u32, address: u64) -> u64 {
    let mut buf = [0u8; 8];
    assert!(
        read_memory(pid, address, &mut buf),
        "cannot read {address:#x} of {pid}"
    );
    u64::from_le_bytes(buf)
}

fn read_u8(pid: u32, address: u64) -> u8 {
    let mut buf = [0u8; 1];
    assert!(read_memory(pid, address, &mut buf));
    buf[0]
}

/// The (code object, instruction index) of each Python frame of thread `tid`, innermost
/// first, walked as the probe walks them.
fn walk(pid: u32, tid: u32, python: &PythonProcess) -> Vec<(u64, u32)> {
    let layout = python.layout;
    let interp = read_u64(
        pid,
        python.runtime_address + u64::from(layout.runtime_interpreters_head),
    );
    assert_ne!(interp, 0, "no interpreter");
    let mut tstate = read_u64(pid, interp + u64::from(layout.interp_threads_head));
    let mut seen = 0;
    while tstate != 0
        && read_u64(pid, tstate + u64::from(layout.tstate_native_thread_id)) != u64::from(tid)
    {
        tstate = read_u64(pid, tstate + u64::from(layout.tstate_next));
        seen += 1;
        assert!(seen < 100, "thread list does not end");
    }
    assert_ne!(tstate, 0, "no thread state for tid {tid}");
    let holder = match layout.tstate_cframe {
        Some(cframe) => read_u64(pid, tstate + u64::from(cframe)),
        None => tstate,
    };
    let mut frame = read_u64(pid, holder + u64::from(layout.cframe_current_frame));
    let mut frames = Vec::new();
    while frame != 0 && frames.len() < 100 {
        let owner = read_u8(pid, frame + u64::from(layout.frame_owner));
        if layout.minor == 11 || owner != layout.owned_by_cstack {
            let code = read_u64(pid, frame + u64::from(layout.frame_code));
            let instr = read_u64(pid, frame + u64::from(layout.frame_instr));
            let units = (instr.wrapping_sub(code + u64::from(layout.code_adaptive)) as i64)
                / CODE_UNIT_SIZE as i64;
            frames.push((code, units as u32));
        }
        frame = read_u64(pid, frame + u64::from(layout.frame_previous));
    }
    frames
}

/// Waits until the main thread of `pid` sits in `read(0, …)` (the script's last call).
fn wait_for_stdin_read(pid: u32) {
    for _ in 0..600 {
        // "0 0x0 …": syscall 0 (read) on fd 0.
        let syscall = fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if syscall.starts_with("0 0x0 ") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{pid} does not block reading stdin");
}

fn check(interpreter: &str, minor: u32) {
    let interpreter = Path::new(interpreter);
    if !interpreter.exists() {
        eprintln!("{interpreter:?} not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, facts, script) = start(interpreter, dir.path());
    let pid = child.pid;
    let script = script.to_str().unwrap().to_owned();
    let hexversion = facts["hexversion"].as_u64().unwrap();
    assert_eq!(
        (hexversion >> 16) & 0xff,
        u64::from(minor),
        "{interpreter:?}"
    );

    // Detection, against ctypes' view of the same symbols.
    let info = ProcessInfo::read(pid).expect("the child runs");
    let python = detect(pid, &info.maps)
        .unwrap_or_else(|| panic!("{interpreter:?}: CPython not detected in {:#?}", info.maps));
    assert_eq!(python.minor, minor);
    assert_eq!(python.layout.minor, minor);
    assert_eq!(python.runtime_address, facts["runtime"].as_u64().unwrap());
    assert_eq!(python.eval_start, facts["eval"].as_u64().unwrap());
    assert!(
        python.eval_end > python.eval_start && python.eval_end - python.eval_start < 1 << 20,
        "{python:?}"
    );
    // Again, from the cache: the same.
    assert_eq!(detect(pid, &info.maps), Some(python));

    // Every code unit of every code object gets CPython's line.
    let mut reader = CodeReader::new();
    let codes: BTreeMap<String, Value> = serde_json::from_value(facts["codes"].clone()).unwrap();
    let mut by_address = BTreeMap::new();
    for (name, code) in &codes {
        let address = code["id"].as_u64().unwrap();
        by_address.insert(address, name.clone());
        assert_eq!(code["file"].as_str(), Some(script.as_str()));
        let lines = code["lines"].as_array().unwrap();
        assert!(!lines.is_empty());
        for (index, line) in lines.iter().enumerate() {
            let frame = reader
                .resolve(pid, python.layout, address, index as u32)
                .unwrap_or_else(|| panic!("{name} at {index}: not resolved"));
            assert_eq!(&*frame.function, name.as_str());
            assert_eq!(&*frame.file, script);
            assert_eq!(
                u64::from(frame.line),
                line.as_u64().unwrap_or(0),
                "{name}, code unit {index}: CPython says line {line}"
            );
        }
        // Before the first instruction (3.11 and 3.12 frames that have not started).
        let first = reader
            .resolve(pid, python.layout, address, u32::MAX)
            .unwrap();
        assert_eq!(u64::from(first.line), code["first"].as_u64().unwrap());
        // Beyond the code: no line, but still the function.
        let beyond = reader
            .resolve(pid, python.layout, address, lines.len() as u32 + 100)
            .unwrap();
        assert_eq!((&*beyond.function, beyond.line), (name.as_str(), 0));
    }
    assert_eq!(reader.cached_codes(pid), codes.len());
    let method = codes["K.method"]["id"].as_u64().unwrap();
    assert_eq!(
        u64::from(reader.resolve(pid, python.layout, method, 0).unwrap().line),
        // None: K.method starts with MAKE_CELL (for `x`), which has no location.
        codes["K.method"]["lines"][0].as_u64().unwrap_or(0),
    );

    // The blocked main thread's stack, walked from _PyRuntime.
    wait_for_stdin_read(pid);
    let stack: Vec<(String, u32)> = walk(pid, pid, &python)
        .into_iter()
        .map(|(code, index)| {
            let frame = reader
                .resolve(pid, python.layout, code, index)
                .unwrap_or_else(|| panic!("frame code {code:#x} not resolved"));
            assert_eq!(&*frame.file, script);
            (frame.function.to_string(), frame.line)
        })
        .collect();
    let expected = [
        ("wait", line_of("# BLOCK")),
        ("K.method.<locals>.inner", line_of("# CALL-wait")),
        ("K.method", line_of("# CALL-inner")),
        ("<module>", line_of("# CALL-method")),
    ]
    .map(|(name, line)| (name.to_owned(), line));
    assert_eq!(stack, expected, "{interpreter:?}");
    assert!(by_address.values().any(|name| name == "wait"));

    // Cached code objects need no reads: they resolve after the process is gone …
    let _ = child.child.kill();
    let _ = child.child.wait();
    let cached = reader.resolve(pid, python.layout, method, 0).unwrap();
    assert_eq!(&*cached.function, "K.method");
    // … until forgotten.
    reader.forget(pid);
    assert_eq!(reader.cached_codes(pid), 0);
    assert!(reader.resolve(pid, python.layout, method, 0).is_none());
}

fn pyenv(version: &str, minor: u32) -> String {
    let root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".to_owned());
    format!("{root}/versions/{version}/bin/python3.{minor}")
}

#[test]
fn debian_python_3_11() {
    check("/usr/bin/python3.11", 11);
}

#[test]
fn pyenv_python_3_11() {
    check(&pyenv("3.11.7", 11), 11);
}

#[test]
fn pyenv_python_3_12() {
    check(&pyenv("3.12.1", 12), 12);
}

#[test]
fn pyenv_python_3_13() {
    check(&pyenv("3.13.0", 13), 13);
}

#[test]
fn some_python_is_installed() {
    assert!(
        Path::new("/usr/bin/python3.11").exists() || Path::new(&pyenv("3.12.1", 12)).exists(),
        "neither /usr/bin/python3.11 nor pyenv's 3.12.1 is installed"
    );
}

/// Not Python: the test binary itself, and a shell.
#[test]
fn not_python() {
    let me = ProcessInfo::read(std::process::id()).unwrap();
    assert_eq!(detect(std::process::id(), &me.maps), None);
    let mut shell = Command::new("sleep").arg("30").spawn().expect("sleep runs");
    let pid = shell.id();
    std::thread::sleep(Duration::from_millis(100));
    let maps = ProcessInfo::read(pid)
        .map(|info| info.maps)
        .unwrap_or_default();
    let found = detect(pid, &maps);
    let _ = shell.kill();
    let _ = shell.wait();
    assert_eq!(found, None);
}

/// Python 3.10 is not supported: detected as nothing.
#[test]
fn python_3_10_is_not_supported() {
    let interpreter = pyenv("3.10.13", 10);
    if !Path::new(&interpreter).exists() {
        eprintln!("{interpreter} not installed: skipped");
        return;
    }
    let child = Command::new(&interpreter)
        .args([
            "-c",
            "import sys; print(1, flush=True); sys.stdin.readline()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut python = Python { child, pid };
    let mut line = String::new();
    let _ = BufReader::new(python.child.stdout.take().unwrap()).read_line(&mut line);
    let maps = ProcessInfo::read(pid)
        .map(|info| info.maps)
        .unwrap_or_default();
    assert!(maps.iter().any(|m| m.path.contains("libpython3.10")));
    assert_eq!(detect(pid, &maps), None);
}
