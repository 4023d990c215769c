//! The workers' identity and what it may do: a ServiceAccount (with the pipeline's
//! `workerTemplate.serviceAccountAnnotations`, for IRSA or workload identity), a Role granting
//! `get`/`update`/`patch` on exactly the pipeline's checkpoint ConfigMaps (by name), and the
//! RoleBinding between them. Nothing else: no list, no Secrets, not the pipeline itself.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use monsoon_api::SyncPipeline;

use super::{checkpoint_name, meta, worker_name};

/// The workers' ServiceAccount.
pub(super) fn service_account(p: &SyncPipeline) -> ServiceAccount {
    let mut metadata = meta(p, worker_name(&p.name_any()));
    let annotations = p.spec.worker_template.as_ref().map(|t| t.service_account_annotations.clone()).unwrap_or_default();
    if !annotations.is_empty() {
        metadata.annotations = Some(annotations);
    }
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

/// Access to the checkpoint ConfigMaps of `shards` shards, by name.
pub(super) fn role(p: &SyncPipeline, shards: u32) -> Role {
    let name = p.name_any();
    Role {
        metadata: meta(p, worker_name(&name)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some((0..shards).map(|i| checkpoint_name(&name, i, shards)).collect()),
            verbs: vec!["get".into(), "update".into(), "patch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// Binds [`role`] to [`service_account`].
pub(super) fn role_binding(p: &SyncPipeline) -> RoleBinding {
    let worker = worker_name(&p.name_any());
    RoleBinding {
        metadata: meta(p, worker.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: worker.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: worker,
            namespace: p.namespace(),
            ..Subject::default()
        }]),
    }
}
