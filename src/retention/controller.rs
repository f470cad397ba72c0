//! kube::runtime wiring: watches, the reconcile loop and the execution of planned actions.
//!
//! One `Controller` over StatefulSets. Pods (by their controller reference), claims, PVs and
//! nodes trigger the sets they concern; each kind is watched once and its store is shared with
//! the reconciler. A reconcile plans from the caches, confirms missing nodes with an uncached GET,
//! re-reads the set uncached before any write (and replans if it moved), then executes.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, Preconditions,
};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::builtin::BuiltinRule;
use super::migration_record::{staging_source, MIGRATION_LABEL};
use super::names::claim_identity;
use super::nodeloss::{pv_driver, NodeView};
use super::policy::{self, Action, Note, Observed, Options, Plan, Regarding, SnapshotState};
use super::retention_metrics::Metrics;
use crate::topology::pinned_node;

/// Label the StatefulSet controller puts on every pod it makes; narrows the pod watch.
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// Reporting controller name on events.
pub const REPORTER: &str = "kennel-retention";

#[derive(Clone, Debug)]
pub struct Settings {
    pub builtin: BuiltinRule,
    pub sweep_orphaned_claims: bool,
    pub node_loss_grace: Duration,
    pub snapshot_class: String,
    pub driver_name: String,
    pub resync_interval: Duration,
}

/// Everything a reconcile needs, injected so tests can use a mock API and filled stores.
pub struct Context {
    pub client: Client,
    pub claims: Store<PersistentVolumeClaim>,
    pub pods: Store<Pod>,
    pub volumes: Store<PersistentVolume>,
    pub nodes: Store<Node>,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: fn() -> Timestamp,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{verb} {object}: {source}")]
    Api {
        verb: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object} changed since it was read; planning again")]
    Conflict { object: String },
    #[error("StatefulSet without name or namespace")]
    Incomplete,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api { .. } => "api",
            Error::Conflict { .. } => "conflict",
            Error::Incomplete => "incomplete",
        }
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Maps an API error of a write: 404 means there is nothing left to do, 409 is a conflict.
fn write_result<T>(
    r: Result<T, kube::Error>,
    verb: &'static str,
    object: String,
) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if status_code(&e) == Some(404) => {
            debug!(%object, "{verb}: already gone");
            Ok(())
        }
        Err(e) if status_code(&e) == Some(409) => Err(Error::Conflict { object }),
        Err(source) => Err(Error::Api {
            verb,
            object,
            source,
        }),
    }
}

impl Context {
    fn options(&self, set: &StatefulSet) -> Options {
        Options {
            builtin: self.settings.builtin.enforces(set),
            sweep_orphaned_claims: self.settings.sweep_orphaned_claims,
            node_loss_grace: self.settings.node_loss_grace,
            driver_name: self.settings.driver_name.clone(),
            snapshot_class: self.settings.snapshot_class.clone(),
            now: (self.clock)(),
        }
    }

    /// Plans for `set` from the caches, confirming nodes missing from the cache with a GET.
    async fn plan_for(
        &self,
        set: &StatefulSet,
        ns: &str,
        nodes: &mut NodeView,
    ) -> Result<Plan, Error> {
        let claims = self
            .claims
            .state_filter(|c| c.namespace().as_deref() == Some(ns));
        let pods = self
            .pods
            .state_filter(|p| p.namespace().as_deref() == Some(ns));
        let driver = self.settings.driver_name.as_str();
        let volumes = self
            .volumes
            .state_filter(|pv| pv_driver(pv) == Some(driver));
        let claims: Vec<&PersistentVolumeClaim> = claims.iter().map(AsRef::as_ref).collect();
        let pods: Vec<&Pod> = pods.iter().map(AsRef::as_ref).collect();
        let volumes: Vec<&PersistentVolume> = volumes.iter().map(AsRef::as_ref).collect();
        let opts = self.options(set);
        let mut snapshots = Vec::new();
        let mut plan = policy::plan(
            Observed {
                set,
                claims: &claims,
                pods: &pods,
                volumes: &volumes,
                nodes,
                snapshots: &snapshots,
            },
            &opts,
        );
        // Evidence of node loss is read uncached: a lagging watch must never delete a claim.
        let confirm = !plan.unconfirmed_nodes.is_empty();
        if confirm {
            self.confirm_nodes(&plan, nodes).await?;
        }
        if plan.needs_snapshots {
            snapshots = migration_snapshots(&self.client, ns).await?;
        }
        if confirm || plan.needs_snapshots {
            plan = policy::plan(
                Observed {
                    set,
                    claims: &claims,
                    pods: &pods,
                    volumes: &volumes,
                    nodes,
                    snapshots: &snapshots,
                },
                &opts,
            );
        }
        Ok(plan)
    }

