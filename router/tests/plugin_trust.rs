//! Plugin loading safety: a plugin is loaded from a private, checked copy (a truncated file is
//! refused, a file overwritten in place while running changes nothing), and only from paths
//! that no user but root and the router's own can change (sshd's StrictModes).
//! These tests run as root, like the agent.

mod common;

use std::{
    fs,
    os::unix::{
        fs::{symlink, PermissionsExt},
        process::ExitStatusExt,
    },
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use common::*;
use object::read::elf::{FileHeader, ProgramHeader};

const LIMIT: Duration = Duration::from_secs(30);

/// `[producer]` replaying `batches` of `dir`'s recording, `speed` times faster than recorded.
fn replay_producer(dir: &Path, batches: usize, speed: f64, repeat: u32) -> String {
    format!(
        "[producer]\nkind = \"replay\"\nreplay.path = \"{}\"\nreplay.speed = {speed:?}\nreplay.repeat = {repeat}\n",
        write_recording(dir, &small_batches(batches)).display()
    )
}

/// A `[consumers.probe]` table loading `plugin` (the test consumer, or what stands for it).
fn probe_table(dir: &Path, plugin: &Path) -> String {
    format!(
        "[consumers.probe]\nplugin = \"{}\"\noutput = \"{}\"\n",
        plugin.display(),
        dir.join("probe.jsonl").display()
    )
}

/// `router --check` (or a run, when `check` is false) with `config_text` in `dir`.
fn router_with(dir: &Path, config_text: &str, check: bool) -> Output {
    let config = write_config(dir, config_text);
    let mut cmd = router();
    if check {
        cmd.arg("--check");
    }
    run_with_limit(cmd.arg("--config").arg(config), LIMIT)
}

/// `router --check` with the probe consumer loading `plugin`; whether it passed, and its log.
fn check_probe(dir: &Path, plugin: &Path) -> (bool, String) {
    let out = router_with(
        dir,
        &format!(
            "{}{}",
            replay_producer(dir, 1, 0.0, 1),
            probe_table(dir, plugin)
        ),
        true,
    );
    assert_eq!(out.status.signal(), None, "{}", text(&out));
    (out.status.success(), text(&out))
}

/// How many batches the test consumer has written to `output` so far (whole lines only: it
/// may be writing one).
fn consumed_so_far(output: &Path) -> usize {
    fs::read_to_string(output)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["call"] == "consume")
        .count()
}

/// A root-owned copy of the test consumer at `path`, mode 0755.
fn copy_test_consumer(path: &Path) -> PathBuf {
    fs::copy(plugin("test_consumer"), path).unwrap();
    set_mode(path, 0o755);
    path.to_owned()
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A folder `name` in `dir` with `mode`.
fn folder(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::create_dir(&path).unwrap();
    set_mode(&path, mode);
    path
}

/// Where the last loadable segment of ELF file `bytes` ends.
fn end_of_loaded_segments(bytes: &[u8]) -> usize {
    let header = object::elf::FileHeader64::<object::Endianness>::parse(bytes).unwrap();
    let endian = header.endian().unwrap();
    header
        .program_headers(endian, bytes)
        .unwrap()
        .iter()
        .filter(|segment| segment.p_type(endian) == object::elf::PT_LOAD)
        .map(|segment| {
            let (start, length) = segment.file_range(endian);
            (start + length) as usize
        })
        .max()
        .unwrap()
}

#[test]
fn a_truncated_plugin_is_refused_with_a_reason_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let whole = fs::read(plugin("test_consumer")).unwrap();
    // Cut inside what the dynamic loader maps: the old router died of SIGBUS here.
    let truncated = dir.path().join("libtruncated.so");
    fs::write(&truncated, &whole[..end_of_loaded_segments(&whole) / 2]).unwrap();
    let refusal = format!(
        "consumer probe: {} is not a usable consumer plugin: cannot open it as a shared library: it is truncated: its loadable segment ",
        truncated.display()
    );

    let (ok, log) = check_probe(dir.path(), &truncated);
    assert!(!ok, "{log}");
    assert!(log.contains(&refusal), "{log}");

    let run = router_with(
        dir.path(),
        &format!(
            "{}{}",
            replay_producer(dir.path(), 1, 0.0, 1),
            probe_table(dir.path(), &truncated)
        ),
        false,
    );
    assert_eq!(run.status.signal(), None, "{}", text(&run));
    assert!(!run.status.success(), "{}", text(&run));
    assert!(text(&run).contains(&refusal), "{}", text(&run));
}

