//! `elf_facts` and `ElfFacts::bias` on the PIE and non-PIE C fixtures and libc: against
//! `readelf`, hand-computed biases, and a live process's mappings.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{fixtures, read, symbol, LIBC};
use unwind_table::{elf_facts, ElfFacts};

/// `readelf -lW`'s PT_LOAD lines: (offset, vaddr, file size, executable).
fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64, bool)> {
    let output = Command::new("readelf")
        .arg("-lW")
        .arg(path)
        .output()
        .expect("readelf");
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&"LOAD")).then(|| {
                let flags = &fields[6..fields.len() - 1];
                (
                    hex(fields[1]),
                    hex(fields[2]),
                    hex(fields[4]),
                    flags.iter().any(|flag| flag.contains('E')),
                )
            })
        })
        .collect()
}

/// `readelf -n`'s GNU build id, as bytes.
fn readelf_build_id(path: &Path) -> Option<Vec<u8>> {
    let output = Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("readelf");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let hex = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))?;
    Some(
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect(),
    )
}

fn facts_of(path: &Path) -> ElfFacts {
    let facts = elf_facts(&read(path)[..]).expect("elf_facts");
    let segments: Vec<_> = facts
        .segments
        .iter()
        .map(|s| (s.file_offset, s.vaddr, s.file_size, s.executable))
        .collect();
    assert_eq!(segments, readelf_loads(path), "{}", path.display());
    assert_eq!(facts.build_id, readelf_build_id(path), "{}", path.display());
    assert!(facts.build_id.is_some());
    facts
}

/// The executable segment's file offset and vaddr.
fn executable(facts: &ElfFacts) -> (u64, u64) {
    let seg = facts
        .segments
        .iter()
        .find(|s| s.executable)
        .expect("an executable segment");
    (seg.file_offset, seg.vaddr)
}

#[test]
fn pie_bias() {
    let facts = facts_of(&fixtures().c_pie);
    let (offset, vaddr) = executable(&facts);
    // gcc/ld on Debian: the code segment at file offset 0x1000, linked at 0x1000.
    assert_eq!((offset, vaddr), (0x1000, 0x1000));
    // Loaded at 0x5555_5555_4000: the code maps at 0x5555_5555_5000 from offset 0x1000.
    assert_eq!(facts.bias(0x5555_5555_5000, 0x1000), Some(0x5555_5555_4000));
    // The same for any page-aligned load address.
    let base = 0x7f3a_1c20_0000;
    assert_eq!(facts.bias(base + vaddr, offset), Some(base));
    // The first, read-only mapping.
    assert_eq!(facts.bias(base, 0), Some(base));
    assert_eq!(facts.bias(base, 0x10_0000), None);
}

#[test]
fn non_pie_bias() {
    let facts = facts_of(&fixtures().c_no_pie);
    let (offset, vaddr) = executable(&facts);
    // Linked at 0x400000: the code segment at file offset 0x1000, vaddr 0x401000.
    assert_eq!((offset, vaddr), (0x1000, 0x401000));
    // Mapped where it is linked: no bias.
    assert_eq!(facts.bias(0x401000, 0x1000), Some(0));
    assert_eq!(facts.bias(0x400000, 0), Some(0));
}

#[test]
fn libc_facts() {
    let facts = facts_of(Path::new(LIBC));
    let (offset, vaddr) = executable(&facts);
    let base = 0x7f12_3456_0000;
    assert_eq!(facts.bias(base + vaddr, offset), Some(base));
}

/// A mapping line of `/proc/PID/maps`: (start, end, perms, offset, path).
fn maps(pid: u32) -> Vec<(u64, u64, String, u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let path = fields.nth(2).unwrap_or_default().to_owned();
            let (start, end) = range.split_once('-')?;
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            Some((hex(start)?, hex(end)?, perms.to_owned(), hex(offset)?, path))
        })
        .collect()
}

/// Runs a fixture (which waits on stdin) and checks that, for its own executable mapping and
/// libc's, a symbol's vaddr plus the computed bias lands in the mapping.
fn check_live(path: &Path, symbol_name: &str) {
    let mut child = Command::new(path)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run the fixture");
    // Wait for the dynamic loader to map libc.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mappings = loop {
        let mappings = maps(child.id());
        if mappings.iter().any(|m| m.4.contains("libc.so")) {
            break mappings;
        }
        assert!(std::time::Instant::now() < deadline, "libc never mapped");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let libc_path = mappings
        .iter()
        .find(|m| m.4.contains("libc.so"))
        .map(|m| m.4.clone())
        .expect("libc");
    let exe = std::fs::canonicalize(path).expect("canonical path");
    for (file, name) in [
        (exe.to_str().expect("utf-8"), symbol_name),
        (&libc_path, "__clone"),
    ] {
        let elf = read(Path::new(file));
        let facts = elf_facts(&elf[..]).expect("elf_facts");
        let vaddr = symbol(&elf, name).expect("symbol").start;
        let (start, end, _, offset, _) = mappings
            .iter()
            .find(|m| m.4 == file && m.2.contains('x'))
            .expect("an executable mapping");
        let bias = facts.bias(*start, *offset).expect("a bias");
        let addr = vaddr.wrapping_add(bias);
        assert!(
            (*start..*end).contains(&addr),
            "{file}: {name} at {vaddr:#x} + bias {bias:#x} = {addr:#x}, not in {start:#x}..{end:#x}"
        );
    }
    drop(child.stdin.take());
    assert!(child.wait().expect("wait").success());
}

#[test]
fn live_pie_process() {
    check_live(&fixtures().c_pie, "spin");
}

#[test]
fn live_non_pie_process() {
    check_live(&fixtures().c_no_pie, "spin");
}