    /// Reads the nodes `plan` asks about, uncached, into `nodes`.
    async fn confirm_nodes(&self, plan: &Plan, nodes: &mut NodeView) -> Result<(), Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        for name in &plan.unconfirmed_nodes {
            match api.get_opt(name).await {
                Ok(Some(node)) => nodes.insert_fresh(&node),
                Ok(None) => nodes.confirm_gone(name),
                Err(source) => {
                    return Err(Error::Api {
                        verb: "get",
                        object: format!("node {name}"),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// The object an event is about; the set is the related object of every other event.
    fn reference(&self, set: &StatefulSet, ns: &str, regarding: &Regarding) -> ObjectReference {
        let core = |kind: &str, name: &str, namespace: Option<&str>, uid: Option<String>| {
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
                name: Some(name.into()),
                namespace: namespace.map(str::to_owned),
                uid,
                ..Default::default()
            }
        };
        match regarding {
            Regarding::StatefulSet => set.object_ref(&()),
            Regarding::Claim(name) => core(
                "PersistentVolumeClaim",
                name,
                Some(ns),
                self.claims
                    .get(&ObjectRef::new(name).within(ns))
                    .and_then(|c| c.metadata.uid.clone()),
            ),
            Regarding::Pod(name) => core(
                "Pod",
                name,
                Some(ns),
                self.pods
                    .get(&ObjectRef::new(name).within(ns))
                    .and_then(|p| p.metadata.uid.clone()),
            ),
            Regarding::Volume(name) => core(
                "PersistentVolume",
                name,
                None,
                self.volumes
                    .get(&ObjectRef::new(name))
                    .and_then(|pv| pv.metadata.uid.clone()),
            ),
        }
    }

    /// Logs the note, then publishes it as an Event. Called before the writes it announces.
    async fn publish(&self, set: &StatefulSet, ns: &str, note: &Note) {
        let set_name = set.name_any();
        if note.warning {
            warn!(%ns, set = %set_name, reason = note.reason, action = note.action, "{}", note.message);
        } else {
            info!(%ns, set = %set_name, reason = note.reason, action = note.action, "{}", note.message);
        }
        let reference = self.reference(set, ns, &note.regarding);
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.clone()),
            action: note.action.into(),
            secondary: (note.regarding != Regarding::StatefulSet).then(|| set.object_ref(&())),
        };
        // Events are reports, not state: a failed publish must not undo or block the writes.
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(reason = note.reason, error = %e, "could not publish event");
        }
    }

    async fn execute(&self, set: &StatefulSet, ns: &str, action: &Action) -> Result<(), Error> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
        let (kind, result) = match action {
            Action::Event(note) => {
                self.publish(set, ns, note).await;
                return Ok(());
            }
            Action::SetClaimOwners {
                claim,
                resource_version,
                owner_references,
            } => {
                let r = conditional_patch(
                    &claims,
                    claim,
                    resource_version,
                    "ownerReferences",
                    json!(owner_references),
                )
                .await;
                (
                    "claim_owners",
                    write_result(r, "patch", format!("claim {ns}/{claim}")),
                )
            }
            Action::SetClaimAnnotation {
                claim,
                resource_version,
                key,
                value,
            } => {
                let r = conditional_patch(
                    &claims,
                    claim,
                    resource_version,
                    "annotations",
                    json!({ *key: value }),
                )
                .await;
                (
                    "claim_annotation",
                    write_result(r, "patch", format!("claim {ns}/{claim}")),
                )
            }
            Action::DeleteClaim {
                claim,
                uid,
                resource_version,
            } => {
                let dp = preconditions(uid, Some(resource_version));
                let r = claims.delete(claim, &dp).await;
                (
                    "claim_delete",
                    write_result(r, "delete", format!("claim {ns}/{claim}")),
                )
            }
            Action::DeletePod { pod, uid } => {
                let r = pods.delete(pod, &preconditions(uid, None)).await;
                (
                    "pod_delete",
                    write_result(r, "delete", format!("pod {ns}/{pod}")),
                )
            }
            Action::SetVolumeFinalizers {
                volume,
                resource_version,
                finalizers,
            } => {
                let r = conditional_patch(
                    &volumes,
                    volume,
                    resource_version,
                    "finalizers",
                    json!(finalizers),
                )
                .await;
                (
                    "volume_finalizers",
                    write_result(r, "patch", format!("volume {volume}")),
                )
            }
            Action::DeleteVolume { volume, uid } => {
                let r = volumes.delete(volume, &preconditions(uid, None)).await;
                (
                    "volume_delete",
                    write_result(r, "delete", format!("volume {volume}")),
                )
            }
            Action::PatchVolume {
                volume,
                resource_version,
                patch,
            } => {
                let mut patch = patch.clone();
                patch["metadata"]["resourceVersion"] = json!(resource_version);
                let r = volumes
                    .patch(volume, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                (
                    "volume_patch",
                    write_result(r, "patch", format!("volume {volume}")),
                )
            }
            Action::CreateSnapshot {
                name,
                claim,
                class,
                migration,
            } => {
                let r = create_snapshot(&self.client, ns, name, claim, class, migration).await;
                (
                    "snapshot_create",
                    created(r, format!("volumesnapshot {ns}/{name}")),
                )
            }
            Action::DeleteSnapshot { name } => {
                let r = snapshot_api(&self.client, ns)
                    .delete(name, &DeleteParams::default())
                    .await;
                (
                    "snapshot_delete",
                    write_result(r, "delete", format!("volumesnapshot {ns}/{name}")),
                )
            }
            Action::CreateClaim { claim } => {
                let name = claim.name_any();
                let r = claims.create(&PostParams::default(), claim).await;
                ("claim_create", created(r, format!("claim {ns}/{name}")))
            }
            Action::ReplaceClaims {
                pod,
                pod_uid,
                claims: replaced,
            } => (
                "claim_replace",
                self.replace_claims(ns, pod, pod_uid, replaced).await,
            ),
            Action::ConfirmClaim {
                claim,
                uid,
                in_place,
            } => {
                let object = format!("claim {ns}/{claim}");
                let fresh = claims.get_opt(claim).await.map_err(|source| Error::Api {
                    verb: "get",
                    object: object.clone(),
                    source,
                })?;
                let there = fresh.is_some_and(|c| {
                    c.metadata.uid.as_deref() == Some(uid.as_str())
                        && c.metadata.deletion_timestamp.is_none()
                });
                if there != *in_place {
                    return Err(Error::Conflict { object });
                }
                return Ok(());
            }
            Action::Reached(point) => {
                crate::faults::step(point);
                return Ok(());
            }
        };
        result?;
        self.metrics.action(kind);
        Ok(())
    }
}

impl Context {
    /// Deletes `replaced` claims and then `pod`, if an uncached read shows the pod is still
    /// the one with `pod_uid`, Pending and unscheduled (else it may be using a claim).
    async fn replace_claims(
        &self,
        ns: &str,
        pod: &str,
        pod_uid: &str,
        replaced: &[(String, String)],
    ) -> Result<(), Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let object = format!("pod {ns}/{pod}");
        let fresh = pods.get_opt(pod).await.map_err(|source| Error::Api {
            verb: "get",
            object: object.clone(),
            source,
        })?;
        let unscheduled = fresh.as_ref().is_some_and(|p| {
            p.metadata.uid.as_deref() == Some(pod_uid)
                && super::nodeloss::unscheduled_since(p).is_some()
        });
        if !unscheduled {
            return Err(Error::Conflict { object });
        }
        for (claim, uid) in replaced {
            let r = claims.delete(claim, &preconditions(uid, None)).await;
            write_result(r, "delete", format!("claim {ns}/{claim}"))?;
        }
        let r = pods.delete(pod, &preconditions(pod_uid, None)).await;
        write_result(r, "delete", object)
    }
}

