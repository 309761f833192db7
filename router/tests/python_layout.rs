//! `router::python::layout` against CPython's own headers: tests/fixtures/python_layout.c,
//! compiled with gcc against each installed CPython's headers (pyenv's under
//! `$PYENV_ROOT/versions/3.X.Y/include`, Debian's python3.11-dev under /usr/include), prints
//! the offsets, which must be the table's. A version that is not installed is skipped, but
//! one of 3.11 and 3.12 must be.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use router::python::{
    layout, PythonLayout, CODE_UNIT_SIZE, STATE_ASCII_BIT, STATE_COMPACT_BIT, STATE_KIND_MASK,
    STATE_KIND_SHIFT,
};

fn pyenv_root() -> PathBuf {
    std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"))
}

/// The newest pyenv install of 3.`minor` (`versions/3.MINOR.PATCH`), if any.
fn pyenv_prefix(minor: u32) -> Option<PathBuf> {
    let wanted = format!("3.{minor}.");
    fs::read_dir(pyenv_root().join("versions"))
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let patch: u32 = name.strip_prefix(&wanted)?.parse().ok()?;
            Some((patch, entry.path()))
        })
        .max_by_key(|(patch, _)| *patch)
        .map(|(_, path)| path)
}

/// The `name=value` lines the fixture prints for `layout`.
fn expected_lines(layout: &PythonLayout) -> Vec<String> {
    let opt = |v: Option<u16>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
    let fields: Vec<(&str, String)> = vec![
        ("minor", layout.minor.to_string()),
        (
            "runtime_interpreters_head",
            layout.runtime_interpreters_head.to_string(),
        ),
        (
            "interp_threads_head",
            layout.interp_threads_head.to_string(),
        ),
        ("tstate_next", layout.tstate_next.to_string()),
        (
            "tstate_native_thread_id",
            layout.tstate_native_thread_id.to_string(),
        ),
        ("tstate_cframe", opt(layout.tstate_cframe)),
        (
            "cframe_current_frame",
            layout.cframe_current_frame.to_string(),
        ),
        ("frame_previous", layout.frame_previous.to_string()),
        ("frame_code", layout.frame_code.to_string()),
        ("frame_instr", layout.frame_instr.to_string()),
        ("frame_owner", layout.frame_owner.to_string()),
        ("frame_is_entry", opt(layout.frame_is_entry)),
        ("owned_by_cstack", layout.owned_by_cstack.to_string()),
        ("code_adaptive", layout.code_adaptive.to_string()),
        ("code_qualname", layout.code_qualname.to_string()),
        ("code_name", layout.code_name.to_string()),
        ("code_filename", layout.code_filename.to_string()),
        ("code_firstlineno", layout.code_firstlineno.to_string()),
        ("code_linetable", layout.code_linetable.to_string()),
        ("unicode_ascii_data", layout.unicode_ascii_data.to_string()),
        (
            "unicode_compact_data",
            layout.unicode_compact_data.to_string(),
        ),
        ("unicode_state", layout.unicode_state.to_string()),
        ("unicode_length", layout.unicode_length.to_string()),
        ("bytes_data", layout.bytes_data.to_string()),
        ("bytes_size", layout.bytes_size.to_string()),
        ("sizeof_code_unit", CODE_UNIT_SIZE.to_string()),
        ("state_kind_shift", STATE_KIND_SHIFT.to_string()),
        ("state_kind_bits", STATE_KIND_MASK.count_ones().to_string()),
        ("state_compact_bit", STATE_COMPACT_BIT.to_string()),
        ("state_ascii_bit", STATE_ASCII_BIT.to_string()),
    ];
    fields
        .into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}

/// Compiles the fixture with `include_dirs`, runs it, and compares its lines with
/// `layout(minor)`.
fn check_against_headers(minor: u32, include_dirs: &[PathBuf]) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python_layout.c");
    let dir = tempfile::tempdir().expect("temp dir");
    let program = dir.path().join("python_layout");
    let mut gcc = Command::new("gcc");
    gcc.arg("-DPy_BUILD_CORE");
    for include in include_dirs {
        gcc.arg("-I").arg(include);
    }
    let out = gcc
        .arg(&fixture)
        .arg("-o")
        .arg(&program)
        .output()
        .expect("gcc runs");
    assert!(
        out.status.success(),
        "gcc failed for 3.{minor} ({include_dirs:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&program).output().expect("fixture runs");
    assert!(out.status.success());
    let got: Vec<String> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect();
    let layout = layout(minor).unwrap_or_else(|| panic!("no layout for 3.{minor}"));
    assert_eq!(
        got,
        expected_lines(layout),
        "3.{minor} headers in {include_dirs:?} disagree with layout({minor})"
    );
}

/// Checks pyenv's 3.`minor`; `false` when it is not installed.
fn check_pyenv(minor: u32) -> bool {
    let Some(prefix) = pyenv_prefix(minor) else {
        eprintln!(
            "pyenv 3.{minor} not installed under {:?}: skipped",
            pyenv_root()
        );
        return false;
    };
    let include = prefix.join(format!("include/python3.{minor}"));
    check_against_headers(minor, &[include.clone(), include.join("internal")]);
    true
}

#[test]
fn layout_3_11() {
    check_pyenv(11);
}

#[test]
fn layout_3_12() {
    check_pyenv(12);
}

#[test]
fn layout_3_13() {
    check_pyenv(13);
}

#[test]
fn layout_3_11_or_3_12_is_checked() {
    assert!(
        pyenv_prefix(11).is_some() || pyenv_prefix(12).is_some(),
        "neither CPython 3.11 nor 3.12 is installed under {:?}: install one (pyenv install 3.12)",
        pyenv_root()
    );
}

/// Debian's python3.11-dev headers (the /usr/bin/python3.11 build, 3.11.2).
#[test]
fn layout_debian_3_11() {
    let include = PathBuf::from("/usr/include/python3.11");
    let config = PathBuf::from("/usr/include/x86_64-linux-gnu/python3.11");
    if !include.join("internal/pycore_frame.h").exists() || !config.exists() {
        eprintln!("python3.11-dev not installed: skipped");
        return;
    }
    check_against_headers(11, &[include.clone(), config, include.join("internal")]);
}
