//! The symbolizer against real processes of binaries compiled here: a binary deleted and its
//! path reused while it runs, an inode reused by a different binary, hundreds of distinct
//! short-lived binaries against the cache's bounds, and a file the router may not read.

use std::{
    collections::HashSet,
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use router::{
    process::{MapEntry, ProcessInfo},
    symbolize::{CacheLimits, Symbolizer, Unreadable},
};

/// A program that prints the address of its function `NAME` and of `main`, then sleeps in
/// `NAME` until killed.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) void NAME(void) { for (;;) pause(); }
int main(void) {
    printf("%p %p\n", (void *)NAME, (void *)main);
    fflush(stdout);
    NAME();
    return 0;
}
"#;

/// Compiles [`PROGRAM`] to `output` with function `name` and GNU build id `build_id` (hex).
fn compile(dir: &Path, output: &Path, name: &str, build_id: &str) {
    let source = dir.join("program.c");
    fs::write(&source, PROGRAM).unwrap();
    let status = Command::new("gcc")
        .args(["-O1", "-g0", &format!("-DNAME={name}")])
        .arg(format!("-Wl,--build-id=0x{build_id}"))
        .arg("-o")
        .arg(output)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "gcc failed");
}

/// A running [`PROGRAM`]: killed and reaped however the test ends.
struct Workload {
    child: Child,
    map: MapEntry,
    /// File offset of its function `NAME`.
    function: u64,
    /// File offset of `main`.
    main: u64,
}

impl Workload {
    fn start(binary: &Path) -> Workload {
        let mut child = Command::new(binary).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addresses: Vec<u64> = line
            .split_whitespace()
            .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap())
            .collect();
        let process = ProcessInfo::read(child.id()).unwrap();
        let map = process.mapping_of(addresses[0]).unwrap().clone();
        assert_eq!(process.mapping_of(addresses[1]), Some(&map));
        Workload {
            child,
            function: map.file_offset(addresses[0]),
            main: map.file_offset(addresses[1]),
            map,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The names the symbolizer gives its function and `main`, and the build id it reads.
    fn symbolize(
        &self,
        symbolizer: &mut Symbolizer,
    ) -> (Option<String>, Option<String>, Option<String>) {
        let (pid, map) = (self.pid(), &self.map);
        symbolizer.prepare_user(pid, map, &HashSet::from([self.function, self.main]));
        let name = |offset| symbolizer.user(pid, map, offset).map(|s| s.name.clone());
        (
            name(self.function),
            name(self.main),
            symbolizer.build_id(pid, map).map(str::to_owned),
        )
    }

    fn stop(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh folder on the target's disk (a filesystem that reuses inodes, unlike tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

const ALPHA_ID: &str = "a1fa000000000000000000000000000000000001";
const OMEGA_ID: &str = "0e9a000000000000000000000000000000000002";

#[test]
fn a_binary_deleted_and_its_path_reused_while_it_runs_keeps_its_own_names() {
    let dir = scratch();
    let path = dir.path().join("service");
    compile(dir.path(), &path, "alpha_function", ALPHA_ID);
    let workload = Workload::start(&path);
    fs::remove_file(&path).unwrap();
    compile(dir.path(), &path, "omega_function", OMEGA_ID);
    assert_eq!(workload.map.path, path.to_str().unwrap());

    let mut symbolizer = Symbolizer::new();
    let (function, main, build_id) = workload.symbolize(&mut symbolizer);
    assert_eq!(function.as_deref(), Some("alpha_function"));
    assert_eq!(main.as_deref(), Some("main"));
    assert_eq!(build_id.as_deref(), Some(ALPHA_ID));
}

#[test]
fn an_inode_reused_by_a_different_binary_gives_the_new_names() {
    let dir = scratch();
    let alpha = dir.path().join("alpha");
    let omega_build = dir.path().join("omega.build");
    compile(dir.path(), &alpha, "alpha_function", ALPHA_ID);
    compile(dir.path(), &omega_build, "omega_function", OMEGA_ID);

    let mut symbolizer = Symbolizer::new();
    let first = Workload::start(&alpha);
    assert_eq!(
        first.symbolize(&mut symbolizer).0.as_deref(),
        Some("alpha_function")
    );
    let (first_pid, first_map, first_offset) = (first.pid(), first.map.clone(), first.function);
    first.stop();
    // The agent forgets an exited process (and closes the files it opened through it).
    symbolizer.forget_processes(&HashSet::from([first_pid]));
    symbolizer.end_interval();
    fs::remove_file(&alpha).unwrap();

    // ext4 hands a freed inode to the next file created: copy until a copy has alpha's.
    let omega = (0..20)
        .map(|i| {
            let copy = dir.path().join(format!("omega{i}"));
            fs::copy(&omega_build, &copy).unwrap();
            copy
        })
        .find(|copy| fs::metadata(copy).unwrap().ino() == first_map.inode)
        .expect("the filesystem of CARGO_TARGET_TMPDIR did not reuse the freed inode");
    let second = Workload::start(&omega);
    assert_eq!(
        (second.map.dev, second.map.inode),
        (first_map.dev, first_map.inode)
    );
    assert_eq!(
        second.function, first_offset,
        "same layout: the old answer would apply"
    );

    let (function, main, build_id) = second.symbolize(&mut symbolizer);
    assert_eq!(function.as_deref(), Some("omega_function"));
    assert_eq!(main.as_deref(), Some("main"));
    assert_eq!(build_id.as_deref(), Some(OMEGA_ID));
}

/// `bytes` with every occurrence of `from` replaced by `to` (same length), at least once.
fn replace_all(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut found = false;
    for i in 0..=bytes.len() - from.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + to.len()].copy_from_slice(to);
            found = true;
        }
    }
    assert!(found, "{} not in the binary", String::from_utf8_lossy(from));
}

