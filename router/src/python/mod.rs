//! CPython in the processes the router profiles: which processes run it and where its
//! runtime is ([`detect`]), the offsets of its internal structs per version ([`layout`]), and
//! code objects turned into functions, files and lines ([`CodeReader`]), for a probe that
//! walks CPython's frame chain (3.11 to 3.13) and reports code object addresses and
//! instruction indexes.

mod code;
mod detect;
mod layout;
mod locations;

pub use code::{read_memory, CodeReader, PythonFrame};
pub use detect::{detect, PythonProcess};
pub use layout::{
    layout, PythonLayout, CODE_UNIT_SIZE, FRAME_OWNED_BY_FRAME_OBJECT, FRAME_OWNED_BY_GENERATOR,
    FRAME_OWNED_BY_THREAD, STATE_ASCII_BIT, STATE_COMPACT_BIT, STATE_KIND_MASK, STATE_KIND_SHIFT,
};
pub use locations::LineTable;
