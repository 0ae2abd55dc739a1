//! The alert rules of `deploy/observability/prometheusrule.yaml`, checked by Prometheus's own
//! `promtool` (`check rules`) and unit-tested by it (`test rules` with
//! `deploy/observability/rules.test.yaml`). promtool is built from the Go module proxy by
//! `loadtest/tools/tool.sh promtool` (cached), or taken from `$PROMTOOL`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn promtool() -> PathBuf {
    common::built_tool("PROMTOOL", "loadtest/tools/tool.sh", &["promtool"])
}

/// `promtool args…` in `dir`: (success, stdout + stderr).
fn run(promtool: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The PrometheusRule's groups as a plain rule file (JSON, which promtool reads as YAML), with
/// the unit tests beside it, in a fresh directory; `edit` may change the groups first.
fn rule_dir(edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = root().join("deploy/observability");
    let rule: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("prometheusrule.yaml")).unwrap())
            .expect("prometheusrule.yaml is YAML");
    let mut groups = serde_json::json!({"groups": rule["spec"]["groups"].clone()});
    edit(&mut groups);
    let tmp = std::env::temp_dir().join(format!("stslock-promtool-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("stslock-rules.yaml"),
        serde_json::to_vec_pretty(&groups).unwrap(),
    )
    .unwrap();
    std::fs::copy(dir.join("rules.test.yaml"), tmp.join("rules.test.yaml")).unwrap();
    tmp
}

#[test]
fn promtool_checks_and_unit_tests_every_alert_rule() {
    let promtool = promtool();
    let (ok, version) = run(&promtool, Path::new("."), &["--version"]);
    assert!(ok && version.contains("promtool"), "{version}");

    let dir = rule_dir(|_| {});
    let (ok, out) = run(&promtool, &dir, &["check", "rules", "stslock-rules.yaml"]);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let (ok, out) = run(&promtool, &dir, &["test", "rules", "rules.test.yaml"]);
    assert!(ok, "promtool test rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // Every alert has a unit test that fires it: the tests see a rule that no longer fires.
    let names: Vec<String> = {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("stslock-rules.yaml")).unwrap())
                .unwrap();
        file["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .map(|r| r["alert"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names.len(), 8);
    for name in &names {
        let silenced = rule_dir(|groups| {
            for g in groups["groups"].as_array_mut().unwrap() {
                for r in g["rules"].as_array_mut().unwrap() {
                    if r["alert"] == name.as_str() {
                        r["expr"] = serde_json::json!("vector(1) == 2");
                    }
                }
            }
        });
        let (ok, out) = run(&promtool, &silenced, &["test", "rules", "rules.test.yaml"]);
        assert!(
            !ok && out.contains(name.as_str()),
            "the unit tests pass with {name} never firing:\n{out}"
        );
        std::fs::remove_dir_all(silenced).ok();
    }
    std::fs::remove_dir_all(dir).ok();
}
