//! Folded stacks (the format of stackcollapse and inferno: `root;...;leaf count` per line) and
//! the flame graph SVG rendered from them with inferno.

use std::collections::{HashMap, HashSet};

use inferno::flamegraph::{
    color::{Color, MultiPalette, PaletteMap},
    Palette,
};
use plugin_api::{Frame, FrameKind, ProfileBatch};

/// Folded stack counts, accumulated over batches. A stack is kept as the indices of its
/// frames' names, each name once: a host with thousands of short-lived processes has tens of
/// thousands of distinct stacks a minute, which as text took more memory than the profile.
#[derive(Default)]
pub struct FoldedStacks {
    /// Every distinct name (the process names at the roots and the frames').
    names: Vec<String>,
    name_index: HashMap<String, u32>,
    /// Count per stack, root first, as indices into `names`.
    counts: HashMap<Box<[u32]>, u64>,
    /// The names of interpreted frames (coloured apart in the SVG).
    interpreted: HashSet<u32>,
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
        let (mut name, mut stack) = (String::new(), Vec::new());
        for ((pid, stack_index), count) in per_stack {
            stack.clear();
            name.clear();
            match batch.process(pid).map(|p| batch.str(p.comm)) {
                Some(comm) if !comm.is_empty() => name.push_str(comm),
                _ => name.push_str(&format!("pid {pid}")),
            }
            keep_one_name(&mut name, 0);
            stack.push(self.name_id(&name));
            for frame in batch.stack(stack_index).rev() {
                name.clear();
                push_frame_name(&mut name, batch, frame);
                let id = self.name_id(&name);
                if frame.kind == FrameKind::Interpreted {
                    self.interpreted.insert(id);
                }
                stack.push(id);
            }
            match self.counts.get_mut(stack.as_slice()) {
                Some(total) => *total += count,
                None => {
                    self.counts.insert(stack.as_slice().into(), count);
                }
            }
        }
    }

    /// The index of `name` in `names`, added if new.
    fn name_id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.name_index.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.name_index.insert(name.to_owned(), id);
        id
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Total of all counts.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Size of [`Self::to_text`] in bytes.
    pub fn text_len(&self) -> u64 {
        self.counts
            .iter()
            .map(|(stack, count)| line_len(&self.names, stack, *count) as u64)
            .sum()
    }

    /// The folded lines, sorted by their frames' names from the root, written straight into
    /// one string of the exact size.
    pub fn to_text(&self) -> String {
        let mut stacks: Vec<(&[u32], u64)> = self
            .counts
            .iter()
            .map(|(stack, &count)| (&stack[..], count))
            .collect();
        stacks.sort_unstable_by(|(a, _), (b, _)| {
            let name = |&id: &u32| &self.names[id as usize];
            a.iter().map(name).cmp(b.iter().map(name))
        });
        let size = stacks
            .iter()
            .map(|(stack, count)| line_len(&self.names, stack, *count))
            .sum();
        let mut text = String::with_capacity(size);
        for (stack, count) in stacks {
            for (depth, &id) in stack.iter().enumerate() {
                if depth > 0 {
                    text.push(';');
                }
                text.push_str(&self.names[id as usize]);
            }
            text.push(' ');
            text.push_str(&count.to_string());
            text.push('\n');
        }
        text
    }

    /// The folded text, keeping only what the flame graph needs besides it: the stacks and
    /// their names are freed before inferno renders it.
    pub fn into_text(self) -> FoldedText {
        FoldedText {
            text: self.to_text(),
            interpreted: self
                .interpreted
                .iter()
                .map(|&id| self.names[id as usize].clone())
                .collect(),
        }
    }
}

/// Bytes of the folded line of `stack` with `count`: its names, separators, count, newline.
fn line_len(names: &[String], stack: &[u32], count: u64) -> usize {
    stack
        .iter()
        .map(|&id| names[id as usize].len() + 1)
        .sum::<usize>()
        + count.to_string().len()
        + 1
}

/// The folded lines of a profile, and the names of its interpreted frames.
pub struct FoldedText {
    text: String,
    interpreted: Vec<String>,
}

