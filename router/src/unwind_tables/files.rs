//! Opening the file behind a process's mapping, and what the manager learns from it.

use std::{fs::File, os::unix::fs::MetadataExt};

use probe_common::unwind::UnwindRow;
use unwind_table::ElfFacts;

use crate::{
    process::MapEntry,
    untrusted::{open::open_mapped, read::elf_bytes},
};

/// A file as `fstat` sees it: what identifies it when it has no build id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i64,
}

/// What a table is known by: the file's GNU build id, else its identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TableKey {
    /// The GNU build id.
    BuildId(Vec<u8>),
    /// Device, inode, size and modification time.
    File(FileIdentity),
}

/// What the manager remembers of a file.
pub struct FileFacts {
    /// Its table's key; `None` when it is not an ELF file the probe can use.
    pub key: Option<TableKey>,
    elf: Option<ElfFacts>,
}

impl FileFacts {
    /// The same file, known to have no usable table.
    pub fn without_table(&self) -> FileFacts {
        FileFacts {
            key: None,
            elf: self.elf.clone(),
        }
    }

    /// The most rows the file's table can have (0 when it is not a usable ELF file).
    pub fn estimated_rows(&self) -> u64 {
        self.elf.as_ref().map_or(0, ElfFacts::estimated_rows)
    }

    /// Process address − bias = the file's virtual address, for a mapping of the file at
    /// `start` from file offset `offset`.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        self.elf.as_ref()?.bias(start, offset)
    }
}

/// An open executable file of a process.
pub struct OpenFile {
    file: File,
    /// Its identity.
    pub identity: FileIdentity,
}

/// Opens the file of `map` as process `pid` sees it (see [`open_mapped`]: a regular file,
/// the mapped one, reached without leaving the process's root).
pub fn open(pid: u32, map: &MapEntry) -> Option<OpenFile> {
    let file = open_mapped(pid, map)
        .inspect_err(|error| {
            tracing::debug!(pid, path = %map.path, %error, "cannot open a mapped file");
        })
        .ok()?;
    let meta = file.metadata().ok()?;
    Some(OpenFile {
        identity: FileIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        },
        file,
    })
}

impl OpenFile {
    /// The file's build id and segments.
    pub fn facts(&self) -> FileFacts {
        let elf = self
            .bytes()
            .and_then(|bytes| unwind_table::elf_facts(&bytes).ok());
        let key = elf.as_ref().map(|elf| match &elf.build_id {
            Some(id) => TableKey::BuildId(id.clone()),
            None => TableKey::File(self.identity),
        });
        FileFacts { key, elf }
    }

    /// The file's unwind rows.
    pub fn build_rows(&self) -> Result<Vec<UnwindRow>, String> {
        let bytes = self.bytes().ok_or("cannot read the file")?;
        unwind_table::build(&bytes)
            .map(|table| table.rows)
            .map_err(|e| e.to_string())
    }

    /// The file's bytes, read on demand with `pread` (never mapped: the file may be one that
    /// its owner truncates while it is read).
    fn bytes(&self) -> Option<object::ReadCache<crate::untrusted::read::BudgetedReader>> {
        elf_bytes(self.file.try_clone().ok()?).ok()
    }
}
