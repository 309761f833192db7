//! Folded stacks (the format of stackcollapse and inferno: `root;...;leaf count` per line) and
//! the flame graph SVG rendered from them with inferno.

use std::collections::{HashMap, HashSet};

use inferno::flamegraph::{
    color::{Color, MultiPalette, PaletteMap},
    Palette,
};
use plugin_api::{Frame, FrameKind, ProfileBatch};

/// Folded stack counts, accumulated over batches.
#[derive(Default)]
pub struct FoldedStacks {
    counts: HashMap<String, u64>,
    /// The names of interpreted frames (coloured apart in the SVG).
    interpreted: HashSet<String>,
}

/// The colour of interpreted frames (Python) in the SVG: blue, apart from the palette's
/// red/yellow native code, orange kernel and green JIT code.
const INTERPRETED: Color = Color {
    r: 80,
    g: 140,
    b: 230,
};

impl FoldedStacks {
    /// Adds every sample of `batch`: the process name at the root, kernel frames with the
    /// `_[k]` suffix and JIT-compiled ones with `_[j]`, which flame graph palettes colour
    /// apart, and interpreted ones as `function (file)`.
    pub fn add_batch(&mut self, batch: &ProfileBatch) {
        let mut per_stack: HashMap<(u32, u32), u64> = HashMap::new();
        for (s, count) in batch.samples.iter().zip(batch.sample_counts()) {
            *per_stack.entry((s.pid, s.stack)).or_default() += count;
        }
        let mut line = String::new();
        for ((pid, stack), count) in per_stack {
            line.clear();
            match batch.process(pid).map(|p| batch.str(p.comm)) {
                Some(comm) if !comm.is_empty() => line.push_str(comm),
                _ => line.push_str(&format!("pid {pid}")),
            }
            for frame in batch.stack(stack).rev() {
                line.push(';');
                let start = line.len();
                push_frame_name(&mut line, batch, frame);
                if frame.kind == FrameKind::Interpreted {
                    self.interpreted.insert(line[start..].to_owned());
                }
            }
            *self.counts.entry(line.clone()).or_default() += count;
        }
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Total of all counts.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The folded lines, sorted.
    pub fn to_text(&self) -> String {
        let mut lines: Vec<String> = self
            .counts
            .iter()
            .map(|(s, c)| format!("{s} {c}"))
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// An interactive flame graph SVG of these stacks.
    pub fn to_svg(&self, title: &str) -> std::io::Result<Vec<u8>> {
        let text = self.to_text();
        let mut options = inferno::flamegraph::Options::default();
        options.title = title.to_owned();
        options.count_name = "samples".to_owned();
        // Java's palette knows `_[k]` (orange) and `_[j]` (green); interpreted frames get
        // their own colour through the palette map, which inferno consults first.
        options.colors = Palette::Multi(MultiPalette::Java);
        let mut palette = PaletteMap::default();
        for name in &self.interpreted {
            palette.insert(name, INTERPRETED);
        }
        options.palette_map = Some(&mut palette);
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(&mut options, text.lines(), &mut svg)?;
        Ok(svg)
    }
}

/// A frame's name: the function (an interpreted one with its file's name), or
/// `file+0xoffset` / the hex address when unsymbolized. Semicolons (the separator) are replaced.
fn push_frame_name(line: &mut String, batch: &ProfileBatch, frame: &Frame) {
    let start = line.len();
    if frame.is_symbolized() {
        line.push_str(batch.str(frame.function));
        let file = batch.str(frame.file);
        if frame.kind == FrameKind::Interpreted && !file.is_empty() {
            let file = file.rsplit('/').next().unwrap_or(file);
            line.push_str(&format!(" ({file})"));
        }
    } else if let Some(m) = frame
        .mapping
        .as_ref()
        .into_option()
        .map(|&m| &batch.mappings[m as usize])
    {
        let path = batch.str(m.path);
        let file = path.rsplit('/').next().unwrap_or(path);
        let offset = frame
            .address
            .wrapping_sub(m.start)
            .wrapping_add(m.file_offset);
        line.push_str(&format!("{file}+{offset:#x}"));
    } else {
        line.push_str(&format!("{:#x}", frame.address));
    }
    if line[start..].contains(';') {
        let fixed = line[start..].replace(';', ":");
        line.truncate(start);
        line.push_str(&fixed);
    }
    match frame.kind {
        FrameKind::Kernel => line.push_str("_[k]"),
        FrameKind::Jit => line.push_str("_[j]"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use plugin_api::{BatchBuilder, FrameKind, Process, Sample};

    use super::*;

    #[test]
    fn process_at_the_root_kernel_frames_marked() {
        let mut b = BatchBuilder::new();
        let leaf = b.frame_symbolized(0xffffffff81000010, None, "do_syscall_64", FrameKind::Kernel);
        let root = b.frame_symbolized(0x401000, None, "main", FrameKind::Native);
        let stack = b.stack(&[leaf, root]);
        let comm = b.intern("app");
        b.cpu_sample_types();
        b.process(Process {
            pid: 7,
            comm,
            ..Default::default()
        });
        b.sample(Sample {
            pid: 7,
            tid: 7,
            stack,
            values: vec![3, 30].into(),
            thread_name: comm,
            ..Default::default()
        });
        let mut folded = FoldedStacks::default();
        folded.add_batch(&b.finish());
        assert_eq!(folded.to_text(), "app;main;do_syscall_64_[k] 3\n");
        assert_eq!(folded.total(), 3);
    }

    #[test]
    fn python_frames_are_named_with_their_file_and_coloured_apart_jit_frames_marked() {
        let mut b = BatchBuilder::new();
        b.cpu_sample_types();
        let (file, runtime) = (b.intern("/srv/app/chain.py"), b.intern("cpython"));
        let leaf = b.intern("leaf");
        let python = b.frame(plugin_api::Frame {
            address: 0x7f00_0000_1000,
            function: leaf,
            file,
            line: 10,
            kind: FrameKind::Interpreted,
            runtime,
            ..Default::default()
        });
        let jit = b.frame_symbolized(0x3000, None, "JS:*hotLoop", FrameKind::Jit);
        let main = b.frame_symbolized(0x401000, None, "main", FrameKind::Native);
        let stack = b.stack(&[jit, python, main]);
        let comm = b.intern("app");
        b.process(Process {
            pid: 7,
            comm,
            ..Default::default()
        });
        b.sample(Sample {
            pid: 7,
            tid: 7,
            stack,
            values: vec![1, 10].into(),
            thread_name: comm,
            ..Default::default()
        });
        let mut folded = FoldedStacks::default();
        folded.add_batch(&b.finish());
        assert_eq!(
            folded.to_text(),
            "app;main;leaf (chain.py);JS:*hotLoop_[j] 1\n"
        );
        let svg = String::from_utf8(folded.to_svg("t").unwrap()).unwrap();
        assert!(svg.contains("rgb(80,140,230)"), "the Python frame in blue");
    }
}