impl FoldedText {
    /// The folded lines.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Renders an interactive flame graph SVG of these stacks into `out`. Fails only when
    /// `out` does, or when every count is zero (nothing to draw).
    pub fn write_svg(&self, title: &str, out: impl std::io::Write) -> std::io::Result<()> {
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
        inferno::flamegraph::from_lines(&mut options, self.text.lines(), out)
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
    keep_one_name(line, start);
    match frame.kind {
        FrameKind::Kernel => line.push_str("_[k]"),
        FrameKind::Jit => line.push_str("_[j]"),
        _ => {}
    }
}

/// Keeps `line[start..]` one name of a folded stack whatever a process put in it (a comm, a
/// perf map's or a code object's name): `;` separates frames, so it becomes `:`; a line
/// break ends the stack, so control characters become `_`.
fn keep_one_name(line: &mut String, start: usize) {
    let breaks_syntax = |c: char| c == ';' || c.is_control();
    if !line[start..].contains(breaks_syntax) {
        return;
    }
    let fixed: String = line[start..]
        .chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    line.truncate(start);
    line.push_str(&fixed);
}

#[cfg(test)]
mod tests {
    use plugin_api::{BatchBuilder, FrameKind, Process, Sample};

    use super::*;

    /// A batch of one process named `comm`, sampled `count` times in `leaf` (of `kind`)
    /// called from `main`.
    fn one_stack(comm: &str, leaf: &str, kind: FrameKind, count: i64) -> ProfileBatch {
        let mut b = BatchBuilder::new();
        let leaf = b.frame_symbolized(0xffffffff81000010, None, leaf, kind);
        let root = b.frame_symbolized(0x401000, None, "main", FrameKind::Native);
        let stack = b.stack(&[leaf, root]);
        let comm = b.intern(comm);
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
            values: vec![count, count * 10].into(),
            thread_name: comm,
            ..Default::default()
        });
        b.finish()
    }

    #[test]
    fn process_at_the_root_kernel_frames_marked() {
        let mut folded = FoldedStacks::default();
        folded.add_batch(&one_stack("app", "do_syscall_64", FrameKind::Kernel, 3));
        assert_eq!(folded.to_text(), "app;main;do_syscall_64_[k] 3\n");
        assert_eq!(folded.total(), 3);
    }

    #[test]
    fn a_name_with_separators_or_line_breaks_stays_one_frame_of_one_line() {
        let mut folded = FoldedStacks::default();
        let batch = one_stack("a;b\nc\r", "jit;fake\nroot;x 99", FrameKind::Native, 2);
        folded.add_batch(&batch);
        assert_eq!(folded.to_text(), "a:b_c_;main;jit:fake_root:x 99 2\n");
    }

    /// A batch of `processes` short-lived processes (each its own name), every one sampled in
    /// the same 30 deep kernel and user frames with long names, its own leaf last.
    fn fork_storm(processes: u32) -> ProfileBatch {
        let mut b = BatchBuilder::new();
        b.cpu_sample_types();
        let shared: Vec<u32> = (0..30u64)
            .map(|i| {
                let name = format!("a_long_shared_function_name_of_a_deep_exec_path_{i}");
                b.frame_symbolized(0x1000 + i, None, &name, FrameKind::Native)
            })
            .collect();
        for pid in 1..=processes {
            let leaf =
                b.frame_symbolized(0x10_0000 + u64::from(pid), None, "leaf", FrameKind::Native);
            let frames: Vec<u32> = std::iter::once(leaf)
                .chain(shared.iter().copied())
                .collect();
            let stack = b.stack(&frames);
            let comm = b.intern(&format!("job-{}", pid % 7));
            b.process(Process {
                pid,
                comm,
                ..Default::default()
            });
            b.sample(Sample {
                pid,
                tid: pid,
                stack,
                values: vec![1, 10].into(),
                thread_name: comm,
                ..Default::default()
            });
        }
        b.finish()
    }

    #[test]
    fn many_distinct_stacks_keep_each_name_once() {
        let mut folded = FoldedStacks::default();
        folded.add_batch(&fork_storm(2_000));
        folded.add_batch(&fork_storm(2_000));
        // 7 process names, 30 shared frames and one leaf: not 2 000 copies of every line.
        assert_eq!(folded.names.len(), 7 + 30 + 1);
        assert_eq!(folded.counts.len(), 7, "one stack per process name");
        assert_eq!(folded.total(), 4_000);
    }

    #[test]
    fn the_text_is_sorted_and_written_once_at_its_exact_size() {
        let mut folded = FoldedStacks::default();
        folded.add_batch(&fork_storm(100));
        let text = folded.to_text();
        assert_eq!(text.capacity(), text.len());
        assert_eq!(folded.text_len(), text.len() as u64);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7);
        assert!(lines.is_sorted(), "{lines:?}");
        assert!(lines[0].starts_with("job-0;a_long_shared_function_name_of_a_deep_exec_path_29;"));
        assert!(lines[0].ends_with(";leaf 14"), "{}", lines[0]);
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
        let mut svg = Vec::new();
        folded.into_text().write_svg("t", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("rgb(80,140,230)"), "the Python frame in blue");
    }
}
