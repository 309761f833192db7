//! The router's readers of what other processes control, over hostile input: the symbolizer
//! and the CPython detector over real binaries truncated and mutated (owned by root, and by
//! nobody, whose files are read through a sealed copy), and the perf map reader over
//! arbitrary bytes. Each gives an answer or nothing, never a panic or a crash. Bounded in
//! cases for CI.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    process::{Child, Command, Stdio},
};

use proptest::{prelude::*, sample::Index};
use router::{
    process::MapEntry,
    symbolize::{perf_map::PerfMaps, Symbolizer},
    untrusted::open::device_number,
};

fn originals() -> &'static [Vec<u8>] {
    static ORIGINALS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    ORIGINALS.get_or_init(|| {
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        ]
        .iter()
        .filter_map(|path| fs::read(path).ok())
        .collect()
    })
}

/// Writes `bytes` to `path` (owned by nobody if asked) and returns a mapping of it as this
/// process would have it (at an address /proc/self/map_files does not know: the file is
/// reached by its path, and its device and inode).
fn written_and_mapped(path: &std::path::Path, bytes: &[u8], owned_by_nobody: bool) -> MapEntry {
    fs::write(path, bytes).unwrap();
    if owned_by_nobody {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }
    let meta = fs::metadata(path).unwrap();
    MapEntry {
        start: 0x1000,
        end: 0x2000,
        offset: 0,
        dev: device_number(&meta),
        inode: meta.ino(),
        path: path.to_str().unwrap().to_owned(),
    }
}

/// A process to own a perf map: killed, and its map removed, on drop.
struct Owner(Child);

impl Owner {
    fn start() -> Self {
        Owner(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
    fn map(&self) -> String {
        format!("/tmp/perf-{}.map", self.0.id())
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = fs::remove_file(self.map());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_binaries_are_named_or_refused(
        which in any::<Index>(),
        cut in proptest::option::of(any::<Index>()),
        flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..24),
        header_flips in proptest::collection::vec((0usize..4096, any::<u8>()), 0..8),
        owned_by_nobody in any::<bool>(),
        offsets in proptest::collection::hash_set(0u64..0x20_0000, 1..16),
    ) {
        let mut bytes = which.get(originals()).clone();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        for (at, value) in header_flips {
            if at < bytes.len() {
                bytes[at] = value;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        let dir = tempfile::tempdir().unwrap();
        // Named as CPython's library, so that the detector examines it too.
        let path = dir.path().join("libpython3.12.so.1.0");
        let map = written_and_mapped(&path, &bytes, owned_by_nobody);
        let me = std::process::id();
        let mut symbolizer = Symbolizer::new();
        let offsets: HashSet<u64> = offsets;
        symbolizer.prepare_user(me, &map, &offsets);
        for &offset in &offsets {
            let _ = symbolizer.user(me, &map, offset);
        }
        let _ = router::python::detect(me, std::slice::from_ref(&map));
    }

    #[test]
    fn arbitrary_perf_maps_name_only_what_they_say(
        lines in proptest::collection::vec(
            prop_oneof![
                (0u64..0x10000, 1u64..0x100, "[a-zA-Z_:. ]{1,40}")
                    .prop_map(|(start, size, name)| format!("{start:x} {size:x} {name}\n")),
                proptest::collection::vec(any::<u8>(), 0..300)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
                Just("\n".to_owned()),
            ],
            0..40,
        ),
        addresses in proptest::collection::vec(0u64..0x10100, 1..20),
    ) {
        let owner = Owner::start();
        let text: String = lines.concat();
        fs::write(owner.map(), &text).unwrap();
        let mut maps = PerfMaps::new();
        for address in addresses {
            if let Some(name) = maps.lookup(owner.0.id(), address) {
                prop_assert!(text.contains(&*name), "{name:?} is not in the file");
            }
        }
    }
}

#[test]
fn a_binary_owned_by_another_user_is_named_through_its_sealed_copy() {
    use object::{Object, ObjectSegment, ObjectSymbol};
    // libstdc++: stripped, and without a debug file here, so it names itself.
    let library = &originals()[1];
    let elf = object::File::parse(&library[..]).unwrap();
    let now = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok("_ZNSt6chrono3_V212system_clock3nowEv"))
        .unwrap()
        .address();
    let segment = elf
        .segments()
        .find(|s| (s.address()..s.address() + s.size()).contains(&now))
        .unwrap();
    let offset = now - segment.address() + segment.file_range().0;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libstdc++.so.6");
    let map = written_and_mapped(&path, library, true);
    let me = std::process::id();
    let mut symbolizer = Symbolizer::new();
    symbolizer.prepare_user(me, &map, &HashSet::from([offset]));
    let name = &symbolizer.user(me, &map, offset).expect("named").name;
    assert!(name.contains("system_clock"), "{name}");
    // What the symbolizer and blazesym hold is a sealed copy (ours, and blazesym's open of
    // it), not the file its owner can truncate.
    let copies = fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:symbols"))
        .count();
    assert!(copies >= 1, "no sealed copy is open");
    fs::write(&path, b"truncated").unwrap();
    symbolizer.forget_processes(&HashSet::from([me]));
}
