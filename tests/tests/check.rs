//! `hubgate check` on real files.

use std::path::Path;
use std::process::Command;

use hubgate_tests::gateway_bin;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

#[test]
fn check_reports_each_error_with_line_and_column_and_fails() {
    let fixture = repo().join("tests/fixtures/broken.toml");
    let out = Command::new(gateway_bin!())
        .arg("check")
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken config must fail the check");
    let text = String::from_utf8(out.stdout).unwrap();
    let name = fixture.display().to_string();
    for expected in [
        format!("{name}:4:1: error: unknown field 'precison'"),
        format!("{name}:11:15: error: unknown variant 'sustainability'"),
        format!("{name}:16:8: error: unknown variant 'blur'"),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(text.contains("rejected: 3 errors"), "{text}");
}

#[test]
fn every_shipped_config_passes_the_check() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.push(repo().join("gateway/src/default_config.toml"));
    assert!(files.len() >= 2, "{files:?}");
    let out = Command::new(gateway_bin!())
        .arg("check")
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(": ok:").count(), files.len(), "{text}");
}
