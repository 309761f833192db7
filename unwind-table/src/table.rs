//! Assembling translated FDE rows into one sorted table: overlaps resolved (first seen wins),
//! gaps between FDEs closed with [`cfa::NONE`] rows, runs of equal rules collapsed.

use std::collections::BTreeMap;
use std::ops::Range;

use probe_common::unwind::{cfa, UnwindRow};

use crate::rules::Rules;

/// Collects the rows of FDEs, in the order they are seen, and makes the table.
#[derive(Debug, Default)]
pub(crate) struct Builder {
    /// Address ranges already claimed by an FDE: start → end, disjoint.
    claimed: BTreeMap<u32, u32>,
    /// Translated rows, clipped to claimed ranges: disjoint, non-empty.
    spans: Vec<Span>,
}

/// Rules that hold over `start..end`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
    rules: Rules,
}

impl Builder {
    /// Claims the parts of an FDE's range `start..end` that no FDE seen before covers, and
    /// returns them (empty when earlier FDEs cover all of it, or the range is empty).
    pub fn claim(&mut self, start: u32, end: u32) -> Vec<Range<u32>> {
        let mut pieces = Vec::new();
        if start >= end {
            return pieces;
        }
        let mut cursor = start;
        // The last claimed range starting at or before `start` may reach into ours.
        let from = (self.claimed.range(..=start).next_back()).map_or(start, |(&s, _)| s);
        for (&claimed_start, &claimed_end) in self.claimed.range(from..end) {
            if claimed_end <= cursor {
                continue;
            }
            if claimed_start > cursor {
                pieces.push(cursor..claimed_start);
            }
            cursor = claimed_end;
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            pieces.push(cursor..end);
        }
        for piece in &pieces {
            self.claimed.insert(piece.start, piece.end);
        }
        pieces
    }

    /// Adds a row holding over `start..end`, clipped to the `pieces` its FDE claimed.
    /// Returns whether any of it was kept.
    pub fn push(&mut self, start: u64, end: u64, rules: Rules, pieces: &[Range<u32>]) -> bool {
        let mut kept = false;
        for piece in pieces {
            let clipped_start = start.max(u64::from(piece.start));
            let clipped_end = end.min(u64::from(piece.end));
            if clipped_start < clipped_end {
                // Both lie within the piece, so they fit.
                let start = u32::try_from(clipped_start).unwrap_or(piece.start);
                let end = u32::try_from(clipped_end).unwrap_or(piece.end);
                match self.spans.last_mut() {
                    // The same rules right after the last span (most rows of an FDE change
                    // only registers the probe does not track): one longer span, not two,
                    // so that the builder's memory follows the table's size.
                    Some(last) if last.end == start && last.rules == rules => last.end = end,
                    _ => self.spans.push(Span { start, end, rules }),
                }
                kept = true;
            }
        }
        kept
    }

    /// The table: rows sorted by pc, a [`cfa::NONE`] row wherever one span does not run
    /// into the next (and after the last), equal consecutive rules collapsed.
    pub fn finish(mut self) -> Vec<UnwindRow> {
        self.spans.sort_unstable_by_key(|span| span.start);
        let mut rows: Vec<UnwindRow> = Vec::with_capacity(self.spans.len() / 2);
        let mut push = |pc: u32, rules: Rules| {
            let row = UnwindRow::new(
                pc,
                rules.cfa_kind,
                rules.cfa_offset,
                rules.rbp_kind,
                rules.rbp_offset,
            );
            match rows.last() {
                Some(last)
                    if last.rules == row.rules
                        && last.cfa_offset == row.cfa_offset
                        && last.rbp_offset == row.rbp_offset => {}
                _ => rows.push(row),
            }
        };
        let mut end = None;
        for span in &self.spans {
            if end.is_some_and(|end| end != span.start) {
                push(end.unwrap_or_default(), Rules::NONE);
            }
            push(span.start, span.rules);
            end = Some(span.end);
        }
        if let Some(end) = end {
            push(end, Rules::NONE);
        }
        debug_assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
        debug_assert!(rows.last().is_none_or(|row| row.cfa_kind() == cfa::NONE));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::unwind::rbp;

    fn rsp(offset: i16) -> Rules {
        Rules {
            cfa_kind: cfa::RSP,
            cfa_offset: offset,
            rbp_kind: rbp::SAME,
            rbp_offset: 0,
        }
    }

    fn row(pc: u32, rules: Rules) -> UnwindRow {
        UnwindRow::new(
            pc,
            rules.cfa_kind,
            rules.cfa_offset,
            rules.rbp_kind,
            rules.rbp_offset,
        )
    }

    #[test]
    fn claims_only_what_is_free() {
        let mut builder = Builder::default();
        assert_eq!(builder.claim(10, 20), vec![10..20]);
        assert_eq!(builder.claim(30, 40), vec![30..40]);
        assert_eq!(builder.claim(5, 45), vec![5..10, 20..30, 40..45]);
        assert_eq!(builder.claim(0, 50), vec![0..5, 45..50]);
        assert_eq!(builder.claim(12, 18), vec![]);
        assert_eq!(builder.claim(60, 60), vec![]);
        assert_eq!(builder.claim(55, 65), vec![55..65]);
        assert_eq!(builder.claim(50, 70), vec![50..55, 65..70]);
    }

    #[test]
    fn closes_gaps_and_collapses() {
        let mut builder = Builder::default();
        // Two FDEs back to back, then one after a gap, seen out of order.
        let third = builder.claim(0x200, 0x210);
        builder.push(0x200, 0x210, rsp(8), &third);
        let first = builder.claim(0x100, 0x120);
        builder.push(0x100, 0x101, rsp(8), &first);
        builder.push(0x101, 0x110, rsp(16), &first);
        builder.push(0x110, 0x120, rsp(16), &first);
        let second = builder.claim(0x120, 0x130);
        builder.push(0x120, 0x130, rsp(8), &second);
        assert_eq!(
            builder.finish(),
            vec![
                row(0x100, rsp(8)),
                row(0x101, rsp(16)),
                row(0x120, rsp(8)),
                row(0x130, Rules::NONE),
                row(0x200, rsp(8)),
                row(0x210, Rules::NONE),
            ]
        );
    }

    #[test]
    fn first_seen_wins_where_fdes_overlap() {
        let mut builder = Builder::default();
        let first = builder.claim(0x100, 0x140);
        builder.push(0x100, 0x140, rsp(8), &first);
        // Overlaps the first's tail and runs past it.
        let second = builder.claim(0x130, 0x150);
        assert_eq!(second, vec![0x140..0x150]);
        builder.push(0x130, 0x138, rsp(24), &second);
        builder.push(0x138, 0x150, rsp(32), &second);
        assert_eq!(
            builder.finish(),
            vec![
                row(0x100, rsp(8)),
                row(0x140, rsp(32)),
                row(0x150, Rules::NONE),
            ]
        );
    }

    #[test]
    fn nothing_in_nothing_out() {
        assert_eq!(Builder::default().finish(), vec![]);
    }
}
