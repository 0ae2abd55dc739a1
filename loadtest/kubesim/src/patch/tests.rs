use super::*;
use serde_json::json;

fn smp(target: Value, patch: Value) -> Value {
    strategic_merge_patch(&target, &patch).unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap())
        .collect()
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "db-0",
            "namespace": "default",
            "labels": {"app": "db", "sts-role": "reader"},
            "finalizers": ["a.example.com/keep"],
        },
        "spec": {
            "containers": [
                {"name": "db", "image": "postgres:16", "args": ["-c", "fsync=on"],
                 "ports": [{"containerPort": 5432, "name": "pg"}],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "exporter", "image": "exporter:1"},
            ],
            "tolerations": [{"key": "k", "operator": "Exists"}],
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    })
}

// --- strategic merge patch -----------------------------------------------------------

#[test]
fn label_patch_merges_into_labels() {
    let out = smp(
        pod(),
        json!({"metadata": {"labels": {"sts-role": "writer"}}}),
    );
    assert_eq!(
        out["metadata"]["labels"],
        json!({"app": "db", "sts-role": "writer"})
    );
    assert_eq!(out["spec"], pod()["spec"]);
}

#[test]
fn null_removes_a_label_and_unmatched_null_is_ignored() {
    let out = smp(
        pod(),
        json!({"metadata": {"labels": {"sts-role": null, "absent": null}}}),
    );
    assert_eq!(out["metadata"]["labels"], json!({"app": "db"}));
}

#[test]
fn annotate_creates_missing_map() {
    let out = smp(
        pod(),
        json!({"metadata": {"annotations": {"note": "x", "gone": null}}}),
    );
    assert_eq!(out["metadata"]["annotations"], json!({"note": "x"}));
}

#[test]
fn status_patch_updates_only_the_named_condition() {
    let out = smp(
        pod(),
        json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    );
    assert_eq!(
        out["status"]["conditions"],
        json!([
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "False", "lastTransitionTime": "t0"},
            {"type": "ContainersReady", "status": "True"},
            {"type": "PodScheduled", "status": "True"},
        ])
    );
    assert_eq!(out["status"]["phase"], "Running");
}

fn statefulset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db", "annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {
            "replicas": 3,
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "containers": [
                        {"name": "db", "image": "postgres:16",
                         "env": [{"name": "A", "value": "1"}],
                         "resources": {}, "terminationMessagePath": "/dev/termination-log"},
                        {"name": "exporter", "image": "exporter:1"},
                    ],
                    "restartPolicy": "Always",
                },
            },
        },
    })
}

#[test]
fn kubectl_apply_three_way_patch_changes_one_image() {
    let patch = json!({
        "metadata": {"annotations": {
            "kubectl.kubernetes.io/last-applied-configuration": "{\"new\":1}"}},
        "spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "db"}, {"name": "exporter"}],
            "containers": [{"image": "postgres:17", "name": "db"}],
        }}},
    });
    let out = smp(statefulset(), patch);
    let containers = &out["spec"]["template"]["spec"]["containers"];
    assert_eq!(names(containers), ["db", "exporter"]);
    assert_eq!(containers[0]["image"], "postgres:17");
    assert_eq!(containers[0]["env"], json!([{"name": "A", "value": "1"}]));
    assert_eq!(
        containers[0]["terminationMessagePath"],
        "/dev/termination-log"
    );
    assert_eq!(
        containers[1],
        json!({"name": "exporter", "image": "exporter:1"})
    );
    assert_eq!(out["spec"]["replicas"], 3);
    assert_eq!(
        out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
        "{\"new\":1}"
    );
    assert!(!out.to_string().contains('$'));
}

#[test]
fn set_element_order_reorders_and_adds() {
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "exporter"}, {"name": "db"}],
        "containers": [{"name": "sidecar", "image": "busybox"}],
    }}}});
    let out = smp(statefulset(), patch);
    assert_eq!(
        names(&out["spec"]["template"]["spec"]["containers"]),
        ["sidecar", "exporter", "db"]
    );
}

