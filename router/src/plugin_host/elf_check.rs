//! Checks that a plugin file's bytes are a whole shared object for this machine, before the
//! dynamic loader maps them: a segment that ends past the end of the file would be mapped
//! anyway and kill the router with SIGBUS when touched.

use object::{
    elf,
    read::elf::{ElfFile, FileHeader, ProgramHeader},
    Architecture, Endianness, Object, ObjectKind,
};

#[cfg(target_pointer_width = "64")]
type NativeFileHeader = elf::FileHeader64<Endianness>;
#[cfg(target_pointer_width = "32")]
type NativeFileHeader = elf::FileHeader32<Endianness>;

/// Where the class (`ELFCLASS32`, `ELFCLASS64`) is in an ELF file: `e_ident[EI_CLASS]`.
const CLASS_OFFSET: usize = 4;

/// The ELF class of this router's own code, and so of the plugins it can load.
const NATIVE_CLASS: u8 = if cfg!(target_pointer_width = "64") {
    elf::ELFCLASS64
} else {
    elf::ELFCLASS32
};

/// This machine's architecture as `object` names it (`Unknown` where the router has never
/// been built: every plugin is then refused as built for another machine).
const NATIVE_ARCHITECTURE: Architecture = if cfg!(target_arch = "x86_64") {
    Architecture::X86_64
} else if cfg!(target_arch = "aarch64") {
    Architecture::Aarch64
} else if cfg!(target_arch = "riscv64") {
    Architecture::Riscv64
} else {
    Architecture::Unknown
};

/// Why bytes are not a shared object this router can load.
#[derive(Debug, thiserror::Error)]
pub enum NotLoadable {
    /// The file does not start with the ELF magic number.
    #[error("not an ELF file")]
    NotElf,
    /// A 32-bit file for a 64-bit router or the reverse.
    #[error("it is a {plugin}-bit ELF file, but this router is {router}-bit")]
    WrongClass {
        /// The file's word size in bits.
        plugin: u32,
        /// The router's word size in bits.
        router: u32,
    },
    /// The headers do not fit the file or contradict each other.
    #[error("its ELF headers are damaged or cut off ({0}); the file is {1} bytes")]
    Damaged(object::read::Error, usize),
    /// A loadable segment needs bytes past the end of the file.
    #[error("it is truncated: its loadable segment {index} needs file bytes {start}..{end}, but the file is {size} bytes")]
    Truncated {
        /// The segment's index among the program headers.
        index: usize,
        /// Its first byte in the file.
        start: u64,
        /// One past its last byte in the file.
        end: u128,
        /// The file's size.
        size: usize,
    },
    /// An executable, object file or core dump.
    #[error("it is an ELF {0:?} file, not a shared library")]
    NotShared(ObjectKind),
    /// Built for another architecture or byte order.
    #[error("it is built for {plugin:?} ({plugin_endian:?} endian), but this machine is {native:?} ({native_endian:?} endian)")]
    OtherMachine {
        /// The file's architecture.
        plugin: Architecture,
        /// The file's byte order.
        plugin_endian: Endianness,
        /// This machine's architecture.
        native: Architecture,
        /// This machine's byte order.
        native_endian: Endianness,
    },
}

