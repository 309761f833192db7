//! The perf.data writer: a pure function of batches to the bytes of a file that `perf script`
//! and `perf report` read (format: the kernel's tools/perf/Documentation/perf.data-file-format.txt).
//!
//! One attr (cpu-clock or cycles, frequency mode), then in time order: the kernel MMAP, a COMM
//! per thread, an MMAP2 per user mapping (real file offset, build id when known) before the
//! first sample that uses it, and SAMPLE records with a callchain carrying the kernel and user
//! context markers. Feature sections: build ids, hostname, os release, version, arch, nr_cpus,
//! cmdline.
//!
//! Interpreted (Python) and JIT-compiled frames have no file perf could read their names from:
//! with [`PerfDataFile::set_runtime_symbol_file`], they get synthetic addresses in a region
//! every process maps from a companion ELF file holding their names ([`crate::runtime_symbols`]
//! explains how, and what a perf.data copied to another host shows). Without it they keep
//! their own addresses, which perf shows as `[unknown]`.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io,
    os::unix::fs::FileExt,
};

use plugin_api::{FrameKind, Mapping, ProfileBatch, CPU_NANOSECONDS};

use crate::runtime_symbols::{self, RuntimeSymbols};

const MAGIC: &[u8; 8] = b"PERFILE2";
const FILE_HEADER_SIZE: u64 = 104;
/// perf 6.1 refuses attrs larger than it knows; 128 bytes is PERF_ATTR_SIZE_VER7.
const ATTR_SIZE: u64 = 128;
const FILE_SECTION_SIZE: u64 = 16;
/// Where the records start: after the file header and the one attr with its ids section.
const DATA_OFFSET: u64 = FILE_HEADER_SIZE + ATTR_SIZE + FILE_SECTION_SIZE;
/// Records held in memory before they go to the spill file, when there is one
/// ([`PerfDataFile::spill_to`]): what a fork storm's 8 MiB profile costs in memory.
const SPILL_CHUNK: usize = 1 << 20;

const PERF_TYPE_HARDWARE: u32 = 0;
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_HW_CPU_CYCLES: u64 = 0;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;

const SAMPLE_IP: u64 = 1 << 0;
const SAMPLE_TID: u64 = 1 << 1;
const SAMPLE_TIME: u64 = 1 << 2;
const SAMPLE_CALLCHAIN: u64 = 1 << 5;
const SAMPLE_CPU: u64 = 1 << 7;
const SAMPLE_PERIOD: u64 = 1 << 8;
const SAMPLE_TYPE: u64 =
    SAMPLE_IP | SAMPLE_TID | SAMPLE_TIME | SAMPLE_CPU | SAMPLE_PERIOD | SAMPLE_CALLCHAIN;

const ATTR_FLAG_MMAP: u64 = 1 << 8;
const ATTR_FLAG_COMM: u64 = 1 << 9;
const ATTR_FLAG_FREQ: u64 = 1 << 10;
const ATTR_FLAG_SAMPLE_ID_ALL: u64 = 1 << 18;
const ATTR_FLAG_MMAP2: u64 = 1 << 23;

const RECORD_MMAP: u32 = 1;
const RECORD_COMM: u32 = 3;
const RECORD_SAMPLE: u32 = 9;
const RECORD_MMAP2: u32 = 10;

const MISC_KERNEL: u16 = 1;
const MISC_USER: u16 = 2;
const MISC_MMAP_BUILD_ID: u16 = 1 << 14;
const MISC_BUILD_ID_SIZE: u16 = 1 << 15;

const CONTEXT_KERNEL: u64 = -128i64 as u64;
const CONTEXT_USER: u64 = -512i64 as u64;

const FEATURE_BUILD_ID: usize = 2;
const FEATURE_HOSTNAME: usize = 3;
const FEATURE_OSRELEASE: usize = 4;
const FEATURE_VERSION: usize = 5;
const FEATURE_ARCH: usize = 6;
const FEATURE_NRCPUS: usize = 7;
const FEATURE_CMDLINE: usize = 11;

const PROT_READ_EXEC: u32 = 0x1 | 0x4;
const MAP_PRIVATE: u32 = 0x02;

/// Facts that go into the header and feature sections, taken from the first batch.
#[derive(Clone, Debug, Default)]
struct HeaderFacts {
    event: String,
    frequency_hz: u64,
    hostname: String,
    kernel_release: String,
    arch: String,
    cpu_count: u32,
}

