//! The perf.data consumer plugin.
