//! Leader election on a `coordination.k8s.io/v1` Lease, so several operator replicas can run
//! and exactly one reconciles.
//!
//! The leader renews every renewal period (`duration / 3` by default). A follower takes over only when the Lease is free,
//! or when it has itself seen the Lease unchanged (holder, renew time, `resourceVersion`) for a
//! whole lease duration, timed on its own monotonic clock as client-go's leader election does:
//! the leader's `renewTime` comes from another machine's clock and is never compared with this
//! one, so clock skew cannot depose a leader that keeps renewing. Every write is conditional on
//! the Lease's `resourceVersion`, so two replicas can never both win. A leader that cannot renew
//! within its duration stops leading (the process exits and restarts as a follower).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use monsoon_engine::checkpoint::configmap::Observer;
use tokio::time::Instant;

/// What a follower compares between two reads of the Lease: any change means the leader lives.
type Record = (String, Option<MicroTime>, Option<String>);

/// One replica's view of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// How often the leader renews (`duration / 3` unless set).
    renew_period: Duration,
    /// When this replica last saw another leader's Lease change (behind a plain mutex, never
    /// held across an await, so electing needs only `&self`).
    observed: Mutex<Observer<Record>>,
}

impl LeaderElector {
    /// An elector for Lease `name` in the namespace of `api`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            renew_period: duration / 3,
            observed: Mutex::new(Observer::default()),
        }
    }

    /// Renew every `period` instead of every third of the lease duration. A period that leaves
    /// no margin (not shorter than the duration) is ignored.
    #[must_use]
    pub fn with_renew_period(mut self, period: Duration) -> Self {
        if !period.is_zero() && period < self.duration {
            self.renew_period = period;
        }
        self
    }

    /// How often the leader renews, and a follower looks again.
    pub fn renew_period(&self) -> Duration {
        self.renew_period
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Take or renew the Lease. `Ok(true)`: this replica leads for another `duration`.
    ///
    /// Call it repeatedly (every `duration / 3`) while following: a held Lease is taken over
    /// only after this elector has seen it unchanged for its duration.
    ///
    /// # Errors
    /// API failures other than a lost race (a lost race is `Ok(false)`).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let existing = self.api.get_opt(&self.name).await?;
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let result = match existing {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let resource_version = lease.metadata.resource_version.clone();
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let mine = holder == self.identity;
                let live = {
                    let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
                    if mine || holder.is_empty() {
                        observed.forget();
                        false
                    } else {
                        // The leader's own promise; ours when it wrote none.
                        let duration = spec
                            .lease_duration_seconds
                            .and_then(|d| u64::try_from(d).ok())
                            .filter(|&d| d > 0)
                            .map_or(self.duration, Duration::from_secs);
                        let record = (holder, spec.renew_time.clone(), resource_version);
                        !observed.observe(record, duration, Instant::now()).is_zero()
                    }
                };
                if live {
                    return Ok(false);
                }
                if !mine {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(secs);
                spec.renew_time = Some(MicroTime(now));
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so another replica takes over at once (on graceful shutdown).
    ///
    /// # Errors
    /// API failures.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_fake_client::ClientBuilder;

    async fn api() -> Api<Lease> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = ClientBuilder::new().build().await.expect("fake client");
        Api::namespaced(client, "monsoon-system")
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_expiry_or_release() {
        let api = api().await;
        let a = LeaderElector::new(api.clone(), "monsoon-operator", "a", Duration::from_secs(1));
        let b = LeaderElector::new(api.clone(), "monsoon-operator", "b", Duration::from_secs(1));
        assert!(a.try_acquire_or_renew().await.expect("a"));
        assert!(!b.try_acquire_or_renew().await.expect("b"), "b must not lead while a's lease is valid");
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        // b saw the Lease before a's renewal: the change restarts its wait.
        assert!(!b.try_acquire_or_renew().await.expect("b"), "b must not lead right after a renewed");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.try_acquire_or_renew().await.expect("b takes over"));
        assert!(!a.try_acquire_or_renew().await.expect("a"), "a lost it");
        b.release().await.expect("release");
        assert!(a.try_acquire_or_renew().await.expect("a after release"));
        let lease = api.get("monsoon-operator").await.expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    /// Leader `a`'s clock is a minute behind: by the wall clock its renew time is always long
    /// past, yet it renews. `b` must not depose it while the Lease keeps changing, and takes
    /// over only once it has seen no change for a whole lease duration.
    #[tokio::test]
    async fn a_renewing_leader_is_not_deposed_whatever_its_clock_says() {
        let api = api().await;
        let behind = || MicroTime(Timestamp::now() - std::time::Duration::from_secs(60));
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("monsoon-operator".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                lease_duration_seconds: Some(1),
                renew_time: Some(behind()),
                ..LeaseSpec::default()
            }),
        };
        api.create(&PostParams::default(), &lease).await.expect("a leads");
        let b = LeaderElector::new(api.clone(), "monsoon-operator", "b", Duration::from_secs(1));
        for _ in 0..6 {
            assert!(!b.try_acquire_or_renew().await.expect("b"), "b deposed a leader that keeps renewing");
            tokio::time::sleep(Duration::from_millis(400)).await;
            let mut lease = api.get("monsoon-operator").await.expect("lease");
            lease.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(behind());
            api.replace("monsoon-operator", &PostParams::default(), &lease).await.expect("a renews");
        }
        // `a` stops renewing: `b` has just seen its last renewal, so it waits a whole duration.
        assert!(!b.try_acquire_or_renew().await.expect("b"), "b took over as soon as the renewals stopped");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.try_acquire_or_renew().await.expect("b"), "b takes over after a silent lease duration");
        let spec = api.get("monsoon-operator").await.expect("lease").spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    }
}
