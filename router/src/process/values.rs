//! Text the router takes from a process is data, never syntax: any process chooses its own
//! environment and command name, and an output format must not let it write another
//! process's tags (`DD_SERVICE=$'svc\ninjected,env:prod'`) or a folded stack's lines.
//!
//! Two rules, each in one function: [`tag_value`] for the values that become tags and
//! resource attributes (the service, env and version from a process's environment, or its
//! executable's name), [`command_name`] for comm names. Each value a rule changes is counted
//! by field ([`sanitized_counts`], the `router_process_values_sanitized_total` metric).

use std::{
    io::{BufRead, BufReader, Read},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use probe_common::COMM_LEN;

/// The most characters of a tag value: Datadog's limit for a whole tag is 200.
pub const MAX_TAG_VALUE_CHARS: usize = 200;

/// What stands in for a character a rule does not let through.
pub const REPLACEMENT: char = '_';

/// The most bytes of /proc/PID/environ read: real environments are a few KiB; a service
/// variable placed past this limit is not seen.
pub const MAX_ENVIRON_BYTES: u64 = 256 * 1024;

/// The most bytes of one environment entry kept (`KEY=value`): enough for a tag value of
/// [`MAX_TAG_VALUE_CHARS`] characters of any width, or a long `OTEL_RESOURCE_ATTRIBUTES`.
pub const MAX_ENVIRON_ENTRY_BYTES: usize = 4096;

/// Which value of a process a rule changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessValue {
    /// Its service name (`DD_SERVICE`, `OTEL_SERVICE_NAME`, or its executable's name).
    Service,
    /// Its `DD_ENV`.
    Env,
    /// Its `DD_VERSION`.
    Version,
    /// A command name (/proc/PID/comm, or a sampled thread's).
    Comm,
}

impl ProcessValue {
    /// Every field, in the order of [`sanitized_counts`].
    pub const ALL: [ProcessValue; 4] = [
        ProcessValue::Service,
        ProcessValue::Env,
        ProcessValue::Version,
        ProcessValue::Comm,
    ];

    /// The field's name, as the metric's `field` label.
    pub fn name(self) -> &'static str {
        match self {
            ProcessValue::Service => "service",
            ProcessValue::Env => "env",
            ProcessValue::Version => "version",
            ProcessValue::Comm => "comm",
        }
    }
}

/// Values changed by a rule since the start, by [`ProcessValue`] (as its discriminant).
static SANITIZED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// How many values each rule changed since the router started, by field.
pub fn sanitized_counts() -> [(ProcessValue, u64); 4] {
    ProcessValue::ALL.map(|field| (field, SANITIZED[field as usize].load(Relaxed)))
}

/// `value` as it is let through, counted for `field` when it differs from `raw`.
fn counted(field: ProcessValue, raw: &str, value: String) -> String {
    if value != raw {
        SANITIZED[field as usize].fetch_add(1, Relaxed);
    }
    value
}

/// A value that becomes a tag or a resource attribute: at most [`MAX_TAG_VALUE_CHARS`]
/// characters (cut on a character boundary), with control characters and commas (the
/// separator of Datadog's tag lists) replaced by [`REPLACEMENT`]. A colon stays: in a value
/// it is data (`service:a:b` is the tag `service` with the value `a:b`).
///
/// ```
/// use router::process::{tag_value, ProcessValue};
/// assert_eq!(tag_value(ProcessValue::Service, "web"), "web");
/// assert_eq!(
///     tag_value(ProcessValue::Service, "svc\ninjected,env:prod,version:666"),
///     "svc_injected_env:prod_version:666"
/// );
/// assert_eq!(tag_value(ProcessValue::Env, &"é".repeat(300)), "é".repeat(200));
/// ```
pub fn tag_value(field: ProcessValue, raw: &str) -> String {
    let value = raw
        .chars()
        .take(MAX_TAG_VALUE_CHARS)
        .map(|c| {
            if c.is_control() || c == ',' {
                REPLACEMENT
            } else {
                c
            }
        })
        .collect();
    counted(field, raw, value)
}

/// A command name (a comm: the kernel's `TASK_COMM_LEN`, 16 bytes with its NUL) from its
/// bytes: up to the first NUL and at most 16 bytes, invalid UTF-8 shown as U+FFFD, control
/// characters (a newline in a folded stack is a new line) replaced by [`REPLACEMENT`].
///
/// ```
/// use router::process::command_name;
/// assert_eq!(command_name(b"nginx\0\0\0"), "nginx");
/// assert_eq!(command_name(b"a\nb;c\x7f"), "a_b;c_");
/// assert_eq!(command_name(b"0123456789abcdefXYZ"), "0123456789abcdef");
/// ```
pub fn command_name(raw: &[u8]) -> String {
    let raw = &raw[..raw.len().min(COMM_LEN)];
    let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
    let text = String::from_utf8_lossy(raw);
    let value = text
        .chars()
        .map(|c| if c.is_control() { REPLACEMENT } else { c })
        .collect();
    counted(ProcessValue::Comm, &text, value)
}