#[test]
fn set_element_order_keeps_server_only_elements_in_live_position() {
    let live = json!({"spec": {"containers": [
        {"name": "a"}, {"name": "injected"}, {"name": "b"}]}});
    let patch = json!({"spec": {
        "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
        "containers": [{"name": "b", "image": "b:2"}],
    }});
    let out = smp(live, patch);
    assert_eq!(names(&out["spec"]["containers"]), ["a", "injected", "b"]);
    assert_eq!(out["spec"]["containers"][2]["image"], "b:2");
}

#[test]
fn set_element_order_that_contradicts_the_patch_is_rejected() {
    let live = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
    let patch = json!({"spec": {
        "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
        "containers": [{"name": "b"}, {"name": "a"}],
    }});
    let err = strategic_merge_patch(&live, &patch).unwrap_err();
    assert!(
        matches!(err, PatchError::SetElementOrderMismatch { .. }),
        "{err}"
    );
}

#[test]
fn new_element_without_order_goes_first_as_in_the_apiserver() {
    let live = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
    let out = smp(live, json!({"spec": {"containers": [{"name": "c"}]}}));
    assert_eq!(names(&out["spec"]["containers"]), ["c", "a", "b"]);
}

#[test]
fn patch_order_wins_over_live_order() {
    let live = json!({"spec": {"containers": [{"name": "1"}, {"name": "2"}, {"name": "3"}]}});
    let out = smp(
        live,
        json!({"spec": {"containers": [{"name": "3", "x": 1}, {"name": "1", "x": 2}]}}),
    );
    assert_eq!(names(&out["spec"]["containers"]), ["2", "3", "1"]);
}

#[test]
fn swapping_a_container_orders_like_the_apiserver() {
    // kubectl apply replacing "old" by "new" next to a container the server injected.
    let live = json!({"spec": {"containers": [
        {"name": "old"}, {"name": "app"}, {"name": "injected"}]}});
    let patch = json!({"spec": {
        "$setElementOrder/containers": [{"name": "app"}, {"name": "new"}],
        "containers": [{"name": "new", "image": "n"}, {"$patch": "delete", "name": "old"}],
    }});
    let out = smp(live, patch);
    assert_eq!(
        names(&out["spec"]["containers"]),
        ["app", "injected", "new"]
    );
}

#[test]
fn patch_delete_removes_a_container() {
    let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "db"}],
        "containers": [{"$patch": "delete", "name": "exporter"}],
    }}}});
    let out = smp(statefulset(), patch);
    assert_eq!(
        names(&out["spec"]["template"]["spec"]["containers"]),
        ["db"]
    );
}

#[test]
fn patch_replace_in_a_list_replaces_it() {
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"$patch": "replace"}, {"name": "only", "image": "x", "bogus": null},
    ]}}}});
    let out = smp(statefulset(), patch);
    assert_eq!(
        out["spec"]["template"]["spec"]["containers"],
        json!([{"name": "only", "image": "x"}])
    );
}

#[test]
fn patch_merge_in_a_list_is_rejected() {
    let patch = json!({"spec": {"containers": [{"$patch": "merge", "name": "a"}]}});
    let err = strategic_merge_patch(&pod(), &patch).unwrap_err();
    assert!(matches!(err, PatchError::ListMergeDirective));
}

#[test]
fn patch_replace_and_delete_on_maps() {
    let out = smp(
        pod(),
        json!({"metadata": {"labels": {"$patch": "replace", "only": "this"}}}),
    );
    assert_eq!(out["metadata"]["labels"], json!({"only": "this"}));

    let out = smp(pod(), json!({"metadata": {"labels": {"$patch": "delete"}}}));
    assert!(out["metadata"].get("labels").is_none());
    assert_eq!(out["metadata"]["name"], "db-0");

    let out = smp(pod(), json!({"$patch": "replace", "kind": "Pod"}));
    assert_eq!(out, json!({"kind": "Pod"}));
}

