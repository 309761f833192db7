//! Properties of the ring-buffer record parser ([`parse_record`], then [`raw_sample`]): any
//! bytes at all are parsed without a panic, and a well-formed record gives back the fields
//! and stacks the probe wrote.

use std::mem::{offset_of, size_of};

use probe_common::{SampleHeader, COMM_LEN, MAX_STACK_DEPTH};
use proptest::{collection::vec, prelude::*, test_runner::RngSeed};

use super::{probe::parse_record, raw_sample, WallClock};

/// The clock of the tests: monotonic time is Unix time.
const SAME_CLOCK: WallClock = WallClock { offset_ns: 0 };

/// What the probe writes for one sample.
#[derive(Debug, Clone)]
struct WrittenRecord {
    timestamp_ns: u64,
    pid: u32,
    tid: u32,
    cpu: u32,
    unwind_outcome: u32,
    comm: [u8; COMM_LEN],
    /// The kernel stack, or the kernel's (negative) error instead of one.
    kernel: Result<Vec<u64>, i32>,
    /// The user stack, or the kernel's (negative) error instead of one.
    user: Result<Vec<u64>, i32>,
}

impl WrittenRecord {
    /// The record's bytes, laid out field by field as the probe's `SampleHeader` then the
    /// kernel stack then the user stack.
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<SampleHeader>()];
        let mut put = |offset: usize, field: &[u8]| {
            bytes[offset..offset + field.len()].copy_from_slice(field);
        };
        let stack_bytes = |stack: &Result<Vec<u64>, i32>| match stack {
            Ok(addresses) => (addresses.len() * 8) as i32,
            Err(errno) => *errno,
        };
        put(
            offset_of!(SampleHeader, timestamp_ns),
            &self.timestamp_ns.to_ne_bytes(),
        );
        put(offset_of!(SampleHeader, pid), &self.pid.to_ne_bytes());
        put(offset_of!(SampleHeader, tid), &self.tid.to_ne_bytes());
        put(offset_of!(SampleHeader, cpu), &self.cpu.to_ne_bytes());
        put(
            offset_of!(SampleHeader, user_stack_bytes),
            &stack_bytes(&self.user).to_ne_bytes(),
        );
        put(
            offset_of!(SampleHeader, kernel_stack_bytes),
            &stack_bytes(&self.kernel).to_ne_bytes(),
        );
        put(
            offset_of!(SampleHeader, unwind_outcome),
            &self.unwind_outcome.to_ne_bytes(),
        );
        put(offset_of!(SampleHeader, comm), &self.comm);
        for stack in [&self.kernel, &self.user] {
            for address in stack.iter().flatten() {
                bytes.extend_from_slice(&address.to_ne_bytes());
            }
        }
        bytes
    }
}

/// A stack of up to the probe's depth; zero addresses (unused slots) among them.
fn stack() -> impl Strategy<Value = Result<Vec<u64>, i32>> {
    let address = prop_oneof![4 => any::<u64>(), 1 => Just(0u64)];
    prop_oneof![
        9 => vec(address, 0..=MAX_STACK_DEPTH).prop_map(Ok),
        1 => (i32::MIN..0).prop_map(Err),
    ]
}

fn written_record() -> impl Strategy<Value = WrittenRecord> {
    (
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()),
        any::<u32>(),
        any::<[u8; COMM_LEN]>(),
        stack(),
        stack(),
    )
        .prop_map(
            |((timestamp_ns, pid, tid, cpu), unwind_outcome, comm, kernel, user)| WrittenRecord {
                timestamp_ns,
                pid,
                tid,
                cpu,
                unwind_outcome,
                comm,
                kernel,
                user,
            },
        )
}

/// The addresses a stack stands for: its non-zero entries, none for an error.
fn addresses(stack: &Result<Vec<u64>, i32>) -> Vec<u64> {
    stack
        .iter()
        .flatten()
        .copied()
        .filter(|&a| a != 0)
        .collect()
}

proptest! {
    // A fixed seed: the same cases on every run.
    #![proptest_config(ProptestConfig {
        cases: 2000,
        rng_seed: RngSeed::Fixed(14),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_parse_without_a_panic(bytes in vec(any::<u8>(), 0..2 * size_of::<SampleHeader>() + 256)) {
        match parse_record(&bytes) {
            None => prop_assert!(bytes.len() < size_of::<SampleHeader>()),
            Some((header, stacks)) => {
                prop_assert_eq!(stacks.len(), bytes.len() - size_of::<SampleHeader>());
                let sample = raw_sample(&header, stacks, &SAME_CLOCK);
                prop_assert!((sample.kernel.len() + sample.user.len()) * 8 <= stacks.len());
                prop_assert!(sample.comm.len() <= COMM_LEN * 3, "{:?}", sample.comm);
            }
        }
    }

    #[test]
    fn a_well_formed_record_gives_back_what_the_probe_wrote(
        written in written_record(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = written.to_bytes();
        let (header, stacks) = parse_record(&bytes).expect("a whole header");
        let sample = raw_sample(&header, stacks, &SAME_CLOCK);
        prop_assert_eq!(sample.timestamp_ns, written.timestamp_ns);
        prop_assert_eq!((sample.pid, sample.tid, sample.cpu), (written.pid, written.tid, written.cpu));
        prop_assert_eq!(header.unwind_outcome, written.unwind_outcome);
        let comm_len = written.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        let comm = String::from_utf8_lossy(&written.comm[..comm_len]);
        // Control characters are replaced one for one (`process::command_name`).
        prop_assert_eq!(sample.comm.chars().count(), comm.chars().count());
        prop_assert!(sample.comm.chars().zip(comm.chars()).all(|(got, wrote)| got == wrote || (wrote.is_control() && got == crate::process::REPLACEMENT)));
        prop_assert_eq!(&sample.kernel, &addresses(&written.kernel));
        prop_assert_eq!(&sample.user, &addresses(&written.user));

        // The same record cut short anywhere: a prefix of each stack, never a panic.
        let short = &bytes[..cut.index(bytes.len() + 1)];
        if let Some((header, stacks)) = parse_record(short) {
            let sample = raw_sample(&header, stacks, &SAME_CLOCK);
            prop_assert!(addresses(&written.kernel).starts_with(&sample.kernel));
            prop_assert!(addresses(&written.user).starts_with(&sample.user));
        }
    }
}