/// A perf.data file being assembled from batches.
///
/// Use: `new`, then `add_batch` for each batch in time order, then `finish` for the bytes.
#[derive(Default)]
pub struct PerfDataFile {
    cmdline: String,
    facts: Option<HeaderFacts>,
    /// The records not spilled (all of them without a spill file).
    data: Vec<u8>,
    /// Where the records beyond [`SPILL_CHUNK`] went, when a spill file was given.
    spill: Option<RecordSpill>,
    threads: HashSet<(u32, u32)>,
    /// The mappings written, by a 64-bit hash of the whole mapping: a fork storm maps tens of
    /// thousands a file.
    mappings: HashSet<u64>,
    /// Build ids by (kernel?, path), for the BUILD_ID feature section.
    build_ids: BTreeMap<(bool, String), String>,
    kernel_mapped: bool,
    /// Names of the interpreted and JIT frames, when they go to a companion file.
    runtime: Option<RuntimeSymbols>,
    /// Processes that have the runtime symbols' region mapped.
    runtime_mapped: HashSet<u32>,
    samples: u64,
    start_ns: u64,
    end_ns: u64,
}

impl PerfDataFile {
    /// An empty file; `cmdline` goes into the CMDLINE feature section.
    pub fn new(cmdline: &str) -> Self {
        Self {
            cmdline: cmdline.to_owned(),
            ..Default::default()
        }
    }

    /// Gives the interpreted and JIT frames of the batches to come names perf shows: their
    /// symbols go to the ELF file `path` (absolute; the MMAP2 records name it), whose bytes
    /// [`Self::runtime_symbols`] has once the file is finished. Only before the first batch;
    /// later calls change nothing.
    pub fn set_runtime_symbol_file(&mut self, path: &str) {
        if self.facts.is_none() && self.runtime.is_none() {
            self.runtime = Some(RuntimeSymbols::new(path));
        }
    }

    /// The runtime frames' symbols, when a file was set; write `to_elf()` to its `path()`
    /// unless it `is_empty()`.
    pub fn runtime_symbols(&self) -> Option<&RuntimeSymbols> {
        self.runtime.as_ref()
    }

    /// Number of sample records so far.
    pub fn sample_count(&self) -> u64 {
        self.samples
    }

    /// Bytes of records so far (the file is a little larger).
    pub fn data_len(&self) -> usize {
        self.spilled_len() as usize + self.data.len()
    }

    /// Sends the records, once more than [`SPILL_CHUNK`] of them wait in memory, to `file`
    /// (empty, readable and writable; an unnamed temporary file beside the profiles), from
    /// which [`Self::write_to`] copies them: memory holds at most a chunk of records however
    /// large the profile grows. A failed write to it (a full disk) is kept and returned by
    /// [`Self::write_to`]: the profile cannot be written whole.
    pub fn spill_to(&mut self, file: File) {
        self.spill = Some(RecordSpill {
            file,
            len: 0,
            error: None,
        });
    }

