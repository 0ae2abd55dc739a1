//! The kinds kubesim serves: the built-in ones it knows from birth and the custom resources
//! registered by creating a `CustomResourceDefinition`.
//!
//! Every handler, discovery document and OpenAPI document is derived from this table, so a
//! kind exists for clients exactly when it is listed here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::schema::Schema;

/// Where the `.spec.replicas`-like fields of a scalable kind live.
#[derive(Debug, Clone)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// A custom resource's version as registered by its CRD.
#[derive(Clone)]
pub struct CrdVersion {
    pub schema: Option<Arc<Schema>>,
    pub raw_schema: Option<Value>,
    pub printer_columns: Option<Value>,
    pub crd_name: String,
}

impl std::fmt::Debug for CrdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdVersion")
            .field("crd_name", &self.crd_name)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub scale: Option<ScalePaths>,
    pub crd: Option<CrdVersion>,
    /// The store this kind's objects live in when it differs from its own (events.k8s.io
    /// Events are core Events converted on the way in and out, as in the real apiserver).
    pub storage: Option<(String, String)>,
    pub description: String,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `statefulsets.apps`: the name used in error messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The storage key: (group, plural) of where objects live.
    pub fn store_key(&self) -> (String, String) {
        self.storage
            .clone()
            .unwrap_or_else(|| (self.group.clone(), self.plural.clone()))
    }

    pub fn is_event_view(&self) -> bool {
        self.group == "events.k8s.io" && self.plural == "events"
    }
}

struct B {
    g: &'static str,
    v: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    scale: bool,
    all: bool,
    desc: &'static str,
}

const BUILTINS: &[B] = &[
    B {
        g: "",
        v: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        short: &["ns"],
        status: true,
        scale: false,
        all: false,
        desc: "Namespace provides a scope for Names. Use of multiple namespaces is optional.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        short: &["po"],
        status: true,
        scale: false,
        all: true,
        desc: "Pod is a collection of containers that can run on a host. This resource is created by clients and scheduled onto hosts.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        short: &["svc"],
        status: true,
        scale: false,
        all: true,
        desc: "Service is a named abstraction of software service (for example, mysql) consisting of local port (for example 3306) that the proxy listens on, and the selector that determines which pods will answer requests sent through the proxy.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        namespaced: true,
        short: &["ep"],
        status: false,
        scale: false,
        all: false,
        desc: "Endpoints is a collection of endpoints that implement the actual service.",
    },
    B {
        g: "",
        v: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
        short: &["cm"],
        status: false,
        scale: false,
        all: false,
        desc: "ConfigMap holds configuration data for pods to consume.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "Secret holds secret data of a certain type.",
    },
    B {
        g: "",
        v: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
        short: &["sa"],
        status: false,
        scale: false,
        all: false,
        desc: "ServiceAccount binds together a name, a principal that can be authenticated and authorized, and a set of secrets.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short: &["ev"],
        status: false,
        scale: false,
        all: false,
        desc: "Event is a report of an event somewhere in the cluster.",
    },
    B {
        g: "",
        v: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        short: &["no"],
        status: true,
        scale: false,
        all: false,
        desc: "Node is a worker node in Kubernetes.",
    },
    B {
        g: "",
        v: "v1",
        kind: "PersistentVolumeClaim",
        plural: "persistentvolumeclaims",
        namespaced: true,
        short: &["pvc"],
        status: true,
        scale: false,
        all: false,
        desc: "PersistentVolumeClaim is a user's request for and claim to a persistent volume",
    },
    B {
        g: "apps",
        v: "v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        namespaced: true,
        short: &["sts"],
        status: true,
        scale: true,
        all: true,
        desc: "StatefulSet represents a set of pods with consistent identities.",
    },
    B {
        g: "apps",
        v: "v1",
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
        short: &["deploy"],
        status: true,
        scale: true,
        all: true,
        desc: "Deployment enables declarative updates for Pods and ReplicaSets.",
    },
    B {
        g: "apps",
        v: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        namespaced: true,
        short: &["rs"],
        status: true,
        scale: true,
        all: true,
        desc: "ReplicaSet ensures that a specified number of pod replicas are running at any given time.",
    },
    B {
        g: "apps",
        v: "v1",
        kind: "ControllerRevision",
        plural: "controllerrevisions",
        namespaced: true,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "ControllerRevision implements an immutable snapshot of state data.",
    },
    B {
        g: "coordination.k8s.io",
        v: "v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "Lease defines a lease concept.",
    },
    B {
        g: "events.k8s.io",
        v: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short: &["ev"],
        status: false,
        scale: false,
        all: false,
        desc: "Event is a report of an event somewhere in the cluster. It generally denotes some state change in the system.",
    },
    B {
        g: "apiextensions.k8s.io",
        v: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        namespaced: false,
        short: &["crd", "crds"],
        status: true,
        scale: false,
        all: false,
        desc: "CustomResourceDefinition represents a resource that should be exposed on the API server.",
    },
    B {
        g: "rbac.authorization.k8s.io",
        v: "v1",
        kind: "Role",
        plural: "roles",
        namespaced: true,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "Role is a namespaced, logical grouping of PolicyRules that can be referenced as a unit by a RoleBinding.",
    },
    B {
        g: "rbac.authorization.k8s.io",
        v: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        namespaced: true,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "RoleBinding references a role, but does not contain it.",
    },
    B {
        g: "rbac.authorization.k8s.io",
        v: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        namespaced: false,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "ClusterRole is a cluster level, logical grouping of PolicyRules.",
    },
    B {
        g: "rbac.authorization.k8s.io",
        v: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        namespaced: false,
        short: &[],
        status: false,
        scale: false,
        all: false,
        desc: "ClusterRoleBinding references a ClusterRole, but not contain it.",
    },
    B {
        g: "policy",
        v: "v1",
        kind: "PodDisruptionBudget",
        plural: "poddisruptionbudgets",
        namespaced: true,
        short: &["pdb"],
        status: true,
        scale: false,
        all: false,
        desc: "PodDisruptionBudget is an object to define the max disruption that can be caused to a collection of pods",
    },
    B {
        g: "networking.k8s.io",
        v: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        namespaced: true,
        short: &["netpol"],
        status: false,
        scale: false,
        all: false,
        desc: "NetworkPolicy describes what network traffic is allowed for a set of Pods",
    },
];

