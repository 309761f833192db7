//! Code objects to function names, files and lines, read from a process's memory.
//!
//! A frame of the probe's Python walk is a code object's address and the index of its
//! executing instruction. [`CodeReader::resolve`] reads the code object once (its
//! `co_qualname`, `co_filename`, `co_firstlineno` and location table), caches what it read per
//! process, and answers later lookups of the same code object from the cache.
//!
//! A cache entry is known by the code object's address: if the process frees a code object
//! and allocates another one at the same address, the old names are returned until the entry
//! is evicted or [`CodeReader::forget`] drops the process.

use std::{collections::HashMap, fs::File, hash::Hash, os::unix::fs::FileExt, sync::Arc};

use super::layout::{
    PythonLayout, STATE_ASCII_BIT, STATE_COMPACT_BIT, STATE_KIND_MASK, STATE_KIND_SHIFT,
};
use super::locations::LineTable;

/// One Python frame, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonFrame {
    /// The function's qualified name (`co_qualname`, like `K.method` or
    /// `outer.<locals>.nested`; `<module>` for a module's body).
    pub function: Arc<str>,
    /// The file the code came from (`co_filename`), as the process named it.
    pub file: Arc<str>,
    /// The line of the executing instruction; 0 when the location table gives none.
    pub line: u32,
}

/// The most bytes of a name or a file name read; longer ones are cut.
const NAME_LIMIT: usize = 1024;
/// The most bytes of a location table read; code units beyond get no line.
const LINE_TABLE_LIMIT: usize = 64 * 1024;
/// Code objects remembered per process (a recently used one survives the next eviction).
const CODES_PER_PROCESS: usize = 4096;
/// Strings (names, file names, often shared between code objects) remembered per process.
const STRINGS_PER_PROCESS: usize = 4096;
/// Processes remembered; beyond, one is dropped for each new one.
const PROCESSES: usize = 4096;

/// Per-process caches of code objects read; bounded (4096 code objects and 4096 strings per
/// process, 4096 processes).
#[derive(Default)]
pub struct CodeReader {
    processes: HashMap<u32, ProcessCodes>,
}

impl CodeReader {
    /// An empty reader.
    pub fn new() -> CodeReader {
        CodeReader::default()
    }

    /// The function, file and line of code object `code_address` of process `pid` (as seen
    /// in its address space) executing code unit `instr_index` (counted from
    /// `co_code_adaptive`; `u32::MAX`, i.e. −1, gives `co_firstlineno`). The first lookup
    /// of a code object reads it from the process; later ones read nothing. `None` when the
    /// memory cannot be read or does not look like a code object.
    pub fn resolve(
        &mut self,
        pid: u32,
        layout: &PythonLayout,
        code_address: u64,
        instr_index: u32,
    ) -> Option<PythonFrame> {
        let process = self.process(pid, layout.minor);
        let code = match process.codes.get(&code_address) {
            Some(code) => code,
            None => {
                let code = Arc::new(process.read_code(layout, code_address)?);
                process.codes.insert(code_address, code.clone());
                code
            }
        };
        Some(PythonFrame {
            function: code.function.clone(),
            file: code.file.clone(),
            line: code.lines.line(instr_index).unwrap_or(0),
        })
    }

    /// Drops what is cached of process `pid` (call it when the process exits or execs).
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// How many code objects are cached for `pid`.
    pub fn cached_codes(&self, pid: u32) -> usize {
        self.processes.get(&pid).map_or(0, |p| p.codes.len())
    }

    fn process(&mut self, pid: u32, minor: u32) -> &mut ProcessCodes {
        if !self.processes.contains_key(&pid) && self.processes.len() >= PROCESSES {
            if let Some(&victim) = self.processes.keys().next() {
                self.processes.remove(&victim);
            }
        }
        let process = self
            .processes
            .entry(pid)
            .or_insert_with(|| ProcessCodes::new(pid, minor));
        if process.minor != minor {
            // The pid now runs another Python (it exec'd): nothing cached holds.
            *process = ProcessCodes::new(pid, minor);
        }
        process
    }
}