    fn spilled_len(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.len)
    }

    /// Moves the records in memory to the spill file, when there is one and they are more
    /// than [`SPILL_CHUNK`].
    fn spill_records(&mut self) {
        let Some(spill) = &mut self.spill else {
            return;
        };
        if self.data.len() <= SPILL_CHUNK {
            return;
        }
        if spill.error.is_none() {
            if let Err(e) = spill.file.write_all_at(&self.data, spill.len) {
                spill.error = Some(e);
            }
        }
        spill.len += self.data.len() as u64;
        self.data.clear();
    }

    /// Time range covered so far, nanoseconds since the Unix epoch.
    pub fn time_range(&self) -> (u64, u64) {
        (self.start_ns, self.end_ns)
    }

    /// Appends the records of `batch`: metadata records first (each timestamped just before
    /// the first sample that needs it), then its samples in time order.
    pub fn add_batch(&mut self, batch: &ProfileBatch) {
        if self.facts.is_none() {
            self.facts = Some(HeaderFacts {
                event: batch.event_name().to_owned(),
                frequency_hz: batch.frequency_hz,
                hostname: batch.str(batch.host.hostname).to_owned(),
                kernel_release: batch.str(batch.host.kernel_release).to_owned(),
                arch: batch.str(batch.host.arch).to_owned(),
                cpu_count: batch.host.cpu_count,
            });
            self.start_ns = batch.start_ns;
        }
        self.end_ns = self.end_ns.max(batch.end_ns);
        let mut mapping_written = vec![false; batch.mappings.len()];
        let mut chains: Vec<Option<(u64, u16, Vec<u64>)>> = vec![None; batch.stacks.len()];
        // The synthetic address of each runtime frame of the batch (empty when there are none).
        let runtime_addresses: Vec<Option<u64>> = match &mut self.runtime {
            Some(symbols) if batch.frames.iter().any(RuntimeSymbols::is_runtime_frame) => batch
                .frames
                .iter()
                .map(|frame| symbols.address(batch, frame))
                .collect(),
            _ => Vec::new(),
        };
        let cpu_time = batch.value_index(CPU_NANOSECONDS);
        for (sample, count) in batch.samples.iter().zip(batch.sample_counts()) {
            let meta_time = sample.timestamp_ns.saturating_sub(1);
            if !self.kernel_mapped {
                if let Some(kernel) = batch.mappings.iter().find(|m| m.kernel) {
                    self.write_kernel_mmap(batch, kernel, meta_time);
                }
                self.kernel_mapped = true;
            }
            if self.threads.insert((sample.pid, sample.tid)) {
                let comm = batch
                    .process(sample.pid)
                    .filter(|_| sample.pid == sample.tid)
                    .map(|p| batch.str(p.comm))
                    .filter(|c| !c.is_empty())
                    .unwrap_or(batch.str(sample.thread_name));
                self.write_comm(sample.pid, sample.tid, comm, meta_time);
            }
            let mut runtime_frames = false;
            for &id in batch.stack_frame_ids(sample.stack) {
                let frame = &batch.frames[id as usize];
                runtime_frames |= runtime_addresses
                    .get(id as usize)
                    .is_some_and(Option::is_some);
                if let Some(&m) = frame.mapping.as_ref().into_option() {
                    if !mapping_written[m as usize] {
                        mapping_written[m as usize] = true;
                        let mapping = &batch.mappings[m as usize];
                        if !mapping.kernel && self.mappings.insert(mapping_hash(batch, mapping)) {
                            self.write_mmap2(batch, mapping, meta_time);
                        }
                    }
                }
            }
            if runtime_frames && self.runtime_mapped.insert(sample.pid) {
                self.write_runtime_mmap2(sample.pid, meta_time);
            }
            let (ip, misc, chain) = chains[sample.stack as usize]
                .get_or_insert_with(|| callchain(batch, sample.stack, &runtime_addresses));
            // The sample's CPU time is perf's period (what `perf report` weighs by).
            let period = match cpu_time.and_then(|i| sample.values.get(i)) {
                Some(&nanoseconds) => nanoseconds.max(0) as u64,
                None => batch.period_ns * count,
            };
            let size = 8 + 8 + 8 + 8 + 8 + 8 + 8 * chain.len() + 8;
            self.header(RECORD_SAMPLE, *misc, size);
            self.u64(*ip);
            self.u32(sample.pid);
            self.u32(sample.tid);
            self.u64(sample.timestamp_ns);
            self.u32(sample.cpu);
            self.u32(0);
            self.u64(period);
            self.u64(chain.len() as u64);
            for address in chain.iter() {
                self.data.extend_from_slice(&address.to_ne_bytes());
            }
            self.samples += 1;
            self.spill_records();
        }
    }

    fn write_kernel_mmap(&mut self, batch: &ProfileBatch, kernel: &Mapping, time: u64) {
        let name = padded_name("[kernel.kallsyms]_text");
        let size = 8 + 8 + 8 + 8 + 8 + name.len() + SAMPLE_ID_SIZE;
        self.header(RECORD_MMAP, MISC_KERNEL, size);
        self.u32(u32::MAX);
        self.u32(0);
        self.u64(kernel.start);
        self.u64(kernel.end.wrapping_sub(kernel.start));
        self.u64(kernel.file_offset);
        self.data.extend_from_slice(&name);
        self.sample_id(u32::MAX, 0, time);
        if kernel.build_id != 0 {
            self.build_ids.insert(
                (true, "[kernel.kallsyms]".to_owned()),
                batch.str(kernel.build_id).to_owned(),
            );
        }
    }

    fn write_comm(&mut self, pid: u32, tid: u32, comm: &str, time: u64) {
        let name = padded_name(comm);
        self.header(RECORD_COMM, 0, 8 + 8 + name.len() + SAMPLE_ID_SIZE);
        self.u32(pid);
        self.u32(tid);
        self.data.extend_from_slice(&name);
        self.sample_id(pid, tid, time);
    }

    fn write_mmap2(&mut self, batch: &ProfileBatch, mapping: &Mapping, time: u64) {
        let user = UserMapping {
            pid: mapping.pid,
            start: mapping.start,
            len: mapping.end.saturating_sub(mapping.start),
            file_offset: mapping.file_offset,
            path: batch.str(mapping.path),
            build_id: batch.str(mapping.build_id),
        };
        self.write_user_mmap2(&user, time);
    }

    /// The MMAP2 of the runtime symbols' region in process `pid`.
    fn write_runtime_mmap2(&mut self, pid: u32, time: u64) {
        let Some(symbols) = &self.runtime else {
            return;
        };
        let (path, build_id) = (symbols.path().to_owned(), bytes_to_hex(symbols.build_id()));
        let region = UserMapping {
            pid,
            start: runtime_symbols::REGION_START,
            len: runtime_symbols::REGION_LEN,
            file_offset: 0,
            path: &path,
            build_id: &build_id,
        };
        self.write_user_mmap2(&region, time);
    }

    fn write_user_mmap2(&mut self, mapping: &UserMapping, time: u64) {
        let name = padded_name(mapping.path);
        let build_id = hex_to_bytes(mapping.build_id);
        let misc = MISC_USER
            | if build_id.is_some() {
                MISC_MMAP_BUILD_ID
            } else {
                0
            };
        let size = 8 + 8 + 8 + 8 + 8 + 24 + 8 + name.len() + SAMPLE_ID_SIZE;
        self.header(RECORD_MMAP2, misc, size);
        self.u32(mapping.pid);
        self.u32(mapping.pid);
        self.u64(mapping.start);
        self.u64(mapping.len);
        self.u64(mapping.file_offset);
        match &build_id {
            Some(id) => {
                let mut field = [0u8; 24];
                let len = id.len().min(20);
                field[0] = len as u8;
                field[4..4 + len].copy_from_slice(&id[..len]);
                self.data.extend_from_slice(&field);
                self.build_ids.insert(
                    (false, mapping.path.to_owned()),
                    mapping.build_id.to_owned(),
                );
            }
            None => self.data.extend_from_slice(&[0u8; 24]),
        }
        self.u32(PROT_READ_EXEC);
        self.u32(MAP_PRIVATE);
        self.data.extend_from_slice(&name);
        self.sample_id(mapping.pid, mapping.pid, time);
    }

    /// The complete file, in one buffer of its exact size.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.file_len() as usize);
        self.write_to(&mut out)
            .expect("writing into memory cannot fail");
        out
    }

    /// Size of the complete file in bytes.
    pub fn file_len(&self) -> u64 {
        let features = self.features();
        let feature_bytes: usize = features.iter().map(|(_, body)| body.len()).sum();
        DATA_OFFSET
            + self.data_len() as u64
            + FILE_SECTION_SIZE * features.len() as u64
            + feature_bytes as u64
    }

    /// Writes the complete file to `out` from its parts, without a copy of the records: a
    /// profile's records are most of the agent's memory when it is written.
    pub fn write_to(&self, out: &mut (impl std::io::Write + ?Sized)) -> std::io::Result<()> {
        let facts = self.facts.clone().unwrap_or_default();
        let attrs_offset = FILE_HEADER_SIZE;
        let attrs_size = ATTR_SIZE + FILE_SECTION_SIZE;
        let data_offset = DATA_OFFSET;
        let data_size = self.data_len() as u64;
        let features = self.features();

        let mut headers = Vec::with_capacity(data_offset as usize);
        headers.extend_from_slice(MAGIC);
        headers.extend_from_slice(&FILE_HEADER_SIZE.to_ne_bytes());
        headers.extend_from_slice(&attrs_size.to_ne_bytes());
        section(&mut headers, attrs_offset, attrs_size);
        section(&mut headers, data_offset, data_size);
        section(&mut headers, 0, 0);
        let mut bitmap = [0u64; 4];
        for (bit, _) in &features {
            bitmap[bit / 64] |= 1 << (bit % 64);
        }
        bitmap
            .iter()
            .for_each(|w| headers.extend_from_slice(&w.to_ne_bytes()));
        debug_assert_eq!(headers.len() as u64, FILE_HEADER_SIZE);
        headers.extend(attr(&facts));
        section(&mut headers, 0, 0);
        debug_assert_eq!(headers.len() as u64, data_offset);
        out.write_all(&headers)?;
        if let Some(spill) = &self.spill {
            spill.copy_to(out)?;
        }
        out.write_all(&self.data)?;

        let mut table = Vec::with_capacity(FILE_SECTION_SIZE as usize * features.len());
        let mut next = data_offset + data_size + FILE_SECTION_SIZE * features.len() as u64;
        for (_, body) in &features {
            section(&mut table, next, body.len() as u64);
            next += body.len() as u64;
        }
        out.write_all(&table)?;
        for (_, body) in &features {
            out.write_all(body)?;
        }
        Ok(())
    }

    /// The feature sections, by feature bit.
    fn features(&self) -> Vec<(usize, Vec<u8>)> {
        let facts = self.facts.clone().unwrap_or_default();
        vec![
            (FEATURE_BUILD_ID, self.build_id_section()),
            (FEATURE_HOSTNAME, header_string(&facts.hostname)),
            (FEATURE_OSRELEASE, header_string(&facts.kernel_release)),
            (
                FEATURE_VERSION,
                header_string(concat!("profile-router ", env!("CARGO_PKG_VERSION"))),
            ),
            (FEATURE_ARCH, header_string(&facts.arch)),
            (FEATURE_NRCPUS, {
                let mut b = facts.cpu_count.to_ne_bytes().to_vec();
                b.extend_from_slice(&facts.cpu_count.to_ne_bytes());
                b
            }),
            (FEATURE_CMDLINE, {
                let words: Vec<&str> = self.cmdline.split_whitespace().collect();
                let mut b = (words.len() as u32).to_ne_bytes().to_vec();
                words.iter().for_each(|w| b.extend(header_string(w)));
                b
            }),
        ]
    }

    fn build_id_section(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ((kernel, path), id) in &self.build_ids {
            let Some(bytes) = hex_to_bytes(id) else {
                continue;
            };
            let name = aligned_name(path, 64);
            let size = 8 + 4 + 24 + name.len();
            let misc = if *kernel { MISC_KERNEL } else { MISC_USER } | MISC_BUILD_ID_SIZE;
            out.extend_from_slice(&0u32.to_ne_bytes());
            out.extend_from_slice(&misc.to_ne_bytes());
            out.extend_from_slice(&(size as u16).to_ne_bytes());
            out.extend_from_slice(&(-1i32).to_ne_bytes());
            let mut field = [0u8; 24];
            let len = bytes.len().min(20);
            field[..len].copy_from_slice(&bytes[..len]);
            field[20] = len as u8;
            out.extend_from_slice(&field);
            out.extend_from_slice(&name);
        }
        out
    }

    fn header(&mut self, kind: u32, misc: u16, size: usize) {
        self.u32(kind);
        self.data.extend_from_slice(&misc.to_ne_bytes());
        self.data.extend_from_slice(&(size as u16).to_ne_bytes());
    }

    /// The sample_id trailer of non-sample records (sample_id_all): TID, TIME, CPU.
    fn sample_id(&mut self, pid: u32, tid: u32, time: u64) {
        self.u32(pid);
        self.u32(tid);
        self.u64(time);
        self.u32(0);
        self.u32(0);
    }

    fn u32(&mut self, v: u32) {
        self.data.extend_from_slice(&v.to_ne_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.data.extend_from_slice(&v.to_ne_bytes());
    }
}