/// Maps the API error of a create: 409 (already exists) means an earlier pass made it.
fn created<T>(r: Result<T, kube::Error>, object: String) -> Result<(), Error> {
    match r {
        Err(e) if status_code(&e) == Some(409) => {
            debug!(%object, "create: already exists");
            Ok(())
        }
        other => write_result(other, "create", object),
    }
}

fn snapshot_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

async fn create_snapshot(
    client: &Client,
    ns: &str,
    name: &str,
    claim: &str,
    class: &str,
    migration: &str,
) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": ns, "labels": {MIGRATION_LABEL: migration}},
        "spec": {
            "volumeSnapshotClassName": class,
            "source": {"persistentVolumeClaimName": claim},
        },
    }))
    .map_err(kube::Error::SerdeError)?;
    snapshot_api(client, ns)
        .create(&PostParams::default(), &object)
        .await
}

/// The migrations' VolumeSnapshots in `ns`, read uncached.
async fn migration_snapshots(client: &Client, ns: &str) -> Result<Vec<SnapshotState>, Error> {
    let list = snapshot_api(client, ns)
        .list(&ListParams::default().labels(MIGRATION_LABEL))
        .await
        .map_err(|source| Error::Api {
            verb: "list",
            object: format!("volumesnapshots in {ns}"),
            source,
        })?;
    Ok(list
        .items
        .iter()
        .map(|s| SnapshotState {
            name: s.name_any(),
            ready: s.data["status"]["readyToUse"] == json!(true),
            deleting: s.metadata.deletion_timestamp.is_some(),
            error: s.data["status"]["error"]["message"]
                .as_str()
                .map(str::to_owned),
        })
        .collect())
}

