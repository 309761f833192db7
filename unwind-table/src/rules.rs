//! Translating one row of gimli's CFI table into the probe's rules.

use gimli::{CfaRule, Register, RegisterRule, UnwindExpression, UnwindSection};
use probe_common::unwind::{cfa, rbp};

use crate::expr::{self, CfaExpression};

/// How the crate reads sections: little-endian byte slices.
pub(crate) type Slice<'data> = gimli::EndianSlice<'data, gimli::LittleEndian>;

/// x86-64 DWARF register number of rbp.
pub(crate) const RBP: Register = Register(6);
/// x86-64 DWARF register number of rsp.
pub(crate) const RSP: Register = Register(7);

/// The rules of one row, without its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    /// One of [`cfa`].
    pub cfa_kind: u8,
    /// The CFA's offset (or the PLT's rsp offset, or the DRAP slot's offset from rbp).
    pub cfa_offset: i16,
    /// One of [`rbp`].
    pub rbp_kind: u8,
    /// rbp's slot in units of 8 bytes, or the PLT threshold.
    pub rbp_offset: i8,
}

impl Rules {
    /// No CFI: the probe takes a frame-pointer step.
    pub const NONE: Self = Self::only(cfa::NONE);

    /// A CFA kind with no offset and rbp unchanged.
    const fn only(cfa_kind: u8) -> Self {
        Self {
            cfa_kind,
            cfa_offset: 0,
            rbp_kind: rbp::SAME,
            rbp_offset: 0,
        }
    }
}

/// A translated row, and whether the probe could follow all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Translation {
    /// The rules.
    pub rules: Rules,
    /// False when part of the CFI could not be represented (a [`cfa::NONE`] CFA, or an
    /// [`rbp::UNDEFINED`] rbp that the CFI did define).
    pub supported: bool,
}

impl Translation {
    const fn supported(rules: Rules) -> Self {
        Self {
            rules,
            supported: true,
        }
    }

    const UNSUPPORTED: Self = Self {
        rules: Rules::NONE,
        supported: false,
    };
}

/// Translates one row of an FDE's CFI table.
///
/// `signal_frame`: the FDE's CIE has the `S` augmentation; `return_address` is the CIE's
/// return address column (16 on x86-64).
pub(crate) fn translate<'data, S>(
    section: &S,
    row: &gimli::UnwindTableRow<usize>,
    signal_frame: bool,
    return_address: Register,
) -> gimli::Result<Translation>
where
    S: UnwindSection<Slice<'data>>,
{
    let ra = row.register(return_address);
    if ra == Some(RegisterRule::Undefined) {
        return Ok(Translation::supported(Rules::only(cfa::END)));
    }
    if signal_frame {
        return Ok(Translation::supported(Rules::only(cfa::SIGNAL)));
    }
    if ra != Some(RegisterRule::Offset(-8)) {
        return Ok(Translation::UNSUPPORTED);
    }
    let saved_rbp = row.register(RBP);
    let (cfa_kind, cfa_offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = match *register {
                RSP => cfa::RSP,
                RBP => cfa::RBP,
                _ => return Ok(Translation::UNSUPPORTED),
            };
            (kind, *offset)
        }
        CfaRule::Expression(expression) => {
            match expr::cfa_expression(bytes(section, expression)?) {
                Some(CfaExpression::Plt { offset, threshold }) => {
                    let (Ok(cfa_offset), Ok(threshold), None | Some(RegisterRule::SameValue)) =
                        (i16::try_from(offset), i8::try_from(threshold), saved_rbp)
                    else {
                        return Ok(Translation::UNSUPPORTED);
                    };
                    return Ok(Translation::supported(Rules {
                        cfa_kind: cfa::PLT,
                        cfa_offset,
                        rbp_kind: rbp::SAME,
                        rbp_offset: threshold,
                    }));
                }
                Some(CfaExpression::DerefRbp { offset }) => (cfa::DEREF_RBP, offset),
                None => return Ok(Translation::UNSUPPORTED),
            }
        }
    };
    let (cfa_kind, cfa_offset) = match i16::try_from(cfa_offset) {
        Ok(offset) => (cfa_kind, offset),
        // A large frame: its size in units of 8.
        Err(_) if cfa_kind == cfa::RSP && cfa_offset % 8 == 0 => {
            match i16::try_from(cfa_offset / 8) {
                Ok(units) => (cfa::RSP_SCALED, units),
                Err(_) => return Ok(Translation::UNSUPPORTED),
            }
        }
        Err(_) => return Ok(Translation::UNSUPPORTED),
    };
    let (rbp_kind, rbp_offset, supported) = match saved_rbp {
        None | Some(RegisterRule::SameValue) => (rbp::SAME, 0, true),
        Some(RegisterRule::Undefined) => (rbp::UNDEFINED, 0, true),
        Some(RegisterRule::Offset(offset)) => match slot(offset) {
            Some(slot) => (rbp::AT_CFA, slot, true),
            None => (rbp::UNDEFINED, 0, false),
        },
        Some(RegisterRule::Expression(expression)) => {
            match expr::rbp_relative(bytes(section, &expression)?).and_then(slot) {
                Some(slot) => (rbp::AT_RBP, slot, true),
                None => (rbp::UNDEFINED, 0, false),
            }
        }
        Some(_) => (rbp::UNDEFINED, 0, false),
    };
    Ok(Translation {
        rules: Rules {
            cfa_kind,
            cfa_offset,
            rbp_kind,
            rbp_offset,
        },
        supported,
    })
}

/// A byte offset as a slot in units of 8 bytes, if it is a multiple of 8 that fits.
fn slot(offset: i64) -> Option<i8> {
    if offset % 8 == 0 {
        i8::try_from(offset / 8).ok()
    } else {
        None
    }
}

/// The bytes of an expression in the CFI section.
fn bytes<'data, S>(section: &S, expression: &UnwindExpression<usize>) -> gimli::Result<&'data [u8]>
where
    S: UnwindSection<Slice<'data>>,
{
    Ok(expression.get(section)?.0.slice())
}