/// What is known of one code object.
struct Code {
    function: Arc<str>,
    file: Arc<str>,
    lines: LineTable,
}

struct ProcessCodes {
    minor: u32,
    memory: Memory,
    codes: Generations<u64, Arc<Code>>,
    strings: Generations<u64, Arc<str>>,
}

impl ProcessCodes {
    fn new(pid: u32, minor: u32) -> ProcessCodes {
        ProcessCodes {
            minor,
            memory: Memory::new(pid),
            codes: Generations::new(CODES_PER_PROCESS),
            strings: Generations::new(STRINGS_PER_PROCESS),
        }
    }

    fn read_code(&mut self, layout: &PythonLayout, address: u64) -> Option<Code> {
        if address == 0 {
            return None;
        }
        let mut header = vec![0u8; usize::from(layout.code_adaptive)];
        self.memory.read(address, &mut header)?;
        let first_line = u32::try_from(i32_at(&header, layout.code_firstlineno)?).ok()?;
        let qualname = u64_at(&header, layout.code_qualname)?;
        let name = u64_at(&header, layout.code_name)?;
        let filename = u64_at(&header, layout.code_filename)?;
        let linetable = u64_at(&header, layout.code_linetable)?;
        let function = self
            .string(layout, qualname)
            .or_else(|| self.string(layout, name))?;
        let file = self.string(layout, filename)?;
        let table = self.bytes(layout, linetable).unwrap_or_default();
        Some(Code {
            function,
            file,
            lines: LineTable::decode(&table, first_line),
        })
    }

    /// A `str` object's text, cached by address.
    fn string(&mut self, layout: &PythonLayout, address: u64) -> Option<Arc<str>> {
        if address == 0 {
            return None;
        }
        if let Some(text) = self.strings.get(&address) {
            return Some(text);
        }
        let mut header = vec![0u8; usize::from(layout.unicode_ascii_data)];
        self.memory.read(address, &mut header)?;
        let shape = StrShape::of(layout, &header)?;
        let mut data = vec![0u8; shape.bytes()];
        self.memory
            .read(address + u64::from(shape.data_offset), &mut data)?;
        let text: Arc<str> = shape.decode(&data).into();
        self.strings.insert(address, text.clone());
        Some(text)
    }

    /// A `bytes` object's data, up to [`LINE_TABLE_LIMIT`].
    fn bytes(&mut self, layout: &PythonLayout, address: u64) -> Option<Vec<u8>> {
        if address == 0 {
            return None;
        }
        let mut header = [0u8; 8];
        self.memory
            .read(address + u64::from(layout.bytes_size), &mut header)?;
        let size = usize::try_from(i64::from_le_bytes(header)).ok()?;
        let mut data = vec![0u8; size.min(LINE_TABLE_LIMIT)];
        self.memory
            .read(address + u64::from(layout.bytes_data), &mut data)?;
        Some(data)
    }
}

/// Where a compact `str`'s characters are, and how wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StrShape {
    data_offset: u16,
    /// Bytes per character: 1 (ASCII or latin-1), 2 or 4.
    kind: u8,
    /// Characters to read (at most [`NAME_LIMIT`] bytes' worth).
    length: usize,
}

