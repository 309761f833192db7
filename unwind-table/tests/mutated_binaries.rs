//! The readers of untrusted bytes, over real binaries truncated and mutated where it matters
//! (the ELF header, the program and section headers, `.eh_frame`): [`unwind_table::build`]
//! and [`unwind_table::elf_facts`] return an answer or an error, never panic, and through an
//! [`object::ReadCache`] read no more than the file holds. Bounded in cases for CI.

use std::io::Cursor;

use object::{Object, ObjectSection, ReadCache};
use proptest::{prelude::*, sample::Index};

/// Real binaries of this machine: libc, libstdc++, and this test's own executable.
fn originals() -> &'static [Vec<u8>] {
    static ORIGINALS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    ORIGINALS.get_or_init(|| {
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/proc/self/exe",
        ]
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .collect()
    })
}

/// The byte ranges worth mutating: the first page (ELF and program headers), the section
/// header table, and `.eh_frame` / `.eh_frame_hdr`.
fn hot_ranges(elf: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    ranges.push(0..elf.len().min(4096));
    if let Ok(file) = object::File::parse(elf) {
        for name in [".eh_frame", ".eh_frame_hdr"] {
            if let Some((start, size)) = file.section_by_name(name).and_then(|s| s.file_range()) {
                ranges.push(start as usize..(start + size) as usize);
            }
        }
    }
    let shoff = u64::from_le_bytes(elf[0x28..0x30].try_into().unwrap()) as usize;
    if shoff < elf.len() {
        ranges.push(shoff..elf.len());
    }
    ranges.retain(|r| !r.is_empty());
    ranges
}

fn mutated(which: Index, cut: Option<Index>, flips: &[(Index, Index, u8)]) -> Vec<u8> {
    let original = which.get(originals());
    let ranges = hot_ranges(original);
    let mut bytes = original.clone();
    for (range, at, value) in flips {
        let range = range.get(&ranges);
        bytes[range.start + at.index(range.len())] = *value;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_or_mutated_binaries_give_tables_or_errors(
        which in any::<Index>(),
        cut in proptest::option::of(any::<Index>()),
        flips in proptest::collection::vec((any::<Index>(), any::<Index>(), any::<u8>()), 0..24),
    ) {
        prop_assume!(!originals().is_empty());
        let bytes = mutated(which, cut, &flips);
        let from_slice = unwind_table::build(&bytes[..]).map(|t| t.rows);
        let _ = unwind_table::elf_facts(&bytes[..]);
        // Read on demand, as the router reads files of other processes: the same answer.
        let cache = ReadCache::new(Cursor::new(&bytes));
        let from_reads = unwind_table::build(&cache).map(|t| t.rows);
        prop_assert_eq!(from_slice.ok(), from_reads.ok());
        let _ = unwind_table::elf_facts(&cache);
    }
}

#[test]
fn the_originals_build() {
    for elf in originals() {
        assert!(!unwind_table::build(&elf[..]).unwrap().rows.is_empty());
        assert!(!hot_ranges(elf).is_empty());
    }
}
