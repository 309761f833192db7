//! Checks, before anything is loaded, that this process may load eBPF programs and open perf
//! events, and explains which capability or sysctl is missing when it may not.

use std::fs;

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (CapEff of /proc/self/status).
fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn perf_event_paranoid() -> String {
    fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Ok when the eBPF producer can start; otherwise a message naming what is missing.
/// Also warns about capabilities whose absence only costs symbols.
pub fn check() -> Result<(), String> {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !admin && !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !admin && !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    if !missing.is_empty() {
        return Err(format!(
            "the eBPF producer cannot start: this process lacks {} (effective capabilities {caps:#x}). \
             Run it as root, or grant CAP_BPF and CAP_PERFMON (plus CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH to read other processes' /proc and ELF files), e.g. \
             `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+ep router`. \
             kernel.perf_event_paranoid is {}: without CAP_PERFMON, perf events on every CPU need it at -1",
            missing.join(" and "),
            perf_event_paranoid()
        ));
    }
    for (cap, name) in [
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ] {
        if !admin && !has(cap) {
            tracing::warn!(
                "{name} is missing: other users' processes will have unsymbolized frames"
            );
        }
    }
    Ok(())
}
