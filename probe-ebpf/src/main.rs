//! The CPU sampling probe: a perf_event program run on every CPU at the sampling frequency.
//! Each run records pid, tid, cpu, comm, a timestamp, the kernel stack and the user stack
//! into a ring buffer, as long a record as its stacks need, and counts in the kernel what it
//! could not record.
//!
//! - `maps`: the maps and the loader's settings;
//! - `sampling`: the entry program, the kernel stack, the frame-pointer user stack and the
//!   hand-over to user space;
//! - `unwinding`: the user stack unwound with the CFI rows the router loads (`.eh_frame`),
//!   a batch of frames per program run, continued by tail calls;
//! - `python`: CPython's frames, walked where the unwinder meets the interpreter loop and
//!   written in its place.
#![no_std]
#![no_main]

mod maps;
mod python;
mod sampling;
mod unwinding;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
