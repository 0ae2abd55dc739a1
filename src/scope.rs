//! Which namespaces this install handles: `--namespaces` (a fixed list) and/or
//! `--namespace-selector` (namespaces whose labels match, followed live by a watch).
//!
//! A lock outside the scope is never claimed, reconciled or renewed by this operator; its pods
//! and Lease are left exactly as they are. While the selector's watch has not listed the
//! namespaces yet, nothing is in scope — acting on a namespace not known to be included would
//! be the worse mistake.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

#[derive(Default)]
pub struct Scope {
    names: Option<HashSet<String>>,
    selector: Option<String>,
    selected: RwLock<HashSet<String>>,
    synced: AtomicBool,
}

impl Scope {
    pub fn new(names: &[String], selector: Option<&str>) -> Scope {
        let names: HashSet<String> = names
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        Scope {
            names: (!names.is_empty()).then_some(names),
            selector: selector
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
            ..Scope::default()
        }
    }

    /// Every namespace is in scope.
    pub fn all() -> Scope {
        Scope::default()
    }

    pub fn allows(&self, namespace: &str) -> bool {
        if let Some(names) = &self.names
            && !names.contains(namespace)
        {
            return false;
        }
        if self.selector.is_some() {
            return self.synced.load(Ordering::Acquire)
                && self
                    .selected
                    .read()
                    .map(|s| s.contains(namespace))
                    .unwrap_or(false);
        }
        true
    }

    /// Can `namespace` ever be in scope? Not when `--namespaces` lists others: that list is
    /// fixed for the process's life (a selector only narrows it further). The lock and
    /// StatefulSet watches drop such objects at the event, so a replica scoped to some
    /// namespaces caches nothing of the others. Under a selector alone every namespace may
    /// join later, and everything is kept.
    pub fn may_ever_allow(&self, namespace: &str) -> bool {
        self.names
            .as_ref()
            .is_none_or(|names| names.contains(namespace))
    }

    /// Is the scope known: no selector, or the selected namespaces have been listed?
    pub fn is_synced(&self) -> bool {
        self.selector.is_none() || self.synced.load(Ordering::Acquire)
    }

    /// A human description for logs.
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if let Some(n) = &self.names {
            let mut v: Vec<&str> = n.iter().map(String::as_str).collect();
            v.sort_unstable();
            parts.push(format!("namespaces {}", v.join(",")));
        }
        if let Some(s) = &self.selector {
            parts.push(format!("namespace selector {s:?}"));
        }
        if parts.is_empty() {
            "all namespaces".into()
        } else {
            parts.join(" and ")
        }
    }

    /// Follow the namespaces matching the selector (returns at once without one).
    pub async fn follow(&self, client: Client) {
        let Some(selector) = self.selector.clone() else {
            return;
        };
        let api: Api<Namespace> = Api::all(client);
        let mut buffer: HashSet<String> = HashSet::new();
        let mut events = watcher(api, crate::cache::watch::watch_config().labels(&selector))
            .backoff(crate::cache::watch::backoff())
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(ns)) => {
                    buffer.insert(ns.name_any());
                }
                Ok(watcher::Event::InitDone) => {
                    if let Ok(mut s) = self.selected.write() {
                        *s = std::mem::take(&mut buffer);
                        tracing::info!(selector = %selector, namespaces = s.len(), "namespace scope listed");
                    }
                    self.synced.store(true, Ordering::Release);
                }
                Ok(watcher::Event::Apply(ns)) => {
                    if let Ok(mut s) = self.selected.write()
                        && s.insert(ns.name_any())
                    {
                        tracing::info!(namespace = %ns.name_any(), "namespace entered the scope");
                    }
                }
                Ok(watcher::Event::Delete(ns)) => {
                    if let Ok(mut s) = self.selected.write()
                        && s.remove(&ns.name_any())
                    {
                        tracing::info!(namespace = %ns.name_any(), "namespace left the scope");
                    }
                }
                Err(e) => tracing::warn!(error = %e, selector = %selector, "namespace watch"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_list() {
        let s = Scope::new(&["a".into(), " b ".into(), "".into()], None);
        assert!(s.allows("a") && s.allows("b") && !s.allows("c"));
        assert!(Scope::all().allows("anything"));
        assert!(
            Scope::new(&[], Some("  ")).allows("x"),
            "a blank selector selects all"
        );
    }

    #[test]
    fn selector_allows_nothing_until_listed() {
        let s = Scope::new(&[], Some("team=a"));
        assert!(!s.allows("a"));
        s.selected.write().unwrap().insert("a".into());
        assert!(!s.allows("a"), "not before the first list completed");
        s.synced.store(true, Ordering::Release);
        assert!(s.allows("a") && !s.allows("b"));
        let both = Scope::new(&["b".into()], Some("team=a"));
        both.selected.write().unwrap().insert("a".into());
        both.synced.store(true, Ordering::Release);
        assert!(!both.allows("a") && !both.allows("b"), "both filters apply");
    }

    /// What the watches may drop at the event: only namespaces outside a fixed list.
    #[test]
    fn only_a_fixed_list_excludes_for_good() {
        let fixed = Scope::new(&["a".into()], Some("team=a"));
        assert!(fixed.may_ever_allow("a") && !fixed.may_ever_allow("b"));
        let selected = Scope::new(&[], Some("team=a"));
        assert!(
            selected.may_ever_allow("b") && !selected.allows("b"),
            "a namespace may be labelled into a selector's scope later"
        );
        assert!(Scope::all().may_ever_allow("anything"));
    }
}