const SAMPLE_ID_SIZE: usize = 8 + 8 + 8;

/// A hash of `mapping` with its path and build id (not their batch's string indices), the
/// same in every run.
fn mapping_hash(batch: &ProfileBatch, mapping: &Mapping) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one((
        mapping.pid,
        mapping.start,
        mapping.end,
        mapping.file_offset,
        batch.str(mapping.path),
        batch.str(mapping.build_id),
    ))
}

/// The records of a profile that went to a file instead of memory.
struct RecordSpill {
    file: File,
    /// Bytes of records sent to it.
    len: u64,
    /// Why some of them did not reach it.
    error: Option<io::Error>,
}

impl RecordSpill {
    /// Copies the spilled records to `out`, or says why they are not all there.
    fn copy_to(&self, out: &mut (impl io::Write + ?Sized)) -> io::Result<()> {
        if let Some(e) = &self.error {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let mut buffer = vec![0u8; 64 << 10];
        let mut at = 0;
        while at < self.len {
            let want = buffer.len().min((self.len - at) as usize);
            self.file.read_exact_at(&mut buffer[..want], at)?;
            out.write_all(&buffer[..want])?;
            at += want as u64;
        }
        Ok(())
    }
}

/// What an MMAP2 record of a user mapping says.
struct UserMapping<'a> {
    pid: u32,
    start: u64,
    len: u64,
    file_offset: u64,
    path: &'a str,
    /// Lowercase hex, empty when unknown.
    build_id: &'a str,
}