fn preconditions(uid: &str, resource_version: Option<&String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: resource_version.cloned(),
        }),
        ..DeleteParams::default()
    }
}

/// Plans and executes for one StatefulSet.
/// Whether `store` has its first full list within `limit`.
pub(crate) async fn caches_ready_within<K>(store: &Store<K>, limit: Duration) -> bool
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    matches!(
        tokio::time::timeout(limit, store.wait_until_ready()).await,
        Ok(Ok(()))
    )
}

pub async fn reconcile(
    set: Arc<StatefulSet>,
    ctx: Arc<Context>,
) -> Result<controller::Action, Error> {
    ctx.metrics.reconciled();
    let (Some(ns), Some(name)) = (set.namespace(), set.metadata.name.clone()) else {
        return Err(Error::Incomplete);
    };
    // A just-started controller plans only from complete caches: a claim cache not yet
    // listed looks like claims that are gone, a pod cache like pods that are.
    let limit = Duration::from_secs(30);
    let ready = caches_ready_within(&ctx.claims, limit).await
        && caches_ready_within(&ctx.pods, limit).await
        && caches_ready_within(&ctx.volumes, limit).await
        && caches_ready_within(&ctx.nodes, limit).await;
    if !ready {
        debug!(%ns, %name, "caches not filled yet; planning later");
        return Ok(controller::Action::requeue(Duration::from_secs(1)));
    }
    let mut nodes = NodeView::from_nodes(ctx.nodes.state().iter().map(AsRef::as_ref));
    let mut set: Arc<StatefulSet> = set;
    let mut plan = ctx.plan_for(&set, &ns, &mut nodes).await?;
    if plan.has_writes() {
        // The cache may lag behind a scale; never write from an old replica count.
        let fresh = Api::<StatefulSet>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|source| Error::Api {
                verb: "get",
                object: format!("statefulset {ns}/{name}"),
                source,
            })?;
        let Some(fresh) = fresh.filter(|f| f.metadata.uid == set.metadata.uid) else {
            return Ok(controller::Action::await_change());
        };
        if fresh.metadata.resource_version != set.metadata.resource_version {
            debug!(%ns, %name, "StatefulSet moved since cached; planning again");
            set = Arc::new(fresh);
            plan = ctx.plan_for(&set, &ns, &mut nodes).await?;
        }
    }
    for action in &plan.actions {
        ctx.execute(&set, &ns, action).await?;
    }
    if plan.has_writes() {
        info!(%ns, %name, writes = plan.actions.iter().filter(|a| a.is_write()).count(), "reconciled");
    }
    let resync = ctx.settings.resync_interval;
    Ok(controller::Action::requeue(
        plan.requeue_after.map_or(resync, |d| d.min(resync)),
    ))
}

pub fn error_policy(set: Arc<StatefulSet>, error: &Error, ctx: Arc<Context>) -> controller::Action {
    ctx.metrics.failure(error.metric_label());
    match error {
        Error::Conflict { .. } => debug!(set = %set.name_any(), %error, "requeue"),
        _ => warn!(set = %set.name_any(), %error, "reconcile failed"),
    }
    let delay = match error {
        Error::Conflict { .. } => Duration::from_secs(2),
        _ => Duration::from_secs(30),
    };
    controller::Action::requeue(delay)
}

