"""The official Python Kubernetes client lists and watches pods against kubesim.

Usage: list_watch.py KUBECONFIG EXPECTED_PODS
Prints what it saw; exits non-zero when it did not see the expected pods.
"""
import sys

from kubernetes import client, config, watch


def main() -> int:
    kubeconfig, expected = sys.argv[1], int(sys.argv[2])
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()
    pods = v1.list_namespaced_pod("default", label_selector="app=db")
    names = sorted(p.metadata.name for p in pods.items)
    ready = [
        p.metadata.name
        for p in pods.items
        if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    ]
    print("listed", names, "ready", sorted(ready), "resourceVersion", pods.metadata.resource_version, flush=True)
    if len(names) != expected:
        return 1
    seen = set()
    w = watch.Watch()
    for ev in w.stream(v1.list_namespaced_pod, "default", label_selector="app=db", timeout_seconds=20):
        print("event", ev["type"], ev["object"].metadata.name, flush=True)
        seen.add(ev["object"].metadata.name)
        if len(seen) >= expected:
            w.stop()
    print("watched", sorted(seen), flush=True)
    return 0 if sorted(seen) == names else 2


if __name__ == "__main__":
    sys.exit(main())
