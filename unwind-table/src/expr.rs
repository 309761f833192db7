//! The few DWARF expressions the probe can follow, recognised byte by byte (there is no
//! general evaluator: anything else is unsupported).

use gimli::constants::{
    DW_OP_and, DW_OP_breg16, DW_OP_breg6, DW_OP_breg7, DW_OP_deref, DW_OP_ge, DW_OP_lit0,
    DW_OP_lit15, DW_OP_lit3, DW_OP_lit31, DW_OP_plus, DW_OP_shl,
};

/// A CFA expression the probe can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CfaExpression {
    /// A PLT's: CFA = rsp + `offset`, plus 8 when `(rip & 15) >= threshold`.
    Plt {
        /// `N` of `DW_OP_breg7 N`.
        offset: i64,
        /// `K` of `DW_OP_litK`.
        threshold: u8,
    },
    /// A realigned frame's: CFA = *(rbp + `offset`).
    DerefRbp {
        /// `N` of `DW_OP_breg6 N`.
        offset: i64,
    },
}

/// Recognises a CFA expression:
/// - `DW_OP_breg7 N; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litK; DW_OP_ge;
///   DW_OP_lit3; DW_OP_shl; DW_OP_plus` (the PLT's), or
/// - `DW_OP_breg6 N; DW_OP_deref` (a frame realigned through a DRAP register).
pub(crate) fn cfa_expression(bytes: &[u8]) -> Option<CfaExpression> {
    let mut ops = Ops(bytes);
    match ops.byte()? {
        op if op == DW_OP_breg7.0 => {
            let offset = ops.sleb128()?;
            ops.expect(DW_OP_breg16.0)?;
            (ops.sleb128()? == 0).then_some(())?;
            ops.expect(DW_OP_lit15.0)?;
            ops.expect(DW_OP_and.0)?;
            let lit = ops.byte()?;
            (DW_OP_lit0.0..=DW_OP_lit31.0)
                .contains(&lit)
                .then_some(())?;
            ops.expect(DW_OP_ge.0)?;
            ops.expect(DW_OP_lit3.0)?;
            ops.expect(DW_OP_shl.0)?;
            ops.expect(DW_OP_plus.0)?;
            ops.end()?;
            Some(CfaExpression::Plt {
                offset,
                threshold: lit - DW_OP_lit0.0,
            })
        }
        op if op == DW_OP_breg6.0 => {
            let offset = ops.sleb128()?;
            ops.expect(DW_OP_deref.0)?;
            ops.end()?;
            Some(CfaExpression::DerefRbp { offset })
        }
        _ => None,
    }
}

/// Recognises a register's address expression `DW_OP_breg6 N` (saved at rbp + N): `N`.
pub(crate) fn rbp_relative(bytes: &[u8]) -> Option<i64> {
    let mut ops = Ops(bytes);
    ops.expect(DW_OP_breg6.0)?;
    let offset = ops.sleb128()?;
    ops.end()?;
    Some(offset)
}

/// A cursor over expression bytes.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    fn expect(&mut self, op: u8) -> Option<()> {
        (self.byte()? == op).then_some(())
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }

    /// A signed LEB128 number that fits an `i64`.
    fn sleb128(&mut self) -> Option<i64> {
        let mut value: i64 = 0;
        let mut shift = 0u32;
        loop {
            let byte = self.byte()?;
            if shift >= 64 || (shift == 63 && !matches!(byte & 0x7f, 0 | 0x7f)) {
                return None;
            }
            value |= i64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Some(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLT: [u8; 10] = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24];

    fn plt(threshold_op: u8) -> Vec<u8> {
        let mut bytes = PLT.to_vec();
        bytes[6] = threshold_op;
        bytes.push(0x22);
        bytes
    }

    #[test]
    fn recognises_the_plt_expression() {
        assert_eq!(
            cfa_expression(&plt(0x3b)),
            Some(CfaExpression::Plt {
                offset: 8,
                threshold: 11
            })
        );
        assert_eq!(
            cfa_expression(&plt(0x3a)),
            Some(CfaExpression::Plt {
                offset: 8,
                threshold: 10
            })
        );
        // Not a literal where K goes.
        assert_eq!(cfa_expression(&plt(0x22)), None);
        // Truncated, or something after the end.
        assert_eq!(cfa_expression(&PLT), None);
        let mut longer = plt(0x3b);
        longer.push(0x06);
        assert_eq!(cfa_expression(&longer), None);
    }

    #[test]
    fn recognises_deref_rbp() {
        // DW_OP_breg6 -16; DW_OP_deref
        assert_eq!(
            cfa_expression(&[0x76, 0x70, 0x06]),
            Some(CfaExpression::DerefRbp { offset: -16 })
        );
        // DW_OP_breg7 -16; DW_OP_deref
        assert_eq!(cfa_expression(&[0x77, 0x70, 0x06]), None);
        // DW_OP_breg6 -16 alone
        assert_eq!(cfa_expression(&[0x76, 0x70]), None);
        assert_eq!(cfa_expression(&[]), None);
    }

    #[test]
    fn recognises_rbp_relative_slots() {
        assert_eq!(rbp_relative(&[0x76, 0x00]), Some(0));
        assert_eq!(rbp_relative(&[0x76, 0x78]), Some(-8));
        assert_eq!(rbp_relative(&[0x76, 0x80, 0x01]), Some(128));
        assert_eq!(rbp_relative(&[0x77, 0x00]), None);
        assert_eq!(rbp_relative(&[0x76, 0x00, 0x06]), None);
    }

    #[test]
    fn reads_sleb128() {
        let read = |bytes: &[u8]| Ops(bytes).sleb128();
        assert_eq!(read(&[0x02]), Some(2));
        assert_eq!(read(&[0x7e]), Some(-2));
        assert_eq!(read(&[0xff, 0x00]), Some(127));
        assert_eq!(read(&[0x81, 0x7f]), Some(-127));
        assert_eq!(read(&[0xa0, 0x8d, 0x06]), Some(100_000));
        assert_eq!(read(&[0x80]), None);
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
        assert_eq!(read(&max), Some(i64::MAX));
        let min = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x7f];
        assert_eq!(read(&min), Some(i64::MIN));
        let too_long = [
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        assert_eq!(read(&too_long), None);
    }
}