/// The sets whose claim names (computed forward) include `ns`/`claim`; for a migration's
/// staging claim, the sets of the claim it moves (through the old PV it is named after).
fn sets_for_claim(
    sets: &Store<StatefulSet>,
    volumes: &Store<PersistentVolume>,
    ns: Option<&str>,
    claim: &str,
) -> Vec<ObjectRef<StatefulSet>> {
    if let Some(uid) = staging_source(claim) {
        return volumes
            .state()
            .iter()
            .filter(|pv| pv.metadata.uid.as_deref() == Some(uid))
            .flat_map(|pv| sets_of_claim(sets, &claim_of(pv).unwrap_or_default()))
            .collect();
    }
    sets_of_claim(sets, &(ns.map(str::to_owned), claim.to_owned()))
}

fn sets_of_claim(
    sets: &Store<StatefulSet>,
    (ns, claim): &(Option<String>, String),
) -> Vec<ObjectRef<StatefulSet>> {
    sets.state()
        .iter()
        .filter(|s| s.namespace() == *ns && claim_identity(s, claim).is_some())
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// The namespace and name of the claim `pv` is bound to (or reserved for).
fn claim_of(pv: &PersistentVolume) -> Option<(Option<String>, String)> {
    let claim_ref = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some((claim_ref.namespace.clone(), claim_ref.name.clone()?))
}

fn sets_for_volume(
    sets: &Store<StatefulSet>,
    volumes: &Store<PersistentVolume>,
    pv: &PersistentVolume,
) -> Vec<ObjectRef<StatefulSet>> {
    match claim_of(pv) {
        Some((ns, name)) => sets_for_claim(sets, volumes, ns.as_deref(), &name),
        None => Vec::new(),
    }
}

/// A reflected, backed-off watch of `api`: its store and its stream of touched objects.
fn reflect<K>(
    api: Api<K>,
    wc: watcher::Config,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, wc)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    (store, stream)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let wc = watcher::Config::default().any_semantic();
    let (set_store, set_writer) = reflector::store();
    let sets = watcher(Api::<StatefulSet>::all(client.clone()), wc.clone())
        .default_backoff()
        .reflect(set_writer)
        .applied_objects();
    let (pod_store, pods) = reflect(
        Api::<Pod>::all(client.clone()),
        wc.clone().labels(POD_NAME_LABEL),
    );
    let (claim_store, claims) = reflect(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        wc.clone(),
    );
    let (volume_store, volumes) = reflect(Api::<PersistentVolume>::all(client.clone()), wc.clone());
    let (node_store, nodes) = reflect(Api::<Node>::all(client.clone()), wc);

    let reporter = Reporter {
        controller: REPORTER.into(),
        instance,
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        claims: claim_store,
        pods: pod_store,
        volumes: volume_store.clone(),
        nodes: node_store,
        settings,
        metrics,
        clock: Timestamp::now,
    });

    let (by_claim, by_volume, by_node) = (set_store.clone(), set_store.clone(), set_store.clone());
    let (claim_volumes, volume_volumes, node_volumes) = (
        volume_store.clone(),
        volume_store.clone(),
        volume_store.clone(),
    );
    let driver = ctx.settings.driver_name.clone();
    Controller::for_stream(sets, set_store)
        .owns_stream(pods)
        .watches_stream(claims, move |c: PersistentVolumeClaim| {
            sets_for_claim(
                &by_claim,
                &claim_volumes,
                c.namespace().as_deref(),
                &c.name_any(),
            )
        })
        .watches_stream(volumes, move |pv: PersistentVolume| {
            sets_for_volume(&by_volume, &volume_volumes, &pv)
        })
        .watches_stream(nodes, move |node: Node| {
            // A node change matters to the sets whose Kennel volumes are pinned to it.
            let name = node.name_any();
            node_volumes
                .state()
                .iter()
                .filter(|pv| pv_driver(pv) == Some(driver.as_str()))
                .filter(|pv| pinned_node(pv).as_deref() == Some(name.as_str()))
                .flat_map(|pv| sets_for_volume(&by_node, &node_volumes, pv))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller");
            }
        })
        .await;
}

/// Replace one metadata list of `name`, only if it is still at `resource_version`
/// (a merge patch replaces the whole list; the resourceVersion makes it conditional).
async fn conditional_patch<K>(
    api: &Api<K>,
    name: &str,
    resource_version: &str,
    field: &str,
    value: serde_json::Value,
) -> kube::Result<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {"resourceVersion": resource_version, field: value}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

#[cfg(test)]
mod tests;