/// Checks that `bytes` are a shared object of this machine's class, byte order and
/// architecture whose headers and loadable segments all lie within `bytes`.
pub fn check_shared_object(bytes: &[u8]) -> Result<(), NotLoadable> {
    if !bytes.starts_with(&elf::ELFMAG) {
        return Err(NotLoadable::NotElf);
    }
    let class = bytes.get(CLASS_OFFSET).copied();
    if class != Some(NATIVE_CLASS) {
        let bits = |class| {
            if class == Some(elf::ELFCLASS64) {
                64
            } else {
                32
            }
        };
        return Err(NotLoadable::WrongClass {
            plugin: bits(class),
            router: bits(Some(NATIVE_CLASS)),
        });
    }
    let damaged = |e| NotLoadable::Damaged(e, bytes.len());
    let header = NativeFileHeader::parse(bytes).map_err(damaged)?;
    let endian = header.endian().map_err(damaged)?;
    let segments = header.program_headers(endian, bytes).map_err(damaged)?;
    for (index, segment) in segments.iter().enumerate() {
        if segment.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let (start, length) = segment.file_range(endian);
        let end = u128::from(start) + u128::from(length);
        if end > bytes.len() as u128 {
            return Err(NotLoadable::Truncated {
                index,
                start,
                end,
                size: bytes.len(),
            });
        }
    }
    let file = ElfFile::<NativeFileHeader>::parse(bytes).map_err(damaged)?;
    if file.kind() != ObjectKind::Dynamic {
        return Err(NotLoadable::NotShared(file.kind()));
    }
    let native_endian = Endianness::default();
    if file.architecture() != NATIVE_ARCHITECTURE || file.endianness() != native_endian {
        return Err(NotLoadable::OtherMachine {
            plugin: file.architecture(),
            plugin_endian: file.endianness(),
            native: NATIVE_ARCHITECTURE,
            native_endian,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared object this test binary certainly has: the C library it runs with.
    fn libc_bytes() -> Vec<u8> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let path = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .find(|path| path.contains("/libc.so") || path.contains("/libc-"))
            .expect("libc mapped into the test");
        std::fs::read(path).unwrap()
    }

    /// The end of the last loadable segment in the file.
    fn loaded_end(bytes: &[u8]) -> usize {
        let header = NativeFileHeader::parse(bytes).unwrap();
        let endian = header.endian().unwrap();
        header
            .program_headers(endian, bytes)
            .unwrap()
            .iter()
            .filter(|s| s.p_type(endian) == elf::PT_LOAD)
            .map(|s| {
                let (start, length) = s.file_range(endian);
                (start + length) as usize
            })
            .max()
            .unwrap()
    }

    #[test]
    fn a_whole_shared_object_of_this_machine_passes() {
        check_shared_object(&libc_bytes()).unwrap();
    }

    #[test]
    fn a_cut_inside_the_loaded_segments_is_named_as_truncation() {
        let bytes = libc_bytes();
        let cut = &bytes[..loaded_end(&bytes) / 2];
        let reason = check_shared_object(cut).unwrap_err().to_string();
        assert!(
            reason.starts_with("it is truncated: its loadable segment "),
            "{reason}"
        );
        assert!(
            reason.ends_with(&format!("but the file is {} bytes", cut.len())),
            "{reason}"
        );
    }

    #[test]
    fn a_cut_inside_the_headers_is_damage() {
        let reason = check_shared_object(&libc_bytes()[..40])
            .unwrap_err()
            .to_string();
        assert!(
            reason.starts_with("its ELF headers are damaged or cut off"),
            "{reason}"
        );
    }

    #[test]
    fn other_files_are_named_for_what_they_are() {
        assert!(matches!(
            check_shared_object(b"#!/bin/sh\n"),
            Err(NotLoadable::NotElf)
        ));
        let mut other_class = libc_bytes();
        other_class[CLASS_OFFSET] = elf::ELFCLASS32;
        assert_eq!(
            check_shared_object(&other_class).unwrap_err().to_string(),
            "it is a 32-bit ELF file, but this router is 64-bit"
        );
        let mut executable = libc_bytes();
        // e_type, little endian, right after the 16-byte identification.
        executable[16..18].copy_from_slice(&elf::ET_EXEC.to_le_bytes());
        assert!(matches!(
            check_shared_object(&executable),
            Err(NotLoadable::NotShared(ObjectKind::Executable))
        ));
        let mut other_machine = libc_bytes();
        // e_machine, right after e_type: another architecture than this machine's.
        let machine = if NATIVE_ARCHITECTURE == Architecture::Aarch64 {
            elf::EM_X86_64
        } else {
            elf::EM_AARCH64
        };
        other_machine[18..20].copy_from_slice(&machine.to_le_bytes());
        let reason = check_shared_object(&other_machine).unwrap_err().to_string();
        assert!(reason.starts_with("it is built for "), "{reason}");
    }
}
