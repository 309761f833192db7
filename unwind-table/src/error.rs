//! What can go wrong reading an ELF file's CFI.

/// Why no table (or no [`crate::ElfFacts`]) could be made from some bytes.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The bytes are not an ELF file (or its headers cannot be read).
    #[error("not an ELF file: {0}")]
    NotElf(String),
    /// An ELF file, but not 64-bit x86-64.
    #[error("not an x86-64 ELF file (architecture {0:?})")]
    NotX86_64(object::Architecture),
    /// The file's headers or sections are inconsistent.
    #[error("malformed ELF file: {0}")]
    MalformedElf(#[source] object::read::Error),
    /// A CFI section could not be parsed.
    #[error("malformed CFI in {section}: {source}")]
    MalformedCfi {
        /// `.eh_frame` or `.debug_frame`.
        section: &'static str,
        /// gimli's error.
        #[source]
        source: gimli::Error,
    },
}