/// All served kinds, keyed by (group, version, plural).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        for b in BUILTINS {
            let scale = b.scale.then(|| ScalePaths {
                spec_replicas: ".spec.replicas".into(),
                status_replicas: ".status.replicas".into(),
                label_selector: Some(".status.selector".into()),
            });
            let storage = (b.g == "events.k8s.io").then(|| (String::new(), "events".to_string()));
            r.insert(ResourceType {
                group: b.g.into(),
                version: b.v.into(),
                kind: b.kind.into(),
                plural: b.plural.into(),
                singular: b.kind.to_lowercase(),
                namespaced: b.namespaced,
                short_names: b.short.iter().map(|s| s.to_string()).collect(),
                categories: if b.all { vec!["all".into()] } else { vec![] },
                status: b.status,
                scale,
                crd: None,
                storage,
                description: b.desc.into(),
            });
        }
        r
    }

    pub fn insert(&mut self, rt: ResourceType) {
        self.types.insert(
            (rt.group.clone(), rt.version.clone(), rt.plural.clone()),
            Arc::new(rt),
        );
    }

    /// Drop every version served for a CRD (by CRD name).
    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types
            .retain(|_, rt| rt.crd.as_ref().is_none_or(|c| c.crd_name != crd_name));
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Find the served type whose storage is (group, plural): any version of it.
    pub fn by_store_key(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|rt| rt.storage.is_none() && rt.group == group && rt.plural == plural)
            .cloned()
    }

    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.types
            .values()
            .find(|rt| rt.api_version() == api_version && rt.kind == kind)
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// (group, [versions]) in a stable order; the core group is excluded.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rt in self.types.values() {
            if rt.group.is_empty() {
                continue;
            }
            let versions = out.entry(rt.group.clone()).or_default();
            if !versions.contains(&rt.version) {
                versions.push(rt.version.clone());
            }
        }
        out.into_iter().collect()
    }

    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Arc<ResourceType>> + 'a {
        self.types
            .values()
            .filter(move |rt| rt.group == group && rt.version == version)
    }
}
