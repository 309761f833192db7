//! The manager's sink on a running probe: the row and mapping arrays (written through
//! short-lived shared memory mappings) and the per-process maps.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    ptr,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use probe_common::{
    python::PythonProcess,
    unwind::{ExecMapping, ProcessMappings, UnwindRow},
};

use super::TableSink;

/// The probe's `UNWIND_ROWS`, `MAPPINGS`, `PROCESS_MAPPINGS` and `PYTHON_PROCESSES` maps.
pub struct ProbeMaps {
    rows: SharedArray,
    mappings: SharedArray,
    processes: BpfHashMap<MapData, u32, ProcessMappings>,
    python: BpfHashMap<MapData, u32, PythonProcess>,
}

/// A memory-mappable array map, written through short-lived shared mappings.
pub struct SharedArray {
    /// The map's descriptor.
    pub fd: OwnedFd,
    /// Entries it holds.
    pub capacity: u32,
}

impl SharedArray {
    /// Copies `values` into the array from index `start`.
    fn write<T: Copy>(&self, start: u32, values: &[T]) -> io::Result<()> {
        let size = size_of::<T>();
        let bytes = size_of_val(values);
        if u64::from(start) + values.len() as u64 > u64::from(self.capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "values past the array's end",
            ));
        }
        if values.is_empty() {
            return Ok(());
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let first = start as usize * size;
        let map_offset = first / page * page;
        let map_len = first + bytes - map_offset;
        // SAFETY: a shared mapping of the array's pages that hold the values (the array is
        // BPF_F_MMAPABLE and `capacity` entries long), unmapped before returning, so the
        // written pages do not stay in the router's resident memory.
        unsafe {
            let base = libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                map_offset as libc::off_t,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            ptr::copy_nonoverlapping(
                values.as_ptr().cast::<u8>(),
                base.cast::<u8>().add(first - map_offset),
                bytes,
            );
            libc::munmap(base, map_len);
        }
        Ok(())
    }
}

impl ProbeMaps {
    /// The sink for the row array, the mapping array and the process maps.
    pub fn new(
        rows: SharedArray,
        mappings: SharedArray,
        processes: BpfHashMap<MapData, u32, ProcessMappings>,
        python: BpfHashMap<MapData, u32, PythonProcess>,
    ) -> Self {
        Self {
            rows,
            mappings,
            processes,
            python,
        }
    }

    /// Rows the row array holds.
    pub fn capacity(&self) -> u32 {
        self.rows.capacity
    }
}

impl TableSink for ProbeMaps {
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> io::Result<()> {
        self.rows.write(start, rows)
    }

    fn write_mappings(&mut self, start: u32, mappings: &[ExecMapping]) -> io::Result<()> {
        self.mappings.write(start, mappings)
    }

    fn set_process(&mut self, pid: u32, run: ProcessMappings) -> Result<(), String> {
        self.processes
            .insert(pid, run, 0)
            .map_err(|e| e.to_string())
    }

    fn remove_process(&mut self, pid: u32) {
        let _ = self.processes.remove(&pid);
        let _ = self.python.remove(&pid);
    }

    fn set_python(&mut self, pid: u32, python: Option<PythonProcess>) -> Result<(), String> {
        match python {
            Some(python) => self
                .python
                .insert(pid, python, 0)
                .map_err(|e| e.to_string()),
            None => {
                let _ = self.python.remove(&pid);
                Ok(())
            }
        }
    }
}
