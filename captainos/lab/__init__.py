"""The provisioning lab: the real Tinkerbell (Smee, tink server, the workflow controller, with
etcd and kube-apiserver embedded) in a sealed network namespace, VMs that netboot from it, and
the registry and artifact server they pull from. Building an image needs none of this."""
