//! Types shared by the eBPF program and its loader.
#![no_std]
