//! Facts about this host that every batch carries.

use std::fs;

use plugin_api::{BatchBuilder, HostInfo};

/// The host's name from configuration or the environment, when either gives one.
///
/// ```
/// use router::producer::ebpf::host::host_name;
/// let env = |name: &str| (name == "NODE_NAME").then(|| "node-7".to_owned());
/// assert_eq!(host_name(None, &env).as_deref(), Some("node-7"));
/// assert_eq!(host_name(Some("db-1"), &env).as_deref(), Some("db-1"));
/// assert_eq!(host_name(None, &|_| None), None);
/// ```
pub fn host_name(configured: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    configured
        .map(str::to_owned)
        .or_else(|| env("DD_HOSTNAME"))
        .or_else(|| env("NODE_NAME"))
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// Host facts, read once at startup.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// Host name.
    pub hostname: String,
    /// Kernel release.
    pub kernel_release: String,
    /// PRETTY_NAME of /etc/os-release.
    pub os_release: String,
    /// CPU architecture.
    pub arch: String,
    /// Online CPUs.
    pub cpu_count: u32,
    /// Address of the kernel's `_text` symbol (the start of the kernel mapping).
    pub kernel_text_start: u64,
    /// GNU build id of the running kernel, from /sys/kernel/notes.
    pub kernel_build_id: Option<String>,
}

impl HostFacts {
    /// Reads the facts of this host; its name is `configured`, else `DD_HOSTNAME`, else
    /// `NODE_NAME` (in a pod the kernel's host name is the pod's), else the kernel's.
    pub fn read(cpu_count: usize, configured: Option<&str>) -> Self {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        HostFacts {
            hostname: host_name(configured, &|name| std::env::var(name).ok())
                .unwrap_or_else(|| read("/proc/sys/kernel/hostname")),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            os_release: os_release(&read("/etc/os-release")),
            arch: std::env::consts::ARCH.to_owned(),
            cpu_count: cpu_count as u32,
            kernel_text_start: kernel_text_start(
                &fs::read_to_string("/proc/kallsyms").unwrap_or_default(),
            ),
            kernel_build_id: fs::read("/sys/kernel/notes")
                .ok()
                .and_then(|n| gnu_build_id_note(&n)),
        }
    }

    /// These facts, interned into `b`.
    pub fn intern(&self, b: &mut BatchBuilder) -> HostInfo {
        HostInfo {
            hostname: b.intern(&self.hostname),
            kernel_release: b.intern(&self.kernel_release),
            os_release: b.intern(&self.os_release),
            arch: b.intern(&self.arch),
            cpu_count: self.cpu_count,
        }
    }
}

fn os_release(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into())
}

fn kernel_text_start(kallsyms: &str) -> u64 {
    kallsyms
        .lines()
        .find_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let address = f.next()?;
            let _kind = f.next()?;
            (f.next()? == "_text").then(|| u64::from_str_radix(address, 16).ok())?
        })
        .unwrap_or(0)
}

/// The NT_GNU_BUILD_ID note among ELF notes, as lowercase hex.
///
/// ```
/// use router::producer::ebpf::host::gnu_build_id_note;
/// let mut note = Vec::new();
/// note.extend_from_slice(&4u32.to_ne_bytes()); // name size
/// note.extend_from_slice(&3u32.to_ne_bytes()); // descriptor size
/// note.extend_from_slice(&3u32.to_ne_bytes()); // NT_GNU_BUILD_ID
/// note.extend_from_slice(b"GNU\0");
/// note.extend_from_slice(&[0xab, 0xcd, 0xef, 0]);
/// assert_eq!(gnu_build_id_note(&note).as_deref(), Some("abcdef"));
/// ```
pub fn gnu_build_id_note(notes: &[u8]) -> Option<String> {
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_ne_bytes(notes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let align = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while at + 12 <= notes.len() {
        let (name_size, desc_size, kind) = (word(at)?, word(at + 4)?, word(at + 8)?);
        let name_at = at + 12;
        let desc_at = name_at + align(name_size);
        if kind == 3 && notes.get(name_at..name_at + name_size)? == b"GNU\0" {
            let desc = notes.get(desc_at..desc_at + desc_size)?;
            return Some(desc.iter().map(|b| format!("{b:02x}")).collect());
        }
        at = desc_at + align(desc_size);
    }
    None
}