/// Calls `each` with every NUL-separated entry of an environment (/proc/PID/environ) read
/// from `reader`, reading at most [`MAX_ENVIRON_BYTES`] and keeping at most
/// [`MAX_ENVIRON_ENTRY_BYTES`] of an entry, so that a process's multi-MB variable is never
/// held whole. A read error ends the entries.
///
/// ```
/// use router::process::for_each_environ_entry;
/// let mut entries = Vec::new();
/// for_each_environ_entry(&b"A=1\0B=2\0"[..], |e| entries.push(e.to_vec()));
/// assert_eq!(entries, [b"A=1".to_vec(), b"B=2".to_vec()]);
/// ```
pub fn for_each_environ_entry(reader: impl Read, mut each: impl FnMut(&[u8])) {
    let mut reader = BufReader::with_capacity(16 * 1024, reader.take(MAX_ENVIRON_BYTES));
    let mut entry = Vec::with_capacity(256);
    loop {
        let Ok(buffer) = reader.fill_buf() else {
            return;
        };
        if buffer.is_empty() {
            break;
        }
        let (part, used, ended) = match buffer.iter().position(|&b| b == 0) {
            Some(nul) => (&buffer[..nul], nul + 1, true),
            None => (buffer, buffer.len(), false),
        };
        let room = MAX_ENVIRON_ENTRY_BYTES.saturating_sub(entry.len());
        entry.extend_from_slice(&part[..part.len().min(room)]);
        reader.consume(used);
        if ended {
            each(&entry);
            entry.clear();
        }
    }
    if !entry.is_empty() {
        each(&entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(field: ProcessValue) -> u64 {
        sanitized_counts()[field as usize].1
    }

    #[test]
    fn a_hostile_service_becomes_one_value_and_is_counted() {
        let before = count(ProcessValue::Version);
        let value = tag_value(ProcessValue::Version, "1.0\r\n,env:prod\t\u{85}x");
        assert_eq!(value, "1.0___env:prod__x");
        assert!(!value.contains(','));
        assert_eq!(count(ProcessValue::Version), before + 1);
        // An ordinary value is not a change.
        assert_eq!(tag_value(ProcessValue::Version, "1.2.3-rc:4"), "1.2.3-rc:4");
        assert_eq!(count(ProcessValue::Version), before + 1);
    }

    #[test]
    fn a_long_value_is_cut_at_200_characters_on_a_character_boundary() {
        let raw = format!("{}{}", "a".repeat(199), "€".repeat(10));
        let value = tag_value(ProcessValue::Service, &raw);
        assert_eq!(value.chars().count(), MAX_TAG_VALUE_CHARS);
        assert!(value.ends_with('€'));
        let huge = "s".repeat(5 << 20);
        assert_eq!(tag_value(ProcessValue::Service, &huge).len(), 200);
    }

    #[test]
    fn a_command_name_keeps_its_text_and_loses_its_control_characters() {
        let before = count(ProcessValue::Comm);
        assert_eq!(command_name(b"kworker/0:1"), "kworker/0:1");
        assert_eq!(command_name(b"py;thon"), "py;thon");
        assert_eq!(count(ProcessValue::Comm), before);
        assert_eq!(command_name(b"a\x1b[31mb"), "a_[31mb");
        assert_eq!(command_name(b"\xffab"), "\u{fffd}ab");
        assert_eq!(count(ProcessValue::Comm), before + 1);
    }

    #[test]
    fn an_environment_is_read_within_its_limits() {
        // A 5 MB variable between two small ones: the first is seen whole, the big one only
        // as its first 4 KiB, and nothing past the read limit.
        let mut environ = b"DD_ENV=prod\0DD_SERVICE=".to_vec();
        environ.extend(std::iter::repeat_n(b'x', 5 << 20));
        environ.extend(b"\0DD_VERSION=1\0");
        let mut entries = Vec::new();
        for_each_environ_entry(&environ[..], |e| entries.push(e.to_vec()));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], b"DD_ENV=prod");
        assert_eq!(entries[1].len(), MAX_ENVIRON_ENTRY_BYTES);
        assert!(entries[1].starts_with(b"DD_SERVICE=xxx"));

        // A last entry without its NUL still counts.
        let mut entries = Vec::new();
        for_each_environ_entry(&b"A=1\0B=2"[..], |e| entries.push(e.to_vec()));
        assert_eq!(entries, [b"A=1".to_vec(), b"B=2".to_vec()]);
    }
}