/// IP, record misc and callchain (with context markers) of a stack; the runtime frames'
/// addresses are taken from `runtime_addresses` (by frame index) when it has them.
fn callchain(
    batch: &ProfileBatch,
    stack: u32,
    runtime_addresses: &[Option<u64>],
) -> (u64, u16, Vec<u64>) {
    let mut chain = Vec::with_capacity(batch.stacks[stack as usize].len as usize + 2);
    let mut context = None;
    let mut ip = None;
    for &id in batch.stack_frame_ids(stack) {
        let frame = &batch.frames[id as usize];
        let address = runtime_addresses
            .get(id as usize)
            .copied()
            .flatten()
            .unwrap_or(frame.address);
        ip.get_or_insert(address);
        let marker = if frame.kind == FrameKind::Kernel {
            CONTEXT_KERNEL
        } else {
            CONTEXT_USER
        };
        if context != Some(marker) {
            chain.push(marker);
            context = Some(marker);
        }
        chain.push(address);
    }
    let leaf = batch.stack(stack).next();
    let ip = ip.unwrap_or(0);
    let misc = match leaf.map(|f| f.kind) {
        Some(FrameKind::Kernel) => MISC_KERNEL,
        _ => MISC_USER,
    };
    (ip, misc, chain)
}

fn attr(facts: &HeaderFacts) -> Vec<u8> {
    let (kind, config) = match facts.event.as_str() {
        "cpu-cycles" | "cycles" => (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
        _ => (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK),
    };
    let mut a = Vec::with_capacity(ATTR_SIZE as usize);
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(&(ATTR_SIZE as u32).to_ne_bytes());
    a.extend_from_slice(&config.to_ne_bytes());
    a.extend_from_slice(&facts.frequency_hz.to_ne_bytes());
    a.extend_from_slice(&SAMPLE_TYPE.to_ne_bytes());
    a.extend_from_slice(&0u64.to_ne_bytes());
    let flags = ATTR_FLAG_MMAP
        | ATTR_FLAG_COMM
        | ATTR_FLAG_FREQ
        | ATTR_FLAG_SAMPLE_ID_ALL
        | ATTR_FLAG_MMAP2;
    a.extend_from_slice(&flags.to_ne_bytes());
    a.resize(ATTR_SIZE as usize, 0);
    a
}

fn section(out: &mut Vec<u8>, offset: u64, size: u64) {
    out.extend_from_slice(&offset.to_ne_bytes());
    out.extend_from_slice(&size.to_ne_bytes());
}

/// A NUL-terminated name padded to a multiple of 8 bytes, as records carry them.
fn padded_name(name: &str) -> Vec<u8> {
    aligned_name(name, 8)
}

fn aligned_name(name: &str, align: usize) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes.resize(bytes.len().div_ceil(align) * align, 0);
    bytes
}

