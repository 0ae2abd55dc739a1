// Command kube-controller-manager runs the Kubernetes controller manager from
// k8s.io/kubernetes at the version pinned in go.mod.
package main

import (
	"os"
	_ "time/tzdata" // CronJob time zones without the host's zoneinfo

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