impl StrShape {
    /// The shape of the `str` whose first `unicode_ascii_data` bytes are `header`; `None`
    /// when it is not a compact string (a legacy one keeps its data elsewhere) or its state
    /// makes no sense.
    fn of(layout: &PythonLayout, header: &[u8]) -> Option<StrShape> {
        let state = u32::from_le_bytes(
            header
                .get(usize::from(layout.unicode_state)..)?
                .get(..4)?
                .try_into()
                .ok()?,
        );
        let length = usize::try_from(i64::from_le_bytes(
            header
                .get(usize::from(layout.unicode_length)..)?
                .get(..8)?
                .try_into()
                .ok()?,
        ))
        .ok()?;
        if state >> STATE_COMPACT_BIT & 1 == 0 {
            return None;
        }
        let kind = (state >> STATE_KIND_SHIFT) & STATE_KIND_MASK;
        let ascii = state >> STATE_ASCII_BIT & 1 != 0;
        let (data_offset, kind) = match (ascii, kind) {
            (true, 1) => (layout.unicode_ascii_data, 1u8),
            (false, 1 | 2 | 4) => (layout.unicode_compact_data, kind as u8),
            _ => return None,
        };
        Some(StrShape {
            data_offset,
            kind,
            length: length.min(NAME_LIMIT / usize::from(kind)),
        })
    }

    fn bytes(&self) -> usize {
        self.length * usize::from(self.kind)
    }

