//! Leader election on a coordination.k8s.io Lease, so only one replica writes.
//!
//! A replica holds the lease while it renews it within `leaseDurationSeconds`; another may take
//! it over once a renewal is overdue. Every write is a create or a resourceVersion-checked
//! replace, so two replicas can never both believe they took the same lease.
//!
//! Every lease call is bounded: a renewal that has not landed by the renew deadline (two thirds
//! of the lease duration after the last one) means this replica stops acting, before another
//! replica can take the lease over. An unbounded call (kube's read timeout is minutes) would
//! keep a stale leader writing beside the new one.
//!
//! Why not a crate: kube-leader-election says of itself that several replicas may act as leader
//! for a while (no fencing), which is what the renew deadline here rules out; kube-lease-manager
//! may fit, once it passes this module's tests (a renewal that never answers must stop the
//! leader by the deadline). Until then this stays.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// How long after its last renewal this replica may keep acting as leader.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Takes or renews the lease. `Ok(true)` when this replica holds it afterwards.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let seconds = i32::try_from(self.duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false), // someone created it first
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(seconds)));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.checked_add(held_for).map_or(true, |end| end < now));
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        // `replace` sends the resourceVersion we read: a concurrent change makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        let retry = self.duration / 3;
        loop {
            match tokio::time::timeout(retry, self.try_acquire(Timestamp::now())).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election"),
                Err(_) => {
                    tracing::warn!(after = ?retry, "leader election: the API server did not answer")
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the lease until a renewal has not landed by the renew deadline, or another
    /// replica holds it; then returns, and the caller must stop acting.
    pub async fn keep(&self) {
        let deadline = self.renew_deadline();
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            let left = deadline.saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(left, self.try_acquire(Timestamp::now())).await {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => return, // another replica took over
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing leader lease"),
                Err(_) => tracing::warn!("renewing leader lease: no answer by the renew deadline"),
            }
            if last_renewal.elapsed() >= deadline {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock;

    fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kennel-retention", "namespace": "kennel-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": MicroTime(renewed), "leaseTransitions": transitions}
        })
    }

    /// Runs one `try_acquire` against a scripted server: (method, status, reply) per request.
    async fn attempt(
        now: Timestamp,
        script: Vec<(&'static str, u16, Value)>,
    ) -> (bool, Vec<Value>) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let lock = LeaseLock::new(
            Client::new(service, "default"),
            "kennel-system",
            "kennel-retention",
            "me",
            Duration::from_secs(15),
        );
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for (method, status, reply) in script {
                let (request, send) = handle.next_request().await.expect("request");
                assert_eq!(request.method().as_str(), method);
                assert_eq!(
                    request.uri().path().trim_end_matches("/kennel-retention"),
                    "/apis/coordination.k8s.io/v1/namespaces/kennel-system/leases"
                );
                let bytes = request.into_body().collect_bytes().await.expect("body");
                bodies.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                        .expect("response"),
                );
            }
            bodies
        });
        let held = tokio::time::timeout(Duration::from_secs(5), lock.try_acquire(now))
            .await
            .expect("in time")
            .expect("no API error");
        let bodies = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("in time")
            .expect("server");
        (held, bodies)
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_stops_the_leader_by_the_renew_deadline() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let lock = LeaseLock::new(
            Client::new(service, "default"),
            "kennel-system",
            "kennel-retention",
            "me",
            Duration::from_secs(15),
        );
        // The API server accepts the renewal and never answers it.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(pending) = handle.next_request().await {
                held.push(pending);
            }
        });
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), lock.keep())
            .await
            .expect("a stuck renewal must end the leadership");
        assert!(started.elapsed() <= lock.renew_deadline() + Duration::from_secs(1));
        assert!(lock.renew_deadline() < lock.duration());
        server.abort();
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let now = Timestamp::from_second(1_700_000_000).expect("time");
        let (held, bodies) = attempt(
            now,
            vec![
                ("GET", 404, not_found()),
                ("POST", 201, lease("me", now, 0)),
            ],
        )
        .await;
        assert!(held);
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "me");
    }

    #[tokio::test]
    async fn respects_a_fresh_lease_of_another_replica() {
        let now = Timestamp::from_second(1_700_000_000).expect("time");
        let renewed = Timestamp::from_second(1_700_000_000 - 5).expect("time");
        let (held, bodies) = attempt(now, vec![("GET", 200, lease("other", renewed, 2))]).await;
        assert!(!held);
        assert_eq!(bodies.len(), 1);
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_with_its_resource_version() {
        let now = Timestamp::from_second(1_700_000_000).expect("time");
        let renewed = Timestamp::from_second(1_700_000_000 - 60).expect("time");
        let (held, bodies) = attempt(
            now,
            vec![
                ("GET", 200, lease("other", renewed, 2)),
                ("PUT", 200, lease("me", now, 3)),
            ],
        )
        .await;
        assert!(held);
        assert_eq!(bodies[1]["metadata"]["resourceVersion"], "7");
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "me");
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 3);
    }
}
