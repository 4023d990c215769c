//! Leader election on a `coordination.k8s.io/v1` Lease, so several operator replicas can run
//! and exactly one reconciles.
//!
//! The leader renews every `duration / 3`; a replica takes over only when the Lease is free
//! or its renew time is older than its duration. Every write is conditional on the Lease's
//! `resourceVersion`, so two replicas can never both win. A leader that cannot renew within
//! its duration stops leading (the process exits and restarts as a follower).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

/// One replica's view of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    /// An elector for Lease `name` in the namespace of `api`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Take or renew the Lease. `Ok(true)`: this replica leads until `now + duration`.
    ///
    /// # Errors
    /// API failures other than a lost race (a lost race is `Ok(false)`).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(&self.name).await?;
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
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let mine = holder == self.identity;
                let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                    (Some(MicroTime(renewed)), Some(d)) => {
                        let age = now.duration_since(*renewed);
                        age.as_secs() >= i64::from(d)
                    }
                    _ => true,
                };
                if !mine && !holder.is_empty() && !expired {
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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
}
