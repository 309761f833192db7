//! The process registry: what the router reads about a process from /proc, captured when its
//! first sample arrives so that it outlives short processes (command name, executable,
//! cgroup, container id, and the executable mappings that user frames resolve against).
//! The filters, the symbolizer and the unwind-table manager all read it.

mod registry;
mod service;
mod values;

pub use registry::{Registry, Update};
pub use service::{Service, ServiceResolver};
pub use values::{
    command_name, for_each_environ_entry, sanitized_counts, tag_value, ProcessValue,
    MAX_ENVIRON_BYTES, MAX_ENVIRON_ENTRY_BYTES, MAX_TAG_VALUE_CHARS, REPLACEMENT,
};

use std::{
    fs::{self, File},
    io::Read,
    path::PathBuf,
};

/// An executable mapping of a process (a line of /proc/PID/maps with `x` permission): a
/// file, the vDSO, or anonymous memory (JIT-compiled code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Device number of the file (`major:minor` packed as `major << 32 | minor`).
    pub dev: u64,
    /// Inode of the file.
    pub inode: u64,
    /// Path of the file as the process sees it; `[vdso]`, or empty for anonymous memory.
    pub path: String,
}

impl MapEntry {
    /// Whether a file backs this mapping (not the vDSO or anonymous memory).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// The file offset of `address`, which must lie inside this mapping.
    pub fn file_offset(&self, address: u64) -> u64 {
        address - self.start + self.offset
    }
}

/// Facts about one process.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    /// Command name of the main thread.
    pub comm: String,
    /// Path of the executable, when readable.
    pub exe: Option<String>,
    /// Container id from the process's cgroup, when it runs in one.
    pub container_id: Option<String>,
    /// The process's cgroup v2 path (the `0::` line of /proc/PID/cgroup).
    pub cgroup: Option<String>,
    /// Executable mappings, sorted by address.
    pub maps: Vec<MapEntry>,
    /// The service variables of its environment (only those are kept).
    pub environment: ServiceEnvironment,
}

/// The variables of a process's environment that name its service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEnvironment {
    /// `DD_SERVICE`.
    pub dd_service: Option<String>,
    /// `OTEL_SERVICE_NAME`, else `service.name` of `OTEL_RESOURCE_ATTRIBUTES`.
    pub otel_service_name: Option<String>,
    /// `DD_ENV`.
    pub dd_env: Option<String>,
    /// `DD_VERSION`.
    pub dd_version: Option<String>,
}

impl ServiceEnvironment {
    /// The service variables of an environment (/proc/PID/environ: NUL-separated
    /// `KEY=value`), read within [`MAX_ENVIRON_BYTES`], each value made a tag value
    /// ([`tag_value`]).
    ///
    /// ```
    /// use router::process::ServiceEnvironment;
    /// let env = ServiceEnvironment::read(&b"PATH=/bin\0DD_SERVICE=web\0OTEL_RESOURCE_ATTRIBUTES=a=b,service.name=api\0DD_ENV=prod\0"[..]);
    /// assert_eq!(env.dd_service.as_deref(), Some("web"));
    /// assert_eq!(env.otel_service_name.as_deref(), Some("api"));
    /// assert_eq!(env.dd_env.as_deref(), Some("prod"));
    /// assert_eq!(env.dd_version, None);
    /// let env = ServiceEnvironment::read(&b"DD_SERVICE=svc\ninjected,env:prod\0"[..]);
    /// assert_eq!(env.dd_service.as_deref(), Some("svc_injected_env:prod"));
    /// ```
    pub fn read(environ: impl Read) -> Self {
        let mut env = Self::default();
        let mut resource_service = None;
        for_each_environ_entry(environ, |entry| {
            let entry = String::from_utf8_lossy(entry);
            let Some((key, value)) = entry.split_once('=') else {
                return;
            };
            let value = value.trim();
            if value.is_empty() {
                return;
            }
            let (slot, field) = match key {
                "DD_SERVICE" => (&mut env.dd_service, ProcessValue::Service),
                "OTEL_SERVICE_NAME" => (&mut env.otel_service_name, ProcessValue::Service),
                "DD_ENV" => (&mut env.dd_env, ProcessValue::Env),
                "DD_VERSION" => (&mut env.dd_version, ProcessValue::Version),
                "OTEL_RESOURCE_ATTRIBUTES" => {
                    resource_service = value
                        .split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(k, _)| k.trim() == "service.name")
                        .map(|(_, v)| v.trim().to_owned())
                        .filter(|v| !v.is_empty());
                    return;
                }
                _ => return,
            };
            *slot = Some(tag_value(field, value));
        });
        if env.otel_service_name.is_none() {
            env.otel_service_name = resource_service.map(|v| tag_value(ProcessValue::Service, &v));
        }
        env
    }
}