    /// The text of `data` (`bytes()` bytes); what is not a character becomes U+FFFD.
    fn decode(&self, data: &[u8]) -> String {
        let char_of = |c: u32| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
        match self.kind {
            1 => data.iter().map(|&b| char::from(b)).collect(),
            2 => data
                .chunks_exact(2)
                .map(|c| char_of(u32::from(u16::from_le_bytes([c[0], c[1]]))))
                .collect(),
            _ => data
                .chunks_exact(4)
                .map(|c| char_of(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        }
    }
}

fn u64_at(bytes: &[u8], offset: u16) -> Option<u64> {
    let at = usize::from(offset);
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn i32_at(bytes: &[u8], offset: u16) -> Option<i32> {
    let at = usize::from(offset);
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Reads `buf.len()` bytes at `address` of process `pid`: `process_vm_readv`, else (when
/// that call is refused, as some seccomp profiles do) `/proc/PID/mem`. `false` when not all
/// of it could be read.
pub fn read_memory(pid: u32, address: u64, buf: &mut [u8]) -> bool {
    Memory::new(pid).read(address, buf).is_some()
}

/// A process's memory; `/proc/PID/mem` stays open once `process_vm_readv` was refused.
struct Memory {
    pid: u32,
    proc_mem: Option<File>,
}

impl Memory {
    fn new(pid: u32) -> Memory {
        Memory {
            pid,
            proc_mem: None,
        }
    }

    fn read(&mut self, address: u64, buf: &mut [u8]) -> Option<()> {
        if buf.is_empty() {
            return Some(());
        }
        if self.proc_mem.is_none() {
            match vm_readv(self.pid, address, buf) {
                Ok(n) => return (n == buf.len()).then_some(()),
                Err(err) if matches!(err.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
                    self.proc_mem = Some(File::open(format!("/proc/{}/mem", self.pid)).ok()?);
                }
                Err(_) => return None,
            }
        }
        self.proc_mem.as_ref()?.read_exact_at(buf, address).ok()
    }
}

fn vm_readv(pid: u32, address: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: address as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: `local` describes `buf`, which is writable for its length; the remote side is
    // only read by the kernel, which checks it.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// A map bounded to about `capacity` entries: two generations, the current one taking new
/// and recently used entries; when it holds half the capacity, it becomes the old one and the
/// old one is dropped. Lookups promote old entries, so what is used survives.
struct Generations<K, V> {
    current: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq + Copy, V: Clone> Generations<K, V> {
    fn new(capacity: usize) -> Self {
        Generations {
            current: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    fn get(&mut self, key: &K) -> Option<V> {
        if let Some(value) = self.current.get(key) {
            return Some(value.clone());
        }
        let value = self.old.remove(key)?;
        self.insert(*key, value.clone());
        Some(value)
    }

    fn insert(&mut self, key: K, value: V) {
        if self.current.len() >= self.half {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::layout;
    use super::*;

    fn header(layout: &PythonLayout, state: u32, length: i64) -> Vec<u8> {
        let mut header = vec![0u8; usize::from(layout.unicode_ascii_data)];
        let at = usize::from(layout.unicode_state);
        header[at..at + 4].copy_from_slice(&state.to_le_bytes());
        let at = usize::from(layout.unicode_length);
        header[at..at + 8].copy_from_slice(&length.to_le_bytes());
        header
    }

    const COMPACT: u32 = 1 << STATE_COMPACT_BIT;
    const ASCII: u32 = 1 << STATE_ASCII_BIT;

    fn kind(kind: u32) -> u32 {
        kind << STATE_KIND_SHIFT
    }

    #[test]
    fn string_shapes() {
        for minor in 11..=13 {
            let layout = layout(minor).unwrap();
            let shape =
                StrShape::of(layout, &header(layout, COMPACT | ASCII | kind(1), 5)).unwrap();
            assert_eq!(shape.data_offset, layout.unicode_ascii_data);
            assert_eq!((shape.kind, shape.bytes()), (1, 5));
            assert_eq!(shape.decode(b"hello"), "hello");

            let shape = StrShape::of(layout, &header(layout, COMPACT | kind(1), 4)).unwrap();
            assert_eq!(shape.data_offset, layout.unicode_compact_data);
            assert_eq!(shape.decode(b"caf\xe9"), "café");

            let shape = StrShape::of(layout, &header(layout, COMPACT | kind(2), 2)).unwrap();
            assert_eq!(shape.bytes(), 4);
            assert_eq!(shape.decode(&[0xfd, 0x51, 0x70, 0x65]), "函数");

            let shape = StrShape::of(layout, &header(layout, COMPACT | kind(4), 1)).unwrap();
            assert_eq!(shape.decode(&0x1_0000u32.to_le_bytes()), "\u{10000}");
            // A lone surrogate (legal in a Python str) is not a char.
            let shape = StrShape::of(layout, &header(layout, COMPACT | kind(2), 1)).unwrap();
            assert_eq!(shape.decode(&[0x00, 0xd8]), "\u{fffd}");

            // Long names are cut at 1 KiB.
            let shape = StrShape::of(layout, &header(layout, COMPACT | kind(4), 10_000)).unwrap();
            assert_eq!(shape.bytes(), NAME_LIMIT);

            // Legacy (not compact) strings, nonsense kinds, negative lengths.
            assert!(StrShape::of(layout, &header(layout, kind(1), 3)).is_none());
            assert!(StrShape::of(layout, &header(layout, COMPACT | kind(3), 3)).is_none());
            assert!(StrShape::of(layout, &header(layout, COMPACT | ASCII | kind(2), 3)).is_none());
            assert!(StrShape::of(layout, &header(layout, COMPACT | ASCII | kind(1), -1)).is_none());
        }
    }

    #[test]
    fn generations_keep_what_is_used() {
        let mut cache = Generations::new(4);
        cache.insert(1, "one");
        cache.insert(2, "two");
        // Full half: 1 and 2 become old.
        cache.insert(3, "three");
        assert_eq!(cache.get(&1), Some("one")); // promoted
        cache.insert(4, "four"); // 3 and 1 become old, 2 is dropped
        assert_eq!(cache.get(&2), None);
        assert_eq!(cache.get(&1), Some("one"));
        assert_eq!(cache.get(&3), Some("three"));
        assert!(cache.len() <= 4);
    }

    #[test]
    fn own_memory() {
        let value: [u64; 2] = [0x1122_3344_5566_7788, 42];
        let mut buf = [0u8; 16];
        assert!(read_memory(
            std::process::id(),
            value.as_ptr() as u64,
            &mut buf
        ));
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), value[0]);
        assert!(!read_memory(std::process::id(), 8, &mut buf));
        let mut memory = Memory::new(std::process::id());
        memory.proc_mem = Some(File::open("/proc/self/mem").unwrap());
        let mut buf = [0u8; 8];
        memory.read(value.as_ptr() as u64 + 8, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 42);
    }
}
