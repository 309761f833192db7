//! JIT code named from the perf map files real runtimes write: Node with `--perf-basic-prof`,
//! Python 3.12 with `-X perf`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use router::symbolize::perf_map::PerfMaps;

const PYTHON: &str = "/root/.pyenv/versions/3.12.1/bin/python3.12";

/// A runtime writing a perf map: killed, and its map file removed, however the test ends.
struct Runtime {
    child: Child,
    map: PathBuf,
}

impl Runtime {
    fn start(program: &str, args: &[&str]) -> Self {
        let child = Command::new(program)
            .args(args)
            // Node writes its isolate logs into the working directory.
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let map = PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
        Self { child, map }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The start address of the last line of the map naming `function`, once there is one.
    fn wait_for(&mut self, function: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(start) = last_start_naming(&self.map, function) {
                return start;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the runtime exited ({status}) before its map named {function}");
            }
            assert!(
                Instant::now() < deadline,
                "{} never named {function}",
                self.map.display()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.map);
    }
}

fn last_start_naming(map: &Path, function: &str) -> Option<u64> {
    let text = fs::read_to_string(map).ok()?;
    text.lines()
        .rev()
        .filter(|l| l.contains(function))
        .find_map(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
}

#[test]
fn names_node_jit_code_from_perf_basic_prof() {
    let script = "function hotLoop() { let s = 0; for (let i = 0; i < 1e5; i++) { s += Math.sqrt(i); } return s; }
const until = Date.now() + 3000;
let total = 0;
while (Date.now() < until) { total += hotLoop(); }
console.log(total);";
    let mut node = Runtime::start("node", &["--perf-basic-prof", "-e", script]);
    let start = node.wait_for("hotLoop");
    let mut maps = PerfMaps::new();
    let name = maps.lookup(node.pid(), start + 1).expect("named");
    assert!(name.contains("hotLoop"), "{name}");
    maps.forget(node.pid());
}

#[test]
fn names_python_functions_from_x_perf() {
    if !Path::new(PYTHON).exists() {
        eprintln!("{PYTHON} is not installed: skipped");
        return;
    }
    let script = "import time
def perf_map_test_target():
    total = 0
    for i in range(1000):
        total += i
    return total
until = time.time() + 3
while time.time() < until:
    perf_map_test_target()
";
    let mut python = Runtime::start(PYTHON, &["-X", "perf", "-c", script]);
    let start = python.wait_for("py::perf_map_test_target:");
    let mut maps = PerfMaps::new();
    let name = maps.lookup(python.pid(), start + 1).expect("named");
    assert!(name.contains("perf_map_test_target"), "{name}");
    assert!(name.starts_with("py::"), "{name}");
}