#[test]
fn unknown_patch_directive_is_an_error() {
    let err =
        strategic_merge_patch(&pod(), &json!({"metadata": {"$patch": "explode"}})).unwrap_err();
    assert!(matches!(err, PatchError::UnknownPatchDirective { .. }));
    assert!(err.to_string().contains("explode"), "{err}");

    let patch = json!({"spec": {"containers": [{"$patch": "nope", "name": "db"}]}});
    assert!(matches!(
        strategic_merge_patch(&pod(), &patch),
        Err(PatchError::UnknownPatchDirective { .. })
    ));
}

#[test]
fn finalizers_are_unioned() {
    let out = smp(
        pod(),
        json!({"metadata": {"finalizers": ["b.example.com/x", "a.example.com/keep"]}}),
    );
    let finalizers = out["metadata"]["finalizers"].as_array().unwrap();
    assert_eq!(finalizers.len(), 2);
    assert!(finalizers.contains(&json!("a.example.com/keep")));
    assert!(finalizers.contains(&json!("b.example.com/x")));

    // With the order kubectl sends, live comes first and the new one follows.
    let out = smp(
        pod(),
        json!({"metadata": {
            "$setElementOrder/finalizers": ["a.example.com/keep", "b.example.com/x"],
            "finalizers": ["b.example.com/x"],
        }}),
    );
    assert_eq!(
        out["metadata"]["finalizers"],
        json!(["a.example.com/keep", "b.example.com/x"])
    );
}

#[test]
fn delete_from_primitive_list() {
    let live = json!({"metadata": {"finalizers": ["a", "b", "c"]}});
    let out = smp(
        live.clone(),
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b", "zzz"]}}),
    );
    assert_eq!(out["metadata"]["finalizers"], json!(["a", "c"]));
    // Deleting from a list that does not exist does not create it.
    let out = smp(
        json!({"metadata": {}}),
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]}}),
    );
    assert_eq!(out, json!({"metadata": {}}));
}

#[test]
fn other_primitive_lists_and_unkeyed_lists_are_replaced() {
    let patch = json!({"spec": {
        "containers": [{"name": "db", "args": ["-c", "fsync=off"]}],
        "tolerations": [{"key": "other", "operator": "Exists"}],
    }});
    let out = smp(pod(), patch);
    assert_eq!(
        out["spec"]["containers"][0]["args"],
        json!(["-c", "fsync=off"])
    );
    assert_eq!(
        out["spec"]["tolerations"],
        json!([{"key": "other", "operator": "Exists"}])
    );
    // An empty merging list changes nothing; an empty atomic list empties it.
    let out = smp(
        pod(),
        json!({"spec": {"containers": [], "tolerations": []}}),
    );
    assert_eq!(out["spec"]["containers"], pod()["spec"]["containers"]);
    assert_eq!(out["spec"]["tolerations"], json!([]));
}

#[test]
fn nested_lists_merge_by_their_own_keys() {
    let patch = json!({"spec": {"containers": [{"name": "db",
        "env": [{"name": "B", "value": "20"}, {"name": "A", "$patch": "delete"}],
        "ports": [{"containerPort": 9187, "name": "metrics"}],
    }]}});
    let out = smp(pod(), patch);
    let db = &out["spec"]["containers"][0];
    assert_eq!(db["env"], json!([{"name": "B", "value": "20"}]));
    let ports: Vec<_> = db["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [9187, 5432]);
}

#[test]
fn service_ports_merge_on_port() {
    let svc = json!({"spec": {"ports": [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "https", "port": 443, "targetPort": 8443},
    ]}});
    let out = smp(
        svc,
        json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
    );
    assert_eq!(
        out["spec"]["ports"],
        json!([
            {"name": "http", "port": 80, "targetPort": 9090},
            {"name": "https", "port": 443, "targetPort": 8443},
        ])
    );
}