/// perf's header string: a u32 length, then the NUL-padded string aligned to 64 bytes.
fn header_string(s: &str) -> Vec<u8> {
    let name = aligned_name(s, 64);
    let mut out = (name.len() as u32).to_ne_bytes().to_vec();
    out.extend(name);
    out
}

fn bytes_to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_to_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use plugin_api::fixtures::{synthetic_batch, BatchShape};

    use super::*;

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn header_sections_point_inside_the_file() {
        let batch = synthetic_batch(BatchShape::BENCH, 1_000);
        let mut file = PerfDataFile::new("router");
        file.add_batch(&batch);
        let bytes = file.finish();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(u64_at(&bytes, 8), FILE_HEADER_SIZE);
        assert_eq!(u64_at(&bytes, 16), ATTR_SIZE + FILE_SECTION_SIZE);
        let (data_offset, data_size) = (u64_at(&bytes, 40), u64_at(&bytes, 48));
        assert_eq!(
            data_offset,
            FILE_HEADER_SIZE + ATTR_SIZE + FILE_SECTION_SIZE
        );
        assert!(data_offset + data_size < bytes.len() as u64);
        assert_eq!(file.sample_count(), 10_000);
    }

    #[test]
    fn spilled_records_make_the_same_file_and_memory_holds_one_chunk_of_them() {
        let batches: Vec<_> = (0..3)
            .map(|i| synthetic_batch(BatchShape::BENCH, 1_000 + i * 10_000_000_000))
            .collect();
        let mut in_memory = PerfDataFile::new("router");
        let mut spilled = PerfDataFile::new("router");
        spilled.spill_to(tempfile::tempfile().unwrap());
        for batch in &batches {
            in_memory.add_batch(batch);
            spilled.add_batch(batch);
            assert!(spilled.data.len() <= SPILL_CHUNK + 4096);
        }
        assert!(in_memory.data_len() > 2 * SPILL_CHUNK, "the test spills");
        assert_eq!(spilled.data_len(), in_memory.data_len());
        assert_eq!(spilled.file_len(), in_memory.file_len());
        let mut written = Vec::new();
        spilled.write_to(&mut written).unwrap();
        assert!(written == in_memory.finish(), "the same bytes");
    }

    #[test]
    fn records_that_did_not_reach_the_spill_file_fail_the_write_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        std::fs::write(&path, b"").unwrap();
        let mut file = PerfDataFile::new("router");
        file.spill_to(File::open(&path).unwrap()); // read-only: every write fails
        for i in 0..3 {
            file.add_batch(&synthetic_batch(
                BatchShape::BENCH,
                1_000 + i * 10_000_000_000,
            ));
        }
        assert_eq!(file.sample_count(), 30_000, "the samples are still counted");
        let error = file.write_to(&mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("Bad file descriptor"), "{error}");
    }

    #[test]
    fn finish_allocates_the_file_once_at_its_exact_size() {
        // A profile's bytes are most of the agent's memory when it is written: a buffer grown
        // past a guessed capacity would hold up to twice the file.
        let batch = synthetic_batch(BatchShape::BENCH, 1_000);
        let mut file = PerfDataFile::new("router --config /etc/profile-router/agent.toml");
        file.add_batch(&batch);
        let bytes = file.finish();
        assert_eq!(bytes.capacity(), bytes.len());
    }

    #[test]
    fn records_are_sized_in_multiples_of_eight_and_every_sample_has_context_markers() {
        let batch = synthetic_batch(BatchShape::BENCH, 1_000);
        let mut file = PerfDataFile::new("router");
        file.add_batch(&batch);
        let data = &file.data;
        let (mut at, mut samples, mut kinds) = (0, 0, Vec::new());
        while at < data.len() {
            let kind = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
            let size = u16::from_ne_bytes(data[at + 6..at + 8].try_into().unwrap()) as usize;
            assert_eq!(size % 8, 0, "record of type {kind}");
            if kind == RECORD_SAMPLE {
                samples += 1;
                let chain_start = at + 8 + 40;
                assert_eq!(u64_at(data, chain_start + 8), CONTEXT_KERNEL);
            } else if samples == 0 {
                kinds.push(kind);
            }
            at += size;
        }
        assert_eq!(samples, 10_000);
        assert_eq!(kinds[0], RECORD_MMAP, "the kernel mapping comes first");
    }

    /// Records of `data` as (type, offset).
    fn records(data: &[u8]) -> Vec<(u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let kind = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
            out.push((kind, at));
            at += u16::from_ne_bytes(data[at + 6..at + 8].try_into().unwrap()) as usize;
        }
        out
    }

    /// (pid, start, filename) of every MMAP2 record.
    fn mmap2s(data: &[u8]) -> Vec<(u32, u64, String)> {
        records(data)
            .into_iter()
            .filter(|&(kind, _)| kind == RECORD_MMAP2)
            .map(|(_, at)| {
                let pid = u32::from_ne_bytes(data[at + 8..at + 12].try_into().unwrap());
                let name = &data[at + 72..];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap()];
                (
                    pid,
                    u64_at(data, at + 16),
                    String::from_utf8_lossy(name).into_owned(),
                )
            })
            .collect()
    }

    /// (pid, callchain without context markers) of every sample.
    fn sample_chains(data: &[u8]) -> Vec<(u32, Vec<u64>)> {
        records(data)
            .into_iter()
            .filter(|&(kind, _)| kind == RECORD_SAMPLE)
            .map(|(_, at)| {
                let pid = u32::from_ne_bytes(data[at + 16..at + 20].try_into().unwrap());
                let nr = u64_at(data, at + 48) as usize;
                let chain = (0..nr)
                    .map(|i| u64_at(data, at + 56 + 8 * i))
                    .filter(|&a| a != CONTEXT_USER && a != CONTEXT_KERNEL)
                    .collect();
                (pid, chain)
            })
            .collect()
    }

    /// A Python process (4242: leaf < mid < outer < a native frame) and a Node one (4343: a
    /// JIT frame < the same native frame), `start_ns` on.
    pub(crate) fn runtime_batch(start_ns: u64) -> ProfileBatch {
        use plugin_api::{BatchBuilder, Frame, Sample};
        let mut b = BatchBuilder::new();
        let (cpython, v8) = (b.intern("cpython"), b.intern("v8"));
        let file = b.intern("/srv/app/chain.py");
        let python = |b: &mut BatchBuilder, name: &str, line: u32| {
            let function = b.intern(name);
            b.frame(Frame {
                address: 0x7f00_1234_0000 + u64::from(line),
                function,
                file,
                line,
                kind: FrameKind::Interpreted,
                runtime: cpython,
                ..Default::default()
            })
        };
        let leaf = python(&mut b, "leaf", 10);
        let mid = python(&mut b, "mid", 15);
        let outer = python(&mut b, "outer", 20);
        let function = b.intern("JS:*hotLoop");
        let jit = b.frame(Frame {
            address: 0x3b00_0000_1234,
            function,
            kind: FrameKind::Jit,
            runtime: v8,
            ..Default::default()
        });
        let path = b.intern("/usr/bin/app");
        let mapping = b.mapping(Mapping {
            pid: 4242,
            start: 0x40_0000,
            end: 0x50_0000,
            path,
            ..Default::default()
        });
        let native = b.frame_symbolized(0x40_1000, Some(mapping), "main", FrameKind::Native);
        let stacks = [
            b.stack(&[leaf, mid, outer, native]),
            b.stack(&[jit, native]),
        ];
        let comm = b.intern("app");
        b.cpu_sample_types();
        for i in 0..4u64 {
            b.sample(Sample {
                pid: [4242, 4343][i as usize % 2],
                tid: [4242, 4343][i as usize % 2],
                stack: stacks[i as usize % 2],
                values: vec![1, 10_000_000].into(),
                timestamp_ns: start_ns + i * 1_000_000,
                thread_name: comm,
                ..Default::default()
            });
        }
        let h = b.header();
        (h.start_ns, h.end_ns, h.period_ns) = (start_ns, start_ns + 1_000_000_000, 10_000_000);
        b.finish()
    }

    #[test]
    fn runtime_frames_get_named_slots_in_a_region_each_process_maps_once() {
        let path = "/var/lib/profiles/perf-x.runtime.elf";
        let mut file = PerfDataFile::new("router");
        file.set_runtime_symbol_file(path);
        file.add_batch(&runtime_batch(1_000_000_000));
        file.add_batch(&runtime_batch(2_000_000_000));

        let regions: Vec<_> = mmap2s(&file.data)
            .into_iter()
            .filter(|(_, _, name)| name == path)
            .collect();
        let pids: Vec<u32> = regions.iter().map(|r| r.0).collect();
        assert_eq!(pids, [4242, 4343], "one region per process, not per batch");
        assert!(regions.iter().all(|r| r.1 == runtime_symbols::REGION_START));

        let symbols = file.runtime_symbols().unwrap();
        assert_eq!(symbols.len(), 4);
        let chains = sample_chains(&file.data);
        assert_eq!(chains.len(), 8);
        for (pid, chain) in chains {
            let names: Vec<&str> = chain.iter().filter_map(|&a| symbols.name_at(a)).collect();
            match pid {
                4242 => assert_eq!(
                    names,
                    [
                        "leaf (/srv/app/chain.py:10)",
                        "mid (/srv/app/chain.py:15)",
                        "outer (/srv/app/chain.py:20)"
                    ]
                ),
                _ => assert_eq!(names, ["JS:*hotLoop"]),
            }
            assert_eq!(chain.last(), Some(&0x40_1000), "native frames keep theirs");
        }
        let build_ids = file.build_id_section();
        let needle = format!("{path}\0");
        assert!(build_ids
            .windows(needle.len())
            .any(|w| w == needle.as_bytes()));
        let elf = symbols.to_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        let id = symbols.build_id();
        assert!(elf.windows(id.len()).any(|w| w == id), "the build id note");
    }

    #[test]
    fn without_a_symbol_file_runtime_frames_keep_their_addresses() {
        let mut file = PerfDataFile::new("router");
        file.add_batch(&runtime_batch(1_000_000_000));
        assert!(file.runtime_symbols().is_none());
        assert_eq!(mmap2s(&file.data).len(), 1, "only the native mapping");
        let chains = sample_chains(&file.data);
        assert_eq!(chains[0].1[0], 0x7f00_1234_0000 + 10);
        assert_eq!(chains[1].1[0], 0x3b00_0000_1234);

        // Too late once a batch is in: its records could not name the file.
        file.set_runtime_symbol_file("/late.runtime.elf");
        assert!(file.runtime_symbols().is_none());
    }

    #[test]
    fn hex_build_ids_decode() {
        assert_eq!(hex_to_bytes("0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_to_bytes(""), None);
        assert_eq!(hex_to_bytes("zz"), None);
        assert_eq!(bytes_to_hex(&[0x0a, 0xff]), "0aff");
    }
}
