//! The perf.data consumer on a tiny disk (a 64 KiB tmpfs): retention makes room before each
//! write, a profile that cannot fit is dropped and counted, writing resumes once there is room
//! again, and every file left is read by `perf script`. Needs root (mount).

mod common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use plugin_api::{
    fixtures::{synthetic_batch, BatchShape},
    ProfileBatch,
};

const LIMIT: Duration = Duration::from_secs(60);
/// Samples per batch: each batch makes one perf.data file of about 18 KB, five 4 KiB pages of
/// the tmpfs, so that the 16 pages of the disk hold three of them with a page to spare.
const SAMPLES_PER_BATCH: usize = 120;

/// `count` batches, 10 s each, one after the other.
fn batches(count: usize) -> Vec<ProfileBatch> {
    let shape = BatchShape {
        samples: SAMPLES_PER_BATCH,
        unique_stacks: 20,
        depth: 8,
        processes: 3,
        kernel_frames: 2,
    };
    (0..count)
        .map(|i| synthetic_batch(shape, 1_790_000_000_000_000_000 + i as u64 * 10_000_000_000))
        .collect()
}

/// A 64 KiB tmpfs mounted on a fresh folder, unmounted when dropped.
struct TinyDisk {
    _parent: tempfile::TempDir,
    path: PathBuf,
}

impl TinyDisk {
    fn mount() -> TinyDisk {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root (CI runs as root)"
        );
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        TinyDisk {
            _parent: parent,
            path,
        }
    }

    /// Fills what is left with `DISK/filler`.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        while file.write_all(&[0xaa; 4096]).is_ok() {}
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// The router replaying `count` [`batches`] at 20 times real speed (0.5 s per batch) into the
/// perfdata consumer writing to `out_dir` (one file per batch, no flame graph, plus
/// `perfdata_keys`), with `/metrics` on a free port.
fn spawn_replay(
    dir: &Path,
    count: usize,
    out_dir: &Path,
    perfdata_keys: &str,
) -> (std::process::Child, u16) {
    let recording = write_recording(dir, &batches(count));
    let port = free_port();
    let config = write_config(
        dir,
        &format!(
            "[telemetry]\nlisten = \"127.0.0.1:{port}\"\n\
             [producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = 20.0\n\
             [consumers.perfdata]\npath = \"{}\"\nrotate_interval = \"10s\"\nflamegraph = false\n{perfdata_keys}\n",
            recording.display(),
            out_dir.display()
        ),
    );
    (spawn_router(&config, &[]), port)
}

/// The perfdata consumer's counter `name` on `/metrics`, once it reaches `at_least`.
fn wait_for_counter(port: u16, name: &str, at_least: f64) -> f64 {
    let series = format!("router_plugin_{name}_total{{consumer=\"perfdata\"}} ");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_seen = None;
    loop {
        let scraped = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
            .and_then(|r| r.text())
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with(&series))?;
                line[series.len()..].trim().parse::<f64>().ok()
            });
        last_seen = scraped.or(last_seen);
        if let Some(value) = last_seen.filter(|v| *v >= at_least) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {at_least} (last seen {last_seen:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    files
}

/// Lines of `log` that contain every one of `needles`.
fn lines_with(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// Sample records `perf script` reads in `file`.
fn perf_script_samples(file: &Path) -> usize {
    let out = Command::new("perf")
        .args(["script", "-F", "pid,tid,time", "-i"])
        .arg(file)
        .output()
        .expect("perf");
    assert!(
        out.status.success(),
        "perf script {}: {}",
        file.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn a_full_disk_drops_what_cannot_fit_and_writing_resumes_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount();
    let filler = disk.fill();
    let out_dir = disk.path.join("profiles");
    let count = 12;
    let (router, port) = spawn_replay(dir.path(), count, &out_dir, "retention_bytes = \"48KiB\"");
    let dropped_seen = wait_for_counter(port, "files_dropped", 2.0);
    std::fs::remove_file(filler).unwrap();
    let log = expect_success(wait_with_limit(router, LIMIT));

    let dropped = lines_with(
        &log,
        &[
            &format!("cannot write {}/perf-", out_dir.display()),
            "No space left on device",
            &format!("dropped the profile ({SAMPLES_PER_BATCH} samples)"),
        ],
    );
    assert!(dropped >= 2 && dropped as f64 >= dropped_seen, "{log}");
    let wrote = lines_with(&log, &[&format!("wrote {}/perf-", out_dir.display())]);
    assert_eq!(wrote + dropped, count, "{log}");
    assert!(wrote >= 3, "later intervals written: {log}");
    let kept = data_files(&out_dir);
    assert!(!kept.is_empty());
    for file in &kept {
        assert_eq!(
            perf_script_samples(file),
            SAMPLES_PER_BATCH,
            "one interval per file, nothing piled up: {}",
            file.display()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn retention_makes_room_before_writing_and_counts_the_files_it_deletes() {
    // 60 KiB keeps three files (15 pages of the 16). Retention applied only after a write
    // would keep three and then need room for a fourth: ENOSPC on every write from then on.
    let dir = tempfile::tempdir().unwrap();
    let disk = TinyDisk::mount();
    let out_dir = disk.path.join("profiles");
    let count = 12;
    let (router, port) = spawn_replay(dir.path(), count, &out_dir, "retention_bytes = \"60KiB\"");
    let deleted_seen = wait_for_counter(port, "files_deleted_by_retention", 1.0);
    let log = expect_success(wait_with_limit(router, LIMIT));

    assert!(!log.contains("cannot write"), "{log}");
    let wrote = lines_with(&log, &[&format!("wrote {}/perf-", out_dir.display())]);
    assert_eq!(wrote, count, "{log}");
    let kept = data_files(&out_dir);
    let deleted = wrote - kept.len();
    assert!(
        deleted as f64 >= deleted_seen,
        "{deleted} deleted, {deleted_seen} seen"
    );
    let kept_bytes: u64 = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(kept_bytes <= 60 << 10, "{kept_bytes} bytes kept");
    for file in &kept {
        assert_eq!(
            perf_script_samples(file),
            SAMPLES_PER_BATCH,
            "{}",
            file.display()
        );
    }
}

#[test]
fn check_refuses_a_path_that_is_a_file_or_empty() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("profiles.data");
    std::fs::write(&file, b"").unwrap();
    for (path, refusal) in [
        (
            file.display().to_string(),
            format!(
                "perfdata: path: expected a folder, got \"{}\" (an existing file)",
                file.display()
            ),
        ),
        (
            String::new(),
            "perfdata: path: expected a folder, got \"\"".to_owned(),
        ),
    ] {
        let config = write_config(
            dir.path(),
            &format!("[consumers.perfdata]\npath = \"{path}\"\n"),
        );
        let out = run_with_limit(router().arg("--check").arg("--config").arg(config), LIMIT);
        let log = text(&out);
        assert!(!out.status.success(), "{log}");
        assert!(log.contains("consumer perfdata: plugin "), "{log}");
        assert!(log.contains(&refusal), "{log}");
    }
}