#[test]
fn retain_keys_clears_unlisted_fields() {
    let live = json!({"spec": {"strategy": {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
    let patch = json!({"spec": {"strategy": {
        "$retainKeys": ["type"], "type": "Recreate"}}});
    let out = smp(live.clone(), patch);
    assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));

    let bad = json!({"spec": {"strategy": {"$retainKeys": ["type"], "other": 1}}});
    assert!(matches!(
        strategic_merge_patch(&live, &bad),
        Err(PatchError::RetainKeysMismatch(field)) if field == "other"
    ));
}

#[test]
fn retain_keys_in_volume_elements() {
    let live = json!({"spec": {"volumes": [
        {"name": "data", "emptyDir": {}},
        {"name": "cfg", "configMap": {"name": "c"}},
    ]}});
    let patch = json!({"spec": {
        "$setElementOrder/volumes": [{"name": "data"}, {"name": "cfg"}],
        "volumes": [{"$retainKeys": ["name", "persistentVolumeClaim"], "name": "data",
                     "persistentVolumeClaim": {"claimName": "pvc"}, "emptyDir": null}],
    }});
    let out = smp(live, patch);
    assert_eq!(
        out["spec"]["volumes"],
        json!([
            {"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
            {"name": "cfg", "configMap": {"name": "c"}},
        ])
    );
}

#[test]
fn directives_never_reach_the_result() {
    let patch = json!({"spec": {"containers": [{"name": "new", "image": "x",
        "$setElementOrder/env": [{"name": "E"}],
        "env": [{"name": "E", "value": "1"}, {"name": "F", "$patch": "delete"}],
        "resources": {"$patch": "replace", "limits": {"cpu": "1"}},
    }]}});
    let out = smp(pod(), patch);
    assert!(!out.to_string().contains("$patch"), "{out}");
    assert!(!out.to_string().contains("$setElementOrder"), "{out}");
    let new = &out["spec"]["containers"][0];
    assert_eq!(new["name"], "new");
    assert_eq!(new["env"], json!([{"name": "E", "value": "1"}]));
    assert_eq!(new["resources"], json!({"limits": {"cpu": "1"}}));
}

#[test]
fn missing_merge_key_is_an_error() {
    let patch = json!({"spec": {"containers": [{"image": "x"}]}});
    let err = strategic_merge_patch(&pod(), &patch).unwrap_err();
    assert!(
        matches!(err, PatchError::MissingMergeKey { key: "name", .. }),
        "{err}"
    );
}

#[test]
fn type_changes_replace_the_value() {
    let out = smp(
        json!({"a": "text", "b": {"x": 1}}),
        json!({"a": {"k": "v", "n": null}, "b": "flat"}),
    );
    assert_eq!(out, json!({"a": {"k": "v"}, "b": "flat"}));
}

#[test]
fn non_object_patch_is_rejected_and_null_target_is_empty() {
    assert!(matches!(
        strategic_merge_patch(&pod(), &json!([1])),
        Err(PatchError::NotAnObject)
    ));
    assert_eq!(smp(Value::Null, json!({"a": 1})), json!({"a": 1}));
}

#[test]
fn smp_does_not_touch_inputs_and_is_idempotent_for_labels() {
    let live = pod();
    let patch = json!({"metadata": {"labels": {"sts-role": "writer"}}});
    let once = smp(live.clone(), patch.clone());
    let twice = smp(once.clone(), patch);
    assert_eq!(once, twice);
    assert_eq!(live, pod());
}

// --- JSON patch ----------------------------------------------------------------------

#[test]
fn json_patch_add_replace_remove_test() {
    let patch = json!([
        {"op": "test", "path": "/metadata/labels/app", "value": "db"},
        {"op": "add", "path": "/metadata/labels/sts-role", "value": "writer"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "postgres:17"},
        {"op": "remove", "path": "/spec/tolerations"},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "z"},
    ]);
    let out = json_patch(&pod(), &patch).unwrap();
    assert_eq!(out["metadata"]["labels"]["sts-role"], "writer");
    assert_eq!(out["spec"]["containers"][0]["image"], "postgres:17");
    assert!(out["spec"].get("tolerations").is_none());
    assert_eq!(
        out["metadata"]["finalizers"],
        json!(["a.example.com/keep", "z"])
    );
}

#[test]
fn json_patch_failing_test_is_an_error() {
    let patch = json!([
        {"op": "add", "path": "/metadata/labels/x", "value": "1"},
        {"op": "test", "path": "/metadata/labels/app", "value": "web"},
    ]);
    let err = json_patch(&pod(), &patch).unwrap_err();
    assert!(
        matches!(&err, PatchError::TestFailed { operation: 1, path } if path == "/metadata/labels/app"),
        "{err}"
    );
}

#[test]
fn json_patch_missing_path_and_bad_documents() {
    let err = json_patch(&pod(), &json!([{"op": "remove", "path": "/metadata/nope"}])).unwrap_err();
    assert!(
        matches!(err, PatchError::PathNotFound { operation: 0, .. }),
        "{err}"
    );
    let err = json_patch(
        &pod(),
        &json!([{"op": "replace", "path": "/spec/nope", "value": 1}]),
    )
    .unwrap_err();
    assert!(matches!(err, PatchError::PathNotFound { .. }), "{err}");
    let err = json_patch(&pod(), &json!({"op": "add"})).unwrap_err();
    assert!(matches!(err, PatchError::InvalidJsonPatch(_)), "{err}");
    let err = json_patch(&pod(), &json!([{"op": "frobnicate", "path": "/a"}])).unwrap_err();
    assert!(matches!(err, PatchError::InvalidJsonPatch(_)), "{err}");
    let err = json_patch(
        &pod(),
        &json!([{"op": "move", "from": "/nope", "path": "/a"}]),
    )
    .unwrap_err();
    assert!(matches!(err, PatchError::JsonPatchFailed { .. }), "{err}");
}

// --- merge patch ---------------------------------------------------------------------

#[test]
fn merge_patch_merges_maps_deletes_nulls_and_replaces_lists() {
    let patch = json!({
        "metadata": {"labels": {"sts-role": null, "new": "1"}},
        "spec": {"containers": [{"name": "only"}]},
    });
    let out = merge_patch(&pod(), &patch).unwrap();
    assert_eq!(out["metadata"]["labels"], json!({"app": "db", "new": "1"}));
    assert_eq!(out["spec"]["containers"], json!([{"name": "only"}]));
    assert_eq!(out["spec"]["tolerations"], pod()["spec"]["tolerations"]);
}

#[test]
fn merge_patch_non_object_replaces_document() {
    assert_eq!(merge_patch(&pod(), &json!([1, 2])).unwrap(), json!([1, 2]));
}

// --- server-side apply ---------------------------------------------------------------

#[test]
fn apply_creates_from_the_applied_configuration() {
    let applied = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "c", "labels": {"a": "1", "b": null}},
        "data": {"k": "v"},
    });
    let out = server_side_apply(None, &applied).unwrap();
    assert_eq!(
        out,
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"a": "1"}},
            "data": {"k": "v"},
        })
    );
}

