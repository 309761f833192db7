//! The setup script is idempotent: a second run does nothing, says nothing and succeeds.

use std::process::Command;

#[test]
fn setup_twice_in_a_row_the_second_run_is_silent_and_succeeds() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/setup.sh");
    let first = Command::new("bash")
        .arg(script)
        .arg("--test")
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = Command::new("bash")
        .arg(script)
        .arg("--test")
        .output()
        .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "",
        "second run printed something"
    );
    assert_eq!(
        String::from_utf8_lossy(&second.stderr),
        "",
        "second run printed something"
    );
}
