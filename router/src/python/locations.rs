//! CPython's location table (`co_linetable` since 3.11, described in CPython's
//! `Objects/locations.md`), reduced to the line of each code unit.
//!
//! The table is a sequence of entries, each covering 1 to 8 code units. An entry's first byte
//! has its top bit set, the entry's kind in bits 3–6 and its length − 1 in bits 0–2; what
//! follows depends on the kind:
//!
//! | kind   | line                              | then                                   |
//! |--------|-----------------------------------|----------------------------------------|
//! | 0–9    | the previous entry's              | 1 byte (columns)                       |
//! | 10–12  | the previous entry's + (kind − 10)| 2 bytes (columns)                      |
//! | 13     | + a signed varint                 | —                                      |
//! | 14     | + a signed varint                 | end line delta, column, end column: 3 varints |
//! | 15     | none                              | — (the line carried on is unchanged)   |
//!
//! Varints are little-endian groups of 6 bits, bit 6 meaning "more follow"; a signed varint
//! is an unsigned one `u` read as `-(u >> 1)` when `u & 1`, else `u >> 1`. Lines start from
//! `co_firstlineno`.

/// The line of each code unit of one code object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTable {
    first_line: u32,
    /// `(end, line)`: the code units from the previous range's end up to `end` (excluded)
    /// are on `line`; 0 when they have none. Neighbours with the same line are merged.
    ranges: Box<[(u32, u32)]>,
}

impl LineTable {
    /// Decodes a location table whose code object starts at line `first_line`. A malformed
    /// or truncated table yields the ranges decoded before the damage.
    pub fn decode(table: &[u8], first_line: u32) -> LineTable {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut bytes = Bytes { table, pos: 0 };
        let mut line = i64::from(first_line);
        let mut end = 0u32;
        while let Some(first) = bytes.next() {
            if first & 0x80 == 0 {
                break;
            }
            let kind = (first >> 3) & 0xf;
            let length = u32::from(first & 7) + 1;
            let entry_line = match kind {
                15 => None,
                14 => {
                    let Some(delta) = bytes.svarint() else { break };
                    line += delta;
                    // End line delta, column + 1, end column + 1.
                    if (0..3).any(|_| bytes.varint().is_none()) {
                        break;
                    }
                    Some(line)
                }
                13 => {
                    let Some(delta) = bytes.svarint() else { break };
                    line += delta;
                    Some(line)
                }
                10..=12 => {
                    line += i64::from(kind - 10);
                    if bytes.skip(2).is_none() {
                        break;
                    }
                    Some(line)
                }
                _ => {
                    if bytes.skip(1).is_none() {
                        break;
                    }
                    Some(line)
                }
            };
            let entry_line = entry_line.and_then(|l| u32::try_from(l).ok()).unwrap_or(0);
            end = end.saturating_add(length);
            match ranges.last_mut() {
                Some(last) if last.1 == entry_line => last.0 = end,
                _ => ranges.push((end, entry_line)),
            }
        }
        LineTable {
            first_line,
            ranges: ranges.into_boxed_slice(),
        }
    }

    /// The line of code unit `index` (counted from `co_code_adaptive`); `None` when the table
    /// gives it no line or does not reach it. `u32::MAX` (index −1, where 3.11 and 3.12 point
    /// a frame that has not started) is the first line, as `PyCode_Addr2Line` says.
    pub fn line(&self, index: u32) -> Option<u32> {
        if index == u32::MAX {
            return Some(self.first_line);
        }
        let i = self.ranges.partition_point(|&(end, _)| end <= index);
        self.ranges
            .get(i)
            .map(|&(_, line)| line)
            .filter(|&line| line != 0)
    }

    /// How many code units the table covers.
    pub fn units(&self) -> u32 {
        self.ranges.last().map_or(0, |&(end, _)| end)
    }

    /// The heap bytes this table holds (for cache accounting).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.ranges)
    }
}