#[test]
fn apply_merges_labels_containers_by_name_and_replaces_args() {
    let applied = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-0", "labels": {"sts-role": "writer", "tier": "data"}},
        "spec": {"containers": [
            {"name": "db", "image": "postgres:17", "args": ["-c", "fsync=off"]},
            {"name": "sidecar", "image": "busybox"},
        ]},
    });
    let out = server_side_apply(Some(&pod()), &applied).unwrap();
    assert_eq!(
        out["metadata"]["labels"],
        json!({"app": "db", "sts-role": "writer", "tier": "data"})
    );
    let containers = &out["spec"]["containers"];
    assert_eq!(names(containers), ["db", "exporter", "sidecar"]);
    assert_eq!(containers[0]["image"], "postgres:17");
    assert_eq!(containers[0]["args"], json!(["-c", "fsync=off"]));
    assert_eq!(containers[0]["env"], pod()["spec"]["containers"][0]["env"]);
    assert_eq!(containers[1], pod()["spec"]["containers"][1]);
    assert_eq!(out["spec"]["tolerations"], pod()["spec"]["tolerations"]);
    assert_eq!(out["status"], pod()["status"]);
}

#[test]
fn apply_null_removes_and_atomic_lists_are_replaced() {
    let applied = json!({
        "metadata": {"labels": {"app": null}},
        "spec": {"tolerations": [{"key": "new", "operator": "Exists"}]},
    });
    let out = server_side_apply(Some(&pod()), &applied).unwrap();
    assert_eq!(out["metadata"]["labels"], json!({"sts-role": "reader"}));
    assert_eq!(
        out["spec"]["tolerations"],
        json!([{"key": "new", "operator": "Exists"}])
    );
}

