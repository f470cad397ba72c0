//! Snapshot support as a cluster with several nodes has it: the VolumeSnapshot CRDs and
//! deploy/'s VolumeSnapshotClass, the cluster-wide snapshot-controller (distributed
//! snapshotting: each node's csi-snapshotter, started with its node plugin, takes the
//! snapshots of that node's volumes).

use std::path::Path;

use super::kube::Kubectl;
use super::procs::Daemon;
use super::{Cluster, REPO};

/// The VolumeSnapshot CRDs of deploy/'s snapshot `component`, established.
pub fn install_crds(kubectl: &Kubectl, component: &Path) {
    let crd = component.join("crd");
    kubectl.run(&["apply", "-k", crd.to_str().expect("utf-8 path")]);
    kubectl.run(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/volumesnapshots.snapshot.storage.k8s.io",
        "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
        "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
    ]);
}

impl Cluster {
    pub(super) fn start_snapshot_support(&mut self) {
        let component = Path::new(REPO).join("deploy/components/snapshot-controller");
        install_crds(&self.kubectl, &component);
        self.kubectl
            .apply_file(&component.join("volumesnapshotclass.yaml"));
        let kubeconfig = self.admin_kubeconfig.display().to_string();
        let mut controller = self.bin("snapshot-controller");
        controller
            .arg(format!("--kubeconfig={kubeconfig}"))
            .arg("--leader-election=false")
            .arg("--enable-distributed-snapshotting")
            .arg("--v=2");
        self.control_plane
            .push(Daemon::spawn("snapshot-controller", controller, &self.logs));
    }
}
