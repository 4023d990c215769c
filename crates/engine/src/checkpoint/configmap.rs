//! Checkpoint store in a ConfigMap that doubles as the worker's lease.
//!
//! One ConfigMap per shard holds the checkpoint beside the lease: `holder` (the worker's
//! identity), `renewTime` (Unix milliseconds) and `leaseDurationSeconds`. Every write is a
//! replace conditional on the ConfigMap's `resourceVersion` and made only while this worker
//! is the holder, so a paused or partitioned worker ("zombie") whose lease was taken over can
//! never move the checkpoint: its next write meets a newer `resourceVersion`, re-reads, sees
//! another holder and fails with [`Error::LeaseLost`], which stops its pipeline.
//!
//! # Invariants
//! - A checkpoint is written only by the current holder, conditionally on the version it read.
//! - A lease is taken over only when it is free or expired (`renewTime + duration < now`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::Mutex;

use super::{Checkpoint, CheckpointStore};

/// ConfigMap key of the checkpoint JSON.
pub const KEY_CHECKPOINT: &str = "checkpoint";
/// ConfigMap key of the lease holder's identity.
pub const KEY_HOLDER: &str = "holder";
/// ConfigMap key of the last renewal, Unix milliseconds.
pub const KEY_RENEW_TIME: &str = "renewTimeMillis";
/// ConfigMap key of the lease duration in seconds.
pub const KEY_DURATION: &str = "leaseDurationSeconds";
/// ConfigMap key of the worker's progress report (JSON), refreshed on every renewal; the
/// operator reads it into the pipeline's status.
pub const KEY_STATUS: &str = "status";

/// Failures of the ConfigMap lease.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("failed to {op} ConfigMap {name}")]
    Api {
        /// What was attempted.
        op: &'static str,
        /// ConfigMap name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Another worker holds a valid lease.
    #[error("ConfigMap {name} is leased by {holder} for another {remaining:?}")]
    Held {
        /// ConfigMap name.
        name: String,
        /// The other holder.
        holder: String,
        /// Time until it expires unless renewed.
        remaining: Duration,
    },
    /// This worker no longer holds the lease: it must stop syncing.
    #[error("lease on ConfigMap {name} was lost to {holder}; this worker must stop")]
    LeaseLost {
        /// ConfigMap name.
        name: String,
        /// The new holder (empty when released).
        holder: String,
    },
}

/// Lease state read from a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// Current holder, empty when free.
    pub holder: String,
    /// Last renewal.
    pub renew_millis: u64,
    /// Lease duration.
    pub duration: Duration,
}

impl LeaseState {
    fn from_data(data: Option<&BTreeMap<String, String>>) -> Self {
        let get = |k: &str| data.and_then(|d| d.get(k)).cloned().unwrap_or_default();
        Self {
            holder: get(KEY_HOLDER),
            renew_millis: get(KEY_RENEW_TIME).parse().unwrap_or(0),
            duration: Duration::from_secs(get(KEY_DURATION).parse().unwrap_or(0)),
        }
    }

    /// Time left before the lease expires at `now_millis` (zero when free or expired).
    pub fn remaining(&self, now_millis: u64) -> Duration {
        if self.holder.is_empty() {
            return Duration::ZERO;
        }
        let expires = self.renew_millis.saturating_add(self.duration.as_millis() as u64);
        Duration::from_millis(expires.saturating_sub(now_millis))
    }

    /// Whether `me` may take or keep the lease at `now_millis`.
    pub fn available_to(&self, me: &str, now_millis: u64) -> bool {
        self.holder == me || self.remaining(now_millis).is_zero()
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A held lease on one ConfigMap, and the checkpoint store behind it.
pub struct ConfigMapLease {
    api: Api<ConfigMap>,
    name: String,
    holder: String,
    duration: Duration,
    /// The ConfigMap as last read or written by this holder.
    current: Mutex<ConfigMap>,
}

impl ConfigMapLease {
    /// Take the lease on ConfigMap `name` (created when missing) for `holder`.
    ///
    /// # Errors
    /// [`Error::Held`] while another worker's lease is valid; [`Error::Api`] on API failures.
    pub async fn acquire(
        api: Api<ConfigMap>,
        name: &str,
        holder: &str,
        duration: Duration,
    ) -> Result<Self, Error> {
        let api_err = |op, source| Error::Api {
            op,
            name: name.to_string(),
            source,
        };
        loop {
            let existing = api.get_opt(name).await.map_err(|e| api_err("read", e))?;
            let now = now_millis();
            let mut cm = match existing {
                None => ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        ..ObjectMeta::default()
                    },
                    ..ConfigMap::default()
                },
                Some(cm) => {
                    let state = LeaseState::from_data(cm.data.as_ref());
                    if !state.available_to(holder, now) {
                        let remaining = state.remaining(now);
                        return Err(Error::Held {
                            name: name.to_string(),
                            holder: state.holder,
                            remaining,
                        });
                    }
                    cm
                }
            };
            stamp(&mut cm, holder, now, duration);
            let result = if cm.metadata.resource_version.is_none() {
                api.create(&PostParams::default(), &cm).await
            } else {
                api.replace(name, &PostParams::default(), &cm).await
            };
            match result {
                Ok(written) => {
                    return Ok(Self {
                        api,
                        name: name.to_string(),
                        holder: holder.to_string(),
                        duration,
                        current: Mutex::new(written),
                    })
                }
                // Someone else wrote first (created it, took it, renewed it): look again.
                Err(kube::Error::Api(resp)) if resp.code == 409 => continue,
                Err(e) => return Err(api_err("write", e)),
            }
        }
    }