#[test]
fn apply_list_order_follows_structured_merge_diff() {
    let live = json!({"spec": {"containers": [
        {"name": "a"}, {"name": "b"}, {"name": "c"}]}});
    // Shared elements take the applied order, new ones follow the shared one before them,
    // live-only ones keep their place.
    let applied = json!({"spec": {"containers": [
        {"name": "c"}, {"name": "new"}, {"name": "a"}]}});
    let out = server_side_apply(Some(&live), &applied).unwrap();
    assert_eq!(names(&out["spec"]["containers"]), ["b", "c", "new", "a"]);

    let applied = json!({"spec": {"containers": [{"name": "z"}]}});
    let out = server_side_apply(Some(&live), &applied).unwrap();
    assert_eq!(names(&out["spec"]["containers"]), ["a", "b", "c", "z"]);
}

#[test]
fn apply_unions_finalizers_and_merges_conditions() {
    let applied = json!({
        "metadata": {"finalizers": ["b.example.com/x"]},
        "status": {"conditions": [{"type": "Ready", "status": "False"}]},
    });
    let out = server_side_apply(Some(&pod()), &applied).unwrap();
    assert_eq!(
        out["metadata"]["finalizers"],
        json!(["a.example.com/keep", "b.example.com/x"])
    );
    let conditions = out["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 4);
    assert_eq!(
        conditions[1],
        json!({"type": "Ready", "status": "False", "lastTransitionTime": "t0"})
    );
}

#[test]
fn apply_keys_ports_on_port_and_protocol() {
    let live = json!({"spec": {"containers": [{"name": "dns", "ports": [
        {"containerPort": 53, "protocol": "UDP", "name": "dns"}]}]}});
    let applied = json!({"spec": {"containers": [{"name": "dns", "ports": [
        {"containerPort": 53, "protocol": "UDP", "name": "dns"},
        {"containerPort": 53, "name": "dns-tcp"}]}]}});
    let out = server_side_apply(Some(&live), &applied).unwrap();
    assert_eq!(
        out["spec"]["containers"][0]["ports"],
        json!([
            {"containerPort": 53, "protocol": "UDP", "name": "dns"},
            {"containerPort": 53, "name": "dns-tcp"},
        ])
    );
    let dup = json!({"spec": {"ports": [
        {"port": 80, "protocol": "TCP"}, {"port": 80}]}});
    assert!(matches!(
        server_side_apply(None, &dup),
        Err(PatchError::DuplicateListEntry { .. })
    ));
}

#[test]
fn apply_rejects_duplicates_missing_keys_and_non_objects() {
    let dup = json!({"spec": {"containers": [{"name": "a"}, {"name": "a"}]}});
    assert!(matches!(
        server_side_apply(Some(&pod()), &dup),
        Err(PatchError::DuplicateListEntry { .. })
    ));
    let missing = json!({"spec": {"containers": [{"image": "x"}]}});
    assert!(matches!(
        server_side_apply(Some(&pod()), &missing),
        Err(PatchError::MissingMergeKey { .. })
    ));
    assert!(matches!(
        server_side_apply(None, &json!("x")),
        Err(PatchError::NotAnObject)
    ));
}
