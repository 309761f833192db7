//! Reading what other processes control. The router runs as root and reads the files every
//! process maps, their perf maps and their debug files; any of them may be hostile: a symlink
//! out of the process's root, a FIFO or a device where a file should be, a file truncated
//! while it is read, a sparse file of many gigabytes. Every such read goes through here:
//!
//! - [`open`]: paths resolved inside the process's root (`openat2` with `RESOLVE_IN_ROOT`), no
//!   symlink but those followed on purpose, no magic links, nothing but a regular file opened
//!   for reading, and never a blocking open;
//! - [`mounts`]: nothing on a FUSE file system is touched, whose daemon could leave the reader
//!   waiting for good;
//! - [`read`]: bytes read with `pread` within a byte budget, never mapped, so a file truncated
//!   under the reader gives an error, not a `SIGBUS`; ELF files are parsed through
//!   [`object::ReadCache`] over such a reader, which reads only the headers and sections asked for;
//! - [`sealed`]: where a library insists on mapping a file (blazesym), a file that a user other
//!   than root could change is first copied into a sealed memfd, which nobody can shrink.

pub mod mounts;
pub mod open;
pub mod read;
pub mod sealed;
