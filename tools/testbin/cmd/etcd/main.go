// Command etcd is etcd's own server main, built from the etcd v3.6.8 module
// that k8s.io/kubernetes v1.36.3 requires, for the project's test control plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
