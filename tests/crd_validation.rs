//! Random StatefulSetLock specs against the CRD's schema, as kubesim applies it the way the
//! apiserver does (pruning, defaulting, OpenAPI validation): never a panic, and the fields
//! rejected are exactly those an independent reading of the CRD's rules rejects, each with
//! its field path, a reason and a message. A fixed seed budget runs in the default test run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::collections::BTreeSet;

use kube::CustomResourceExt;
use kubesim::schema::Schema;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use stslock::api::StatefulSetLock;

/// A value for a name field, and whether the CRD accepts it.
fn name(rng: &mut StdRng) -> (Value, bool) {
    match rng.random_range(0..10) {
        0 => (json!(""), false),
        1 => (json!("Upper"), false),
        2 => (json!("under_score"), false),
        3 => (json!("-lead"), false),
        4 => (json!("a".repeat(254)), false),
        5 => (json!(42), false),
        6 => (json!("a".repeat(253)), true),
        7 => (json!("db.example-1"), true),
        _ => (json!(format!("db-{}", rng.random_range(0..1000))), true),
    }
}

/// A value for an integer field with bounds `lo..=hi`, and whether the CRD accepts it.
fn int(rng: &mut StdRng, lo: i64, hi: i64) -> (Value, bool) {
    match rng.random_range(0..9) {
        0 => (json!(lo - 1), false),
        1 => (json!(hi + 1), false),
        2 => (json!(1_i64 << 40), false),
        3 => (json!(1.5), false),
        4 => (json!("30"), false),
        5 => (json!(true), false),
        6 => (json!(lo), true),
        7 => (json!(hi), true),
        _ => (json!(rng.random_range(lo..=hi)), true),
    }
}

/// A random spec, and the fields the CRD's rules reject in it.
fn spec(rng: &mut StdRng) -> (Value, BTreeSet<String>) {
    let mut spec = Map::new();
    let mut bad = BTreeSet::new();
    // Half the specs are valid except for at most one field, the others anything.
    let clean = rng.random_bool(0.5);
    let spoiled = rng.random_range(0..7);
    let mut index = 0;
    let mut field = |spec: &mut Map<String, Value>,
                     key: &str,
                     required: bool,
                     nullable: bool,
                     v: (Value, bool),
                     rng: &mut StdRng| {
        index += 1;
        let mut v = v;
        let mut choice = rng.random_range(0..10);
        if clean && index != spoiled {
            // A valid value (or absent, for an optional field).
            while !v.1 {
                v = match key {
                    "leaseDurationSeconds" => (json!(rng.random_range(1..=3600)), true),
                    "failoverDelaySeconds" => (json!(rng.random_range(0..=3600)), true),
                    "paused" => (json!(rng.random_bool(0.5)), true),
                    _ => (json!(format!("db-{}", rng.random_range(0..1000))), true),
                };
            }
            if required && choice < 2 {
                choice = 2;
            }
        }
        match choice {
            // Absent.
            0 => {
                if required {
                    bad.insert(key.to_string());
                }
            }
            // Null: kept for nullable fields, pruned (then absent) for the others.
            1 => {
                spec.insert(key.into(), Value::Null);
                if required && !nullable {
                    bad.insert(key.to_string());
                }
            }
            _ => {
                if !v.1 {
                    bad.insert(key.to_string());
                }
                spec.insert(key.into(), v.0);
            }
        }
    };
    let v = name(rng);
    field(&mut spec, "statefulSetName", true, false, v, rng);
    let v = name(rng);
    field(&mut spec, "leaseName", true, false, v, rng);
    let v = int(rng, 1, 3600);
    field(&mut spec, "leaseDurationSeconds", true, false, v, rng);
    let v = int(rng, 0, 3600);
    field(&mut spec, "failoverDelaySeconds", false, true, v, rng);
    let v = name(rng);
    field(&mut spec, "preferredWriter", false, true, v, rng);
    let v = match rng.random_range(0..3) {
        0 => (json!("yes"), false),
        _ => (json!(rng.random_bool(0.5)), true),
    };
    field(&mut spec, "paused", false, false, v, rng);
    // Unknown fields are pruned, never an error.
    if rng.random_bool(0.3) {
        spec.insert("replicas".into(), json!(3));
    }
    (Value::Object(spec), bad)
}

#[test]
fn random_specs_are_rejected_exactly_where_the_crd_says_with_field_and_reason() {
    let crd = serde_json::to_value(StatefulSetLock::crd()).unwrap();
    let schema = Schema::compile(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
        .expect("the CRD's schema compiles");
    let mut rejected = 0;
    for seed in 0..5_000u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let (spec, bad) = spec(&mut rng);
        let mut obj = json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "lock", "namespace": "ns"},
            "spec": spec,
        });
        schema.prune(&mut obj);
        schema.apply_defaults(&mut obj);
        let causes = schema.validate(&obj, None);
        let mut fields = BTreeSet::new();
        for c in &causes {
            // As the apiserver does: when a field is invalid, the CEL rules are not run, and
            // one cause without a field says so.
            if c.field == "<nil>" && c.message.contains("some validation rules were not checked") {
                assert!(causes.len() > 1, "seed {seed}: {causes:?}");
                continue;
            }
            assert!(
                !c.reason.is_empty() && !c.message.is_empty(),
                "seed {seed}: a cause without reason or message: {c:?}"
            );
            let f = c
                .field
                .strip_prefix("spec.")
                .unwrap_or_else(|| panic!("seed {seed}: a cause outside spec: {c:?} for {obj}"));
            fields.insert(f.to_string());
        }
        assert_eq!(
            fields, bad,
            "seed {seed}: rejected fields differ from the CRD's rules for {}: {causes:#?}",
            obj["spec"]
        );
        rejected += usize::from(!causes.is_empty());
    }
    println!(
        "{rejected} of 5000 random specs rejected, every rejected field as the CRD's rules say"
    );
    // The generator reaches both sides.
    assert!(
        (1_000..4_900).contains(&rejected),
        "{rejected} of 5000 rejected"
    );
}
