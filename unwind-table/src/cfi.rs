//! Walking the FDEs of `.eh_frame` and `.debug_frame` with gimli, row by row.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, LittleEndian,
    UnwindContext, UnwindOffset, UnwindSection,
};

use crate::rules::{self, Slice};
use crate::table::Builder;
use crate::{BuildStats, TableError};

/// Adds the FDEs of `.eh_frame` (whose pointers are relative to `bases`).
pub(crate) fn add_eh_frame(
    data: &[u8],
    bases: &BaseAddresses,
    builder: &mut Builder,
    stats: &mut BuildStats,
) -> Result<(), TableError> {
    let mut section = EhFrame::new(data, LittleEndian);
    section.set_address_size(8);
    add_fdes(&section, bases, builder, stats).map_err(|source| TableError::MalformedCfi {
        section: ".eh_frame",
        source,
    })
}

/// Adds the FDEs of `.debug_frame` (where no `.eh_frame` FDE was).
pub(crate) fn add_debug_frame(
    data: &[u8],
    builder: &mut Builder,
    stats: &mut BuildStats,
) -> Result<(), TableError> {
    let mut section = DebugFrame::new(data, LittleEndian);
    section.set_address_size(8);
    let bases = BaseAddresses::default();
    add_fdes(&section, &bases, builder, stats).map_err(|source| TableError::MalformedCfi {
        section: ".debug_frame",
        source,
    })
}

/// Adds every FDE of a section, in section order.
fn add_fdes<'data, S>(
    section: &S,
    bases: &BaseAddresses,
    builder: &mut Builder,
    stats: &mut BuildStats,
) -> gimli::Result<()>
where
    S: UnwindSection<Slice<'data>>,
{
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'data>>> = HashMap::new();
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|section, bases, offset| {
            let key = UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(key, cie.clone());
            Ok(cie)
        })?;
        let (Ok(start), Ok(end)) = (
            u32::try_from(fde.initial_address()),
            u32::try_from(fde.initial_address().saturating_add(fde.len())),
        ) else {
            stats.skipped_fdes += 1;
            continue;
        };
        let pieces = builder.claim(start, end);
        if pieces.is_empty() {
            continue;
        }
        stats.fdes += 1;
        let signal_frame = fde.is_signal_trampoline();
        let return_address = fde.cie().return_address_register();
        let mut table = fde.rows(section, bases, &mut ctx)?;
        while let Some(row) = table.next_row()? {
            let translation = rules::translate(section, row, signal_frame, return_address)?;
            let kept = builder.push(
                row.start_address(),
                row.end_address(),
                translation.rules,
                &pieces,
            );
            if kept && !translation.supported {
                stats.unsupported_rows += 1;
            }
        }
    }
    Ok(())
}
