//! The perf.data writer: a pure function of batches to the bytes of a file that `perf script`
//! and `perf report` read (format: the kernel's tools/perf/Documentation/perf.data-file-format.txt).
//!
//! One attr (cpu-clock or cycles, frequency mode), then in time order: the kernel MMAP, a COMM
//! per thread, an MMAP2 per user mapping (real file offset, build id when known) before the
//! first sample that uses it, and SAMPLE records with a callchain carrying the kernel and user
//! context markers. Feature sections: build ids, hostname, os release, version, arch, nr_cpus,
//! cmdline.

use std::collections::{BTreeMap, HashSet};

use plugin_api::{FrameKind, Mapping, ProfileBatch};

const MAGIC: &[u8; 8] = b"PERFILE2";
const FILE_HEADER_SIZE: u64 = 104;
/// perf 6.1 refuses attrs larger than it knows; 128 bytes is PERF_ATTR_SIZE_VER7.
const ATTR_SIZE: u64 = 128;
const FILE_SECTION_SIZE: u64 = 16;

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
    data: Vec<u8>,
    threads: HashSet<(u32, u32)>,
    mappings: HashSet<Mapping>,
    /// Build ids by (kernel?, path), for the BUILD_ID feature section.
    build_ids: BTreeMap<(bool, String), String>,
    kernel_mapped: bool,
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

    /// Number of sample records so far.
    pub fn sample_count(&self) -> u64 {
        self.samples
    }

    /// Bytes of records so far (the file is a little larger).
    pub fn data_len(&self) -> usize {
        self.data.len()
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
        for sample in batch.samples.iter() {
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
            for frame in batch.stack(sample.stack) {
                if let Some(&m) = frame.mapping.as_ref().into_option() {
                    if !mapping_written[m as usize] {
                        mapping_written[m as usize] = true;
                        let mapping = &batch.mappings[m as usize];
                        if !mapping.kernel && self.mappings.insert(mapping.clone()) {
                            self.write_mmap2(batch, mapping, meta_time);
                        }
                    }
                }
            }
            let (ip, misc, chain) =
                chains[sample.stack as usize].get_or_insert_with(|| callchain(batch, sample.stack));
            let period = batch.period_ns * u64::from(sample.count.max(1));
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
        let path = batch.str(mapping.path);
        let name = padded_name(path);
        let build_id = hex_to_bytes(batch.str(mapping.build_id));
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
        self.u64(mapping.end - mapping.start);
        self.u64(mapping.file_offset);
        match &build_id {
            Some(id) => {
                let mut field = [0u8; 24];
                let len = id.len().min(20);
                field[0] = len as u8;
                field[4..4 + len].copy_from_slice(&id[..len]);
                self.data.extend_from_slice(&field);
                self.build_ids.insert(
                    (false, path.to_owned()),
                    batch.str(mapping.build_id).to_owned(),
                );
            }
            None => self.data.extend_from_slice(&[0u8; 24]),
        }
        self.u32(PROT_READ_EXEC);
        self.u32(MAP_PRIVATE);
        self.data.extend_from_slice(&name);
        self.sample_id(mapping.pid, mapping.pid, time);
    }

    /// The complete file.
    pub fn finish(&self) -> Vec<u8> {
        let facts = self.facts.clone().unwrap_or_default();
        let attrs_offset = FILE_HEADER_SIZE;
        let attrs_size = ATTR_SIZE + FILE_SECTION_SIZE;
        let data_offset = attrs_offset + attrs_size;
        let data_size = self.data.len() as u64;

        let features: Vec<(usize, Vec<u8>)> = vec![
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
        ];

        let mut out = Vec::with_capacity(self.data.len() + 4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FILE_HEADER_SIZE.to_ne_bytes());
        out.extend_from_slice(&attrs_size.to_ne_bytes());
        section(&mut out, attrs_offset, attrs_size);
        section(&mut out, data_offset, data_size);
        section(&mut out, 0, 0);
        let mut bitmap = [0u64; 4];
        for (bit, _) in &features {
            bitmap[bit / 64] |= 1 << (bit % 64);
        }
        bitmap
            .iter()
            .for_each(|w| out.extend_from_slice(&w.to_ne_bytes()));
        debug_assert_eq!(out.len() as u64, FILE_HEADER_SIZE);

        out.extend(attr(&facts));
        section(&mut out, 0, 0);
        out.extend_from_slice(&self.data);

        let table_offset = data_offset + data_size;
        let mut next = table_offset + FILE_SECTION_SIZE * features.len() as u64;
        for (_, body) in &features {
            section(&mut out, next, body.len() as u64);
            next += body.len() as u64;
        }
        for (_, body) in &features {
            out.extend_from_slice(body);
        }
        out
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

/// IP, record misc and callchain (with context markers) of a stack.
fn callchain(batch: &ProfileBatch, stack: u32) -> (u64, u16, Vec<u64>) {
    let mut chain = Vec::with_capacity(batch.stacks[stack as usize].len as usize + 2);
    let mut context = None;
    for frame in batch.stack(stack) {
        let marker = if frame.kind == FrameKind::Kernel {
            CONTEXT_KERNEL
        } else {
            CONTEXT_USER
        };
        if context != Some(marker) {
            chain.push(marker);
            context = Some(marker);
        }
        chain.push(frame.address);
    }
    let leaf = batch.stack(stack).next();
    let ip = leaf.map_or(0, |f| f.address);
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

fn hex_to_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn hex_build_ids_decode() {
        assert_eq!(hex_to_bytes("0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_to_bytes(""), None);
        assert_eq!(hex_to_bytes("zz"), None);
    }
}