fn hex(bytes: &str) -> Vec<u8> {
    (0..bytes.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&bytes[i..i + 2], 16).unwrap())
        .collect()
}

/// Descriptors of this process open on files under `dir`.
fn descriptors_under(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[test]
fn hundreds_of_short_lived_binaries_keep_the_caches_within_their_bounds() {
    const BINARIES: usize = 300;
    let limits = CacheLimits {
        entries: 64,
        bytes: 4_000,
        open_files: 4,
    };
    let dir = scratch();
    let template_id = "5eed000000000000000000000000000000000000";
    let template = dir.path().join("template");
    compile(dir.path(), &template, "distinct_fn_000000", template_id);
    let template = fs::read(&template).unwrap();

    let mut symbolizer = Symbolizer::with_limits(limits);
    let mut most = (0, 0, 0);
    for i in 0..BINARIES {
        // A distinct binary: its own function name and build id.
        let name = format!("distinct_fn_{i:06}");
        let build_id = format!("5eed{i:036x}");
        let mut bytes = template.clone();
        replace_all(&mut bytes, b"distinct_fn_000000", name.as_bytes());
        replace_all(&mut bytes, &hex(template_id), &hex(&build_id));
        let path: PathBuf = dir.path().join(format!("binary{i}"));
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();

        let workload = Workload::start(&path);
        let (function, main, seen_id) = workload.symbolize(&mut symbolizer);
        assert_eq!(function, Some(name));
        assert_eq!(main.as_deref(), Some("main"));
        assert_eq!(seen_id, Some(build_id));
        workload.stop();
        symbolizer.end_interval();

        let stats = symbolizer.stats();
        assert!(stats.entries as usize <= limits.entries, "{stats:?}");
        assert!(stats.bytes as usize <= limits.bytes, "{stats:?}");
        assert!(stats.open_files as usize <= limits.open_files, "{stats:?}");
        // Two descriptors for each open file: the symbolizer's own (the file it checked),
        // and blazesym's open of it through /proc/self/fd.
        let held = descriptors_under(dir.path());
        assert!(
            held <= 2 * limits.open_files,
            "{held} descriptors held open"
        );
        most = (
            most.0.max(stats.entries),
            most.1.max(stats.bytes),
            most.2.max(held),
        );
    }
    let stats = symbolizer.stats();
    assert_eq!(stats.misses, 2 * BINARIES as u64);
    assert!(
        stats.evicted >= 2 * BINARIES as u64 - limits.entries as u64,
        "{stats:?}"
    );
    println!(
        "at most {} answers, {} bytes, {} files open",
        most.0, most.1, most.2
    );
}

/// A root process's binary, in a folder only root may enter, seen by an unprivileged router:
/// counted as permission denied, not as an exited process.
#[test]
fn permission_denied_is_its_own_reason() {
    let dir = scratch();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.path().join("private");
    compile(dir.path(), &path, "private_function", ALPHA_ID);
    let workload = Workload::start(&path);
    let map = &workload.map;
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "symbolize_as_nobody", "--ignored", "--nocapture"])
        .env(
            "SYMBOLIZE_AS_NOBODY",
            format!(
                "{} {} {} {} {} {} {} {}",
                workload.pid(),
                map.start,
                map.end,
                map.offset,
                map.dev,
                map.inode,
                workload.function,
                map.path
            ),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("permission_denied=1 process_exited=0"),
        "{stdout}"
    );
}

/// The unprivileged half of [`permission_denied_is_its_own_reason`].
#[test]
#[ignore = "run by permission_denied_is_its_own_reason as another user"]
fn symbolize_as_nobody() {
    let spec = std::env::var("SYMBOLIZE_AS_NOBODY").unwrap();
    let fields: Vec<&str> = spec.splitn(8, ' ').collect();
    let number = |i: usize| fields[i].parse::<u64>().unwrap();
    let pid = number(0) as u32;
    let map = MapEntry {
        start: number(1),
        end: number(2),
        offset: number(3),
        dev: number(4),
        inode: number(5),
        path: fields[7].to_owned(),
    };
    let mut symbolizer = Symbolizer::new();
    symbolizer.prepare_user(pid, &map, &HashSet::from([number(6)]));
    assert_eq!(symbolizer.user(pid, &map, number(6)), None);
    let stats = symbolizer.stats();
    println!(
        "permission_denied={} process_exited={}",
        stats.unreadable(Unreadable::PermissionDenied),
        stats.unreadable(Unreadable::ProcessExited)
    );
}