#[test]
fn a_plugin_overwritten_in_place_while_running_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_test_consumer(&dir.path().join("libprobe.so"));
    let output = dir.path().join("probe.jsonl");
    // Two recorded 10 s batches replayed 100 times faster, over and over: one every 100 ms.
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            replay_producer(dir.path(), 2, 100.0, 1000),
            probe_table(dir.path(), &plugin)
        ),
    );
    let child = spawn_router(&config, &[]);
    let consumed_at_least = |count: usize| {
        let deadline = Instant::now() + LIMIT;
        while consumed_so_far(&output) < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        consumed_so_far(&output)
    };
    let before = consumed_at_least(2);
    assert!(before >= 2, "the router delivered before the overwrite");

    // In place: the same file, truncated, then filled with garbage of the old length.
    let length = fs::metadata(&plugin).unwrap().len() as usize;
    fs::write(&plugin, vec![0xcc_u8; length]).unwrap();

    let after = consumed_at_least(before + 5);
    let log = signal_and_expect_success(child, libc::SIGTERM, LIMIT);
    assert!(
        after >= before + 5,
        "the router kept delivering after the overwrite ({before} then {after}): {log}"
    );
}

#[test]
fn a_plugin_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = copy_test_consumer(&dir.path().join("libnobody.so"));
    std::os::unix::fs::chown(&plugin, Some(65534), Some(65534)).unwrap();
    let (ok, log) = check_probe(dir.path(), &plugin);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!(
            "consumer probe: refusing plugin {}: it is owned by uid 65534, neither root nor the router's user (uid 0)",
            plugin.display()
        )),
        "{log}"
    );
}

/// `router --check` refuses `plugin`, naming it and the world-writable folder `open`.
fn assert_refused_for_open_folder(dir: &Path, plugin: &Path, open: &Path) {
    let (ok, log) = check_probe(dir, plugin);
    assert!(!ok, "{log}");
    assert!(
        log.contains(&format!(
            "consumer probe: refusing plugin {}: the folder {} is writable by every user (mode 777) and has no sticky bit",
            plugin.display(),
            open.display()
        )),
        "{log}"
    );
}

#[test]
fn a_plugin_in_a_world_writable_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = folder(dir.path(), "open", 0o777);
    let plugin = copy_test_consumer(&open.join("libprobe.so"));
    assert_refused_for_open_folder(dir.path(), &plugin, &open);
}

#[test]
fn a_symlink_in_or_into_a_world_writable_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = folder(dir.path(), "open", 0o777);
    let link = open.join("libprobe.so");
    symlink(plugin("test_consumer"), &link).unwrap();
    assert_refused_for_open_folder(dir.path(), &link, &open);

    // A link from a safe folder to a plugin in an open one: the resolved path is checked too.
    let safe = folder(dir.path(), "safe", 0o755);
    let target = copy_test_consumer(&open.join("libtarget.so"));
    let link = safe.join("libprobe.so");
    symlink(&target, &link).unwrap();
    assert_refused_for_open_folder(dir.path(), &link, &open);
}

#[test]
fn a_world_writable_plugin_dir_is_refused_even_with_the_sticky_bit() {
    let dir = tempfile::tempdir().unwrap();
    // Sticky like /tmp: the root-owned plugin in it cannot be replaced, but anyone could add
    // the file of a consumer whose plugin is missing.
    let plugins = folder(dir.path(), "plugins", 0o1777);
    copy_test_consumer(&plugins.join("libprobe.so"));
    let out = router_with(
        dir.path(),
        &format!(
            "plugin_dir = \"{}\"\n{}{}",
            plugins.display(),
            replay_producer(dir.path(), 1, 0.0, 1),
            probe_table(dir.path(), Path::new("libprobe.so"))
        ),
        true,
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "refusing plugin_dir {}: it is writable by every user (mode 1777)",
            plugins.display()
        )),
        "{log}"
    );
}

#[test]
fn plugins_in_safe_folders_load_directly_and_through_symlinks() {
    // The temporary folder sits in /tmp (world-writable, sticky): fine above root-owned entries.
    let dir = tempfile::tempdir().unwrap();
    let plugins = folder(dir.path(), "plugins", 0o755);
    let plugin = copy_test_consumer(&plugins.join("libprobe.so"));
    let links = folder(dir.path(), "links", 0o755);
    symlink(&plugin, links.join("libprobe.so")).unwrap();
    let out = router_with(
        dir.path(),
        &format!(
            "plugin_dir = \"{}\"\n{}{}[consumers.linked]\nplugin = \"{}\"\noutput = \"/dev/null\"\n",
            plugins.display(),
            replay_producer(dir.path(), 1, 0.0, 1),
            probe_table(dir.path(), Path::new("libprobe.so")),
            links.join("libprobe.so").display()
        ),
        true,
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("ok: consumer probe (plugin "), "{log}");
    assert!(log.contains("ok: consumer linked (plugin "), "{log}");
}
