//go:build tools

// Package testbin pins the Kubernetes control-plane commands that
// scripts/build-test-servers.sh builds for the test suite. The blank imports
// keep them (and their dependencies) in go.mod and go.sum; they are built with
// `go build k8s.io/kubernetes/cmd/<name>` from this module.
package testbin

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