struct Bytes<'a> {
    table: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.table.get(self.pos)?;
        self.pos += 1;
        Some(byte)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        (self.pos + n <= self.table.len()).then(|| self.pos += n)
    }

    /// An unsigned varint; `None` if truncated, or beyond 32 bits.
    fn varint(&mut self) -> Option<u32> {
        let mut byte = self.next()?;
        let mut value = u32::from(byte & 63);
        let mut shift = 0;
        while byte & 64 != 0 {
            byte = self.next()?;
            shift += 6;
            if shift >= 32 {
                return None;
            }
            value |= u32::from(byte & 63) << shift;
        }
        Some(value)
    }

    fn svarint(&mut self) -> Option<i64> {
        let value = self.varint()?;
        let magnitude = i64::from(value >> 1);
        Some(if value & 1 != 0 {
            -magnitude
        } else {
            magnitude
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `co_linetable` of this function as CPython 3.11.7, 3.12.1 and 3.13.0 compile it
    /// (its first line is 1), and `[p[0] for p in f.__code__.co_positions()]` (one per code
    /// unit) as each says:
    ///
    /// ```python
    /// def f(a):
    ///     x = a + 1
    ///
    ///     if x > 2:
    ///         return [i for i in range(x)]
    ///     return None
    /// ```
    fn check_real_table(table: &[u8], expected: &[Option<u32>]) {
        let lines = LineTable::decode(table, 1);
        let units = u32::try_from(expected.len()).unwrap();
        let got: Vec<_> = (0..units).map(|i| lines.line(i)).collect();
        assert_eq!(got, expected);
        assert_eq!(lines.units(), units);
        assert_eq!(lines.line(units), None);
        assert_eq!(lines.line(u32::MAX), Some(1));
    }

    #[test]
    fn real_table_3_11() {
        check_real_table(
            &[
                0x80, 0x00, 0xd8, 0x08, 0x09, 0x88, 0x41, 0x89, 0x05, 0x80, 0x41, 0xe0, 0x07, 0x08,
                0x88, 0x31, 0x82, 0x75, 0x80, 0x75, 0xd8, 0x0f, 0x24, 0xd0, 0x0f, 0x24, 0x9d, 0x35,
                0xa0, 0x11, 0x99, 0x38, 0x9c, 0x38, 0xd0, 0x0f, 0x24, 0xd1, 0x0f, 0x24, 0xd4, 0x0f,
                0x24, 0xd0, 0x08, 0x24, 0xd8, 0x0b, 0x0f, 0x88, 0x34,
            ],
            &[
                Some(1),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(6),
                Some(6),
            ],
        );
    }

    #[test]
    fn real_table_3_12() {
        check_real_table(
            &[
                0x80, 0x00, 0xd8, 0x08, 0x09, 0x88, 0x41, 0x89, 0x05, 0x80, 0x41, 0xe0, 0x07, 0x08,
                0x88, 0x31, 0x82, 0x75, 0xdc, 0x1b, 0x20, 0xa0, 0x11, 0x9b, 0x38, 0xd6, 0x0f, 0x24,
                0x90, 0x61, 0x92, 0x01, 0xd2, 0x0f, 0x24, 0xd0, 0x08, 0x24, 0xd8, 0x0b, 0x0f, 0xf9,
                0xf2, 0x03, 0x00, 0x10, 0x25,
            ],
            &[
                Some(1),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(6),
                None,
                None,
                Some(5),
                Some(5),
                Some(5),
            ],
        );
    }

    #[test]
    fn real_table_3_13() {
        check_real_table(
            &[
                0x80, 0x00, 0xd8, 0x08, 0x09, 0x88, 0x41, 0x89, 0x05, 0x80, 0x41, 0xe0, 0x07, 0x08,
                0x88, 0x31, 0x83, 0x75, 0xdc, 0x1b, 0x20, 0xa0, 0x11, 0x9c, 0x38, 0xd3, 0x0f, 0x24,
                0x99, 0x38, 0x90, 0x61, 0x92, 0x01, 0x99, 0x38, 0xd1, 0x0f, 0x24, 0xd0, 0x08, 0x24,
                0xd8, 0x0b, 0x0f, 0xf9, 0xf2, 0x03, 0x00, 0x10, 0x25,
            ],
            &[
                Some(1),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(2),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(4),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(5),
                Some(6),
                None,
                None,
                Some(5),
                Some(5),
                Some(5),
            ],
        );
    }

    #[test]
    fn every_kind() {
        let table = [
            0x80 | (5 << 3) | 1, // short form, 2 units, line 10
            0x00,
            0x80 | (11 << 3), // one line + 1: 11
            0x01,
            0x02,
            0x80 | (12 << 3) | 2, // one line + 2, 3 units: 13
            0x01,
            0x02,
            0x80 | (15 << 3), // no location
            0x80 | (13 << 3), // no columns, −3 (svarint 7): 10
            0x07,
            0x80 | (14 << 3) | 7, // long, +100 (svarint 200 = 8 + 3 << 6): 110, 8 units
            0x40 | 8,
            0x03,
            0x00,
            0x01,
            0x02,
            0x80 | (10 << 3), // one line + 0: still 110
            0x00,
            0x00,
        ];
        let lines = LineTable::decode(&table, 10);
        let got: Vec<_> = (0..18).map(|i| lines.line(i)).collect();
        let mut expected = vec![Some(10), Some(10), Some(11), Some(13), Some(13), Some(13)];
        expected.push(None);
        expected.push(Some(10));
        expected.extend([Some(110); 9]);
        expected.push(None);
        assert_eq!(got, expected);
    }

    #[test]
    fn damaged_tables_keep_what_came_before() {
        // A long entry cut in its varints, after a good entry.
        let lines = LineTable::decode(&[0x80, 0x00, 0x80 | (14 << 3), 0x42], 7);
        assert_eq!(lines.line(0), Some(7));
        assert_eq!(lines.line(1), None);
        // A byte without the entry bit.
        let lines = LineTable::decode(&[0x01, 0x80, 0x00], 7);
        assert_eq!(lines.units(), 0);
        // An endless varint.
        let lines = LineTable::decode(
            &[0x80 | (13 << 3), 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f],
            7,
        );
        assert_eq!(lines.units(), 0);
        assert_eq!(LineTable::decode(&[], 3).line(0), None);
    }
}