    /// The holder identity.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Replace the ConfigMap with `update` applied, conditionally on the version this holder
    /// last saw. On a conflict the ConfigMap is re-read: if this worker still holds the lease
    /// (someone else only touched other fields) the write is retried on the new version;
    /// otherwise the lease is lost and nothing is written.
    async fn write(&self, update: impl Fn(&mut ConfigMap)) -> Result<(), Error> {
        let mut current = self.current.lock().await;
        loop {
            let mut cm = current.clone();
            update(&mut cm);
            stamp(&mut cm, &self.holder, now_millis(), self.duration);
            match self.api.replace(&self.name, &PostParams::default(), &cm).await {
                Ok(written) => {
                    *current = written;
                    return Ok(());
                }
                Err(kube::Error::Api(resp)) if resp.code == 409 || resp.code == 404 => {
                    let fresh = self.api.get_opt(&self.name).await.map_err(|source| Error::Api {
                        op: "re-read",
                        name: self.name.clone(),
                        source,
                    })?;
                    let Some(fresh) = fresh else {
                        return Err(Error::LeaseLost {
                            name: self.name.clone(),
                            holder: String::new(),
                        });
                    };
                    let state = LeaseState::from_data(fresh.data.as_ref());
                    if state.holder != self.holder {
                        return Err(Error::LeaseLost {
                            name: self.name.clone(),
                            holder: state.holder,
                        });
                    }
                    *current = fresh;
                }
                Err(source) => {
                    return Err(Error::Api {
                        op: "write",
                        name: self.name.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Renew the lease (call well within its duration, e.g. every third of it).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when another worker took it: stop syncing at once.
    pub async fn renew(&self) -> Result<(), Error> {
        self.write(|_| {}).await
    }

    /// Renew the lease and store the worker's progress report beside it.
    ///
    /// # Errors
    /// As [`ConfigMapLease::renew`].
    pub async fn renew_with_status(&self, status: &str) -> Result<(), Error> {
        self.write(|cm| {
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(KEY_STATUS.into(), status.to_string());
        })
        .await
    }

    /// Lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Give the lease up (after the final checkpoint), so a successor need not wait for it to
    /// expire.
    ///
    /// # Errors
    /// As [`ConfigMapLease::renew`].
    pub async fn release(&self) -> Result<(), Error> {
        let mut current = self.current.lock().await;
        let mut cm = current.clone();
        if let Some(data) = cm.data.as_mut() {
            data.insert(KEY_HOLDER.into(), String::new());
            data.insert(KEY_RENEW_TIME.into(), "0".into());
        }
        match self.api.replace(&self.name, &PostParams::default(), &cm).await {
            Ok(written) => {
                *current = written;
                Ok(())
            }
            Err(source) => Err(Error::Api {
                op: "release",
                name: self.name.clone(),
                source,
            }),
        }
    }
}

fn stamp(cm: &mut ConfigMap, holder: &str, now: u64, duration: Duration) {
    let data = cm.data.get_or_insert_with(BTreeMap::new);
    data.insert(KEY_HOLDER.into(), holder.to_string());
    data.insert(KEY_RENEW_TIME.into(), now.to_string());
    data.insert(KEY_DURATION.into(), duration.as_secs().to_string());
}

impl CheckpointStore for std::sync::Arc<ConfigMapLease> {
    fn location(&self) -> String {
        self.as_ref().location()
    }

    async fn load(&self) -> Result<Option<Checkpoint>, super::Error> {
        self.as_ref().load().await
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), super::Error> {
        self.as_ref().save(checkpoint).await
    }
}

impl CheckpointStore for ConfigMapLease {
    fn location(&self) -> String {
        format!("ConfigMap {}", self.name)
    }

    async fn load(&self) -> Result<Option<Checkpoint>, super::Error> {
        let current = self.current.lock().await;
        let Some(text) = current.data.as_ref().and_then(|d| d.get(KEY_CHECKPOINT)) else {
            return Ok(None);
        };
        serde_json::from_str(text)
            .map(Some)
            .map_err(|e| super::Error::Corrupt {
                location: self.location(),
                reason: e.to_string(),
            })
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), super::Error> {
        let text = serde_json::to_string(checkpoint).map_err(|e| super::Error::Corrupt {
            location: self.location(),
            reason: e.to_string(),
        })?;
        self.write(|cm| {
            cm.data
                .get_or_insert_with(BTreeMap::new)
                .insert(KEY_CHECKPOINT.into(), text.clone());
        })
        .await
        .map_err(|e| match e {
            Error::LeaseLost { name, holder } => super::Error::Fenced {
                location: format!("ConfigMap {name}"),
                holder,
            },
            other => super::Error::Io {
                op: "write",
                location: self.location(),
                source: std::io::Error::other(other),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_fake_client::ClientBuilder;

    async fn api() -> Api<ConfigMap> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = ClientBuilder::new().build().await.expect("fake client");
        Api::namespaced(client, "default")
    }

    #[test]
    fn lease_expiry_arithmetic() {
        let s = LeaseState {
            holder: "a".into(),
            renew_millis: 10_000,
            duration: Duration::from_secs(15),
        };
        assert_eq!(s.remaining(20_000), Duration::from_secs(5));
        assert!(!s.available_to("b", 20_000));
        assert!(s.available_to("a", 20_000));
        assert!(s.available_to("b", 25_000));
        let free = LeaseState { holder: String::new(), ..s };
        assert!(free.available_to("b", 0));
    }

    #[tokio::test]
    async fn acquire_creates_the_configmap_and_checkpoints_round_trip() {
        let api = api().await;
        let lease = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-a", Duration::from_secs(15))
            .await
            .expect("acquire");
        assert_eq!(lease.load().await.expect("load"), None);
        let mut cp = Checkpoint::new("shop");
        cp.snapshot.done = true;
        lease.save(&cp).await.expect("save");
        let stored = api.get("shop-0").await.expect("get");
        let data = stored.data.expect("data");
        assert_eq!(data[KEY_HOLDER], "worker-a");
        let back: Checkpoint = serde_json::from_str(&data[KEY_CHECKPOINT]).expect("json");
        assert_eq!(back, cp);
        // A new lease by the same worker (a restart) reads it back.
        let again = ConfigMapLease::acquire(api, "shop-0", "worker-a", Duration::from_secs(15))
            .await
            .expect("re-acquire");
        assert_eq!(again.load().await.expect("load"), Some(cp));
    }

    #[tokio::test]
    async fn a_valid_lease_cannot_be_taken_but_an_expired_one_can() {
        let api = api().await;
        let a = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-a", Duration::from_secs(1))
            .await
            .expect("a");
        match ConfigMapLease::acquire(api.clone(), "shop-0", "worker-b", Duration::from_secs(1)).await {
            Err(Error::Held { holder, .. }) => assert_eq!(holder, "worker-a"),
            other => panic!("expected Held, got {:?}", other.map(|l| l.holder().to_string())),
        }
        a.renew().await.expect("renew");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let b = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-b", Duration::from_secs(1))
            .await
            .expect("takeover after expiry");
        assert_eq!(b.holder(), "worker-b");
    }

    #[tokio::test]
    async fn a_zombie_whose_lease_was_taken_cannot_write_its_checkpoint() {
        let api = api().await;
        let zombie = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-a", Duration::from_secs(1))
            .await
            .expect("a");
        let mut old = Checkpoint::new("shop");
        old.snapshot.done = false;
        zombie.save(&old).await.expect("first save");
        // worker-a pauses past its lease; worker-b takes over and moves on.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let successor = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-b", Duration::from_secs(15))
            .await
            .expect("takeover");
        let mut newer = Checkpoint::new("shop");
        newer.snapshot.done = true;
        successor.save(&newer).await.expect("successor saves");
        // The zombie wakes up and tries to write its stale checkpoint and to renew.
        assert!(matches!(zombie.save(&old).await, Err(super::super::Error::Fenced { .. })));
        assert!(matches!(zombie.renew().await, Err(Error::LeaseLost { .. })));
        let stored = api.get("shop-0").await.expect("get").data.expect("data");
        assert_eq!(stored[KEY_HOLDER], "worker-b");
        let back: Checkpoint = serde_json::from_str(&stored[KEY_CHECKPOINT]).expect("json");
        assert_eq!(back, newer, "the zombie must not move the checkpoint");
    }

    #[tokio::test]
    async fn release_lets_a_successor_in_at_once() {
        let api = api().await;
        let a = ConfigMapLease::acquire(api.clone(), "shop-0", "worker-a", Duration::from_secs(60))
            .await
            .expect("a");
        a.release().await.expect("release");
        let b = ConfigMapLease::acquire(api, "shop-0", "worker-b", Duration::from_secs(60))
            .await
            .expect("b gets it without waiting");
        assert_eq!(b.holder(), "worker-b");
    }
}
