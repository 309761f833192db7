//! Reading the bytes of a file another process controls: with `pread`, within a byte budget,
//! never through a mapping. A file truncated while it is read gives a short read, hence an
//! error, where a mapping would have given the reader a `SIGBUS`; a header that claims a
//! section of many gigabytes costs at most the budget.

use std::{fs::File, os::unix::fs::FileExt};

use object::{ReadCache, ReadCacheOps};

/// Bytes read from one ELF file at most: the headers and sections a reader asks for (a
/// large `.eh_frame`, node's, is about 5 MB; the symbol tables of a big binary, tens of MB).
pub const ELF_READ_BUDGET: u64 = 256 << 20;

/// A file read with `pread` at a cursor, within a budget of bytes; its length is the one
/// `fstat` gave when it was opened.
#[derive(Debug)]
pub struct BudgetedReader {
    file: File,
    len: u64,
    position: u64,
    budget: u64,
}

impl BudgetedReader {
    /// A reader of `file` that reads at most `budget` bytes in all.
    pub fn new(file: File, budget: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            position: 0,
            budget,
        })
    }

    /// The file, back.
    pub fn into_file(self) -> File {
        self.file
    }

    fn take_budget(&mut self, bytes: usize) -> Result<(), ()> {
        self.budget = self.budget.checked_sub(bytes as u64).ok_or(())?;
        Ok(())
    }
}

impl ReadCacheOps for BudgetedReader {
    fn len(&mut self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn seek(&mut self, position: u64) -> Result<u64, ()> {
        self.position = position;
        Ok(position)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ()> {
        self.take_budget(buf.len())?;
        let n = self.file.read_at(buf, self.position).map_err(|_| ())?;
        self.position += n as u64;
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ()> {
        self.take_budget(buf.len())?;
        // A short read: the file shrank since `fstat`.
        self.file
            .read_exact_at(buf, self.position)
            .map_err(|_| ())?;
        self.position += buf.len() as u64;
        Ok(())
    }
}

/// An ELF file's bytes for [`object`]'s parsers, read on demand from `file` within
/// [`ELF_READ_BUDGET`]: pass `&elf_bytes(file)?` where a parser takes a `ReadRef`.
///
/// ```
/// use object::Object;
/// let exe = std::fs::File::open("/proc/self/exe").unwrap();
/// let bytes = router::untrusted::read::elf_bytes(exe).unwrap();
/// let elf = object::File::parse(&bytes).unwrap();
/// assert!(elf.section_by_name(".text").is_some());
/// ```
pub fn elf_bytes(file: File) -> std::io::Result<ReadCache<BudgetedReader>> {
    Ok(ReadCache::new(BudgetedReader::new(file, ELF_READ_BUDGET)?))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use object::ReadRef;

    use super::*;

    #[test]
    fn reads_past_the_budget_or_past_a_truncation_fail() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7u8; 4096]).unwrap();
        let cache = ReadCache::new(BudgetedReader::new(file.try_clone().unwrap(), 3000).unwrap());
        assert_eq!((&cache).read_bytes_at(0, 2000).unwrap(), &[7u8; 2000][..]);
        assert!((&cache).read_bytes_at(2000, 2000).is_err(), "over budget");

        let cache =
            ReadCache::new(BudgetedReader::new(file.try_clone().unwrap(), 1 << 20).unwrap());
        file.set_len(1000).unwrap();
        assert!((&cache).read_bytes_at(500, 1000).is_err(), "truncated");
        assert_eq!((&cache).read_bytes_at(0, 100).unwrap(), &[7u8; 100][..]);
    }
}