impl ProcessInfo {
    /// Reads /proc/PID; `None` when the process is gone.
    pub fn read(pid: u32) -> Option<ProcessInfo> {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let maps = fs::read_to_string(dir.join("maps")).ok()?;
        let cgroup = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        Some(ProcessInfo {
            comm: read_comm(pid).unwrap_or_default(),
            exe: fs::read_link(dir.join("exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            container_id: container_id(&cgroup),
            cgroup: cgroup
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_owned),
            maps: parse_maps(&maps),
            environment: File::open(dir.join("environ"))
                .map(ServiceEnvironment::read)
                .unwrap_or_default(),
        })
    }

    /// The mapping that holds `address`.
    pub fn mapping_of(&self, address: u64) -> Option<&MapEntry> {
        let i = self.maps.partition_point(|m| m.start <= address);
        self.maps[..i].last().filter(|m| address < m.end)
    }

    /// Whether a word of a user stack the probe recorded fits this process: an address in
    /// one of its executable mappings, or a Python frame.
    pub fn accounts_for(&self, word: u64) -> bool {
        probe_common::python::decode_frame(word).is_some() || self.mapping_of(word).is_some()
    }
}

/// The command name of process `pid` (/proc/PID/comm, at most 16 bytes read), as
/// [`command_name`] lets it through.
fn read_comm(pid: u32) -> Option<String> {
    let mut bytes = Vec::with_capacity(probe_common::COMM_LEN + 1);
    File::open(format!("/proc/{pid}/comm"))
        .ok()?
        .take(probe_common::COMM_LEN as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    // The kernel ends the name with a newline, which is not part of it.
    let name = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    Some(command_name(name))
}

/// Whether process `pid` exists (its /proc entry does).
pub fn is_running(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The executable user-space mappings of a /proc/PID/maps text, sorted by address.
///
/// ```
/// use router::process::parse_maps;
/// let maps = parse_maps(
///     "55d0a000-55d0b000 r-xp 00001000 fd:01 1234 /usr/bin/app\n\
///      55d0c000-55d0d000 rw-p 00003000 fd:01 1234 /usr/bin/app\n\
///      7f0000000000-7f0000001000 rwxp 00000000 00:00 0 \n\
///      7ffd1000-7ffd2000 r-xp 00000000 00:00 0 [vdso]\n\
///      ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n",
/// );
/// assert_eq!(maps.len(), 3);
/// assert_eq!(maps[0].offset, 0x1000);
/// assert_eq!(maps[0].path, "/usr/bin/app");
/// assert!(maps[0].is_file());
/// assert_eq!(maps[1].path, "[vdso]");
/// assert!(!maps[2].is_file() && maps[2].path.is_empty());
/// ```
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    let mut maps: Vec<MapEntry> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            let offset = fields.next()?;
            let (major, minor) = fields.next()?.split_once(':')?;
            let inode: u64 = fields.next()?.parse().ok()?;
            let path = fields.collect::<Vec<_>>().join(" ");
            let file = inode != 0 && path.starts_with('/');
            if !perms.contains('x') || !(file || path.is_empty() || path == "[vdso]") {
                return None;
            }
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            Some(MapEntry {
                start: hex(start)?,
                end: hex(end)?,
                offset: hex(offset)?,
                dev: hex(major)? << 32 | hex(minor)?,
                inode,
                path: path.trim_end_matches(" (deleted)").to_owned(),
            })
        })
        .collect();
    maps.sort_by_key(|m| m.start);
    maps
}

/// The container id in a /proc/PID/cgroup text: the 64-hex-digit id that Docker, containerd,
/// CRI-O and Podman put in the cgroup path.
///
/// ```
/// use router::process::container_id;
/// let id = "a".repeat(64);
/// let cgroup = format!("0::/system.slice/docker-{id}.scope\n");
/// assert_eq!(container_id(&cgroup), Some(id));
/// assert_eq!(container_id("0::/user.slice/user-0.slice/session-1.scope\n"), None);
/// ```
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split(['/', '-', '.', ':'])
            .find(|part| part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
    })
}
