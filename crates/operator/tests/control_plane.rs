//! Against a real API server (etcd, kube-apiserver and kube-controller-manager built from
//! `tools/k8s`, `make k8s-bins`; `monsoon_testkit::control_plane`): the CRD installs with
//! server-side apply, its structural schema and CEL rules refuse what `tests/crd-cases.yaml`
//! says they refuse with the message it names and accept the rest, RBAC is enforced on a
//! ServiceAccount's minted token, and the controller manager does what the operator relies on
//! (StatefulSet → Pods, garbage collection, namespace deletion).
//!
//! One control plane serves the whole file ([`ControlPlane::shared`]); each test works in its
//! own namespace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{GroupVersionKind, Request};
use kube::runtime::wait::{await_condition, conditions};
use kube::Resource;
use monsoon_testkit::control_plane::ControlPlane;
use monsoon_testkit::crd_cases::{cases, Case};
use serde_json::{json, Value};

const CRD: &str = include_str!("../../../crds/syncpipeline.yaml");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
/// Examples written for `monsoon run` only (credentials from the environment or files): the
/// CRD must refuse them, for this reason (as tests/check_manifests.py's STANDALONE_EXAMPLES).
const STANDALONE_EXAMPLES: [(&str, &str); 1] = [("with-credentials.yaml", "only work with `monsoon run`")];
const MANAGER: &str = "monsoon-tests";

/// Apply the CRD (server-side apply, as `kubectl apply --server-side`) and wait until it is
/// Established. Idempotent: every test calls it.
async fn install_crd(client: &kube::Client) -> ApiResource {
    let crd: CustomResourceDefinition = serde_saphyr::from_str(CRD).expect("crds/syncpipeline.yaml parses");
    let name = crd.metadata.name.clone().expect("the CRD has a name");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
        .await
        .expect("the API server takes the CRD");
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .expect("the CRD is Established within 30 s")
        .expect("watching the CRD");
    let version = crd.spec.versions.iter().find(|v| v.served).expect("a served version");
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&crd.spec.group, &version.name, &crd.spec.names.kind),
        &crd.spec.names.plural,
    )
}

async fn namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(&ns))
        .await
        .expect("namespace created");
}

/// `kubectl create --dry-run=server --validate=strict`: a create the API server validates in
/// full (schema, CEL, admission) and does not store; unknown fields are errors, as with
/// `kubectl apply`. kube's `PostParams` has no `fieldValidation`, hence the raw request.
async fn dry_run_create(client: &kube::Client, ar: &ApiResource, ns: &str, object: &Value) -> Result<(), String> {
    let url = DynamicObject::url_path(ar, Some(ns));
    let body = serde_json::to_vec(object).expect("json");
    let pp = PostParams { dry_run: true, field_manager: Some(MANAGER.into()) };
    let mut request = Request::new(url).create(&pp, body).expect("request");
    *request.uri_mut() = format!("{}&fieldValidation=Strict", request.uri()).parse().expect("uri");
    match client.request::<DynamicObject>(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(format!("{} {}", status.code, status.message)),
        Err(e) => panic!("dry-run create failed for another reason than validation: {e}"),
    }
}

/// `kubectl apply --server-side -f crds/`, looking at the response headers: the API server
/// sends a `Warning` header for everything it finds odd in the CRD (unknown formats such as
/// `uint32`, which every apply used to draw). There must be none.
#[tokio::test]
async fn applying_the_crd_draws_no_warnings() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.expect("admin client");
    install_crd(&client).await;
    let crd: CustomResourceDefinition = serde_saphyr::from_str(CRD).expect("crds/syncpipeline.yaml parses");
    let name = crd.metadata.name.clone().expect("name");
    for attempt in ["an update", "a dry-run create under a new field manager"] {
        let pp = match attempt {
            "an update" => PatchParams::apply(MANAGER).force(),
            _ => PatchParams { dry_run: true, ..PatchParams::apply("monsoon-tests-warnings").force() },
        };
        let request = Request::new("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            .patch(&name, &pp, &Patch::Apply(&crd))
            .expect("request");
        let response = client.send(request.map(kube::client::Body::from)).await.expect("the API server answers");
        let status = response.status();
        let warnings: Vec<String> = response
            .headers()
            .get_all("warning")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
            .collect();
        assert!(status.is_success(), "{attempt}: {status}");
        assert!(warnings.is_empty(), "{attempt} of the CRD drew warnings:\n{}", warnings.join("\n"));
    }
    let installed = Api::<CustomResourceDefinition>::all(client.clone()).get(&name).await.expect("installed CRD");
    assert_eq!(monsoon_api::crd::installed_revision(&installed), Some(monsoon_api::crd::CRD_REVISION), "the revision annotation survives the apply");
}

/// A connection string with a password is refused, and the refusal (which `kubectl`, CI logs
/// and GitOps controllers' events repeat) does not contain the password, nor the string.
#[tokio::test]
async fn refusing_a_uri_with_a_password_does_not_repeat_it() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.expect("admin client");
    let ar = install_crd(&client).await;
    namespace(&client, "secret-uri").await;
    let password = "Sup3r-S3cret-Passw0rd";
    for uri in [
        format!("mongodb://syncer:{password}@db-0.db:27017/?replicaSet=rs0"),
        format!("mongodb+srv://syncer:{password}@cluster0.example.net/"),
    ] {
        let manifest = json!({
            "apiVersion": "monsoon.dev/v1alpha1",
            "kind": "SyncPipeline",
            "metadata": {"name": "leaky"},
            "spec": {"mongodb": {"uri": uri}, "elasticsearch": {"urls": ["http://es:9200"]}, "namespaces": ["shop.orders"]},
        });
        let message = dry_run_create(&client, &ar, "secret-uri", &manifest).await.expect_err("a URI with a password is refused");
        assert!(message.starts_with("422"), "{message}");
        assert!(message.contains("holds a password"), "{message}");
        assert!(message.contains("spec.mongodb.uri"), "the refusal names the field: {message}");
        assert!(!message.contains(password), "the refusal repeats the password: {message}");
        assert!(!message.contains("syncer:"), "the refusal repeats the connection string: {message}");
    }
    // A user name without a password (X.509) is fine.
    let manifest = json!({
        "apiVersion": "monsoon.dev/v1alpha1",
        "kind": "SyncPipeline",
        "metadata": {"name": "x509"},
        "spec": {"mongodb": {"uri": "mongodb://CN=syncer@db-0.db:27017/?authMechanism=MONGODB-X509"}, "elasticsearch": {"urls": ["http://es:9200"]}, "namespaces": ["shop.orders"]},
    });
    dry_run_create(&client, &ar, "secret-uri", &manifest).await.expect("a user name alone is accepted");
}

#[tokio::test]
async fn the_api_server_refuses_every_refused_case_with_its_message() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.expect("admin client");
    let ar = install_crd(&client).await;
    namespace(&client, "refused").await;
    let refused = cases("refused");
    assert!(refused.len() >= 20, "the refused list lost its cases");
    let mut wrong = Vec::new();
    for Case { name, manifest, crd, .. } in refused {
        let fragment = crd.unwrap_or_else(|| panic!("{name}: `crd` fragment"));
        match dry_run_create(&client, &ar, "refused", &manifest).await {
            Ok(()) => wrong.push(format!("{name}: accepted (expected a refusal containing {fragment:?})")),
            Err(message) if !message.contains(&fragment) => {
                wrong.push(format!("{name}: expected {fragment:?} in the refusal, got: {message}"))
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "the real API server disagrees with tests/crd-cases.yaml:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn the_api_server_accepts_operator_only_cases_and_the_examples() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.expect("admin client");
    let ar = install_crd(&client).await;
    namespace(&client, "accepted").await;
    let mut wrong = Vec::new();
    for Case { name, manifest, .. } in cases("operatorOnly") {
        if let Err(message) = dry_run_create(&client, &ar, "accepted", &manifest).await {
            wrong.push(format!("operatorOnly / {name}: refused: {message}"));
        }
    }
    let standalone: BTreeMap<&str, &str> = STANDALONE_EXAMPLES.into_iter().collect();
    let mut examples = 0;
    for entry in std::fs::read_dir(EXAMPLES).expect("examples/") {
        let path = entry.expect("examples/ entry").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        if !file.ends_with(".yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("example readable");
        let mut manifest: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        if manifest["kind"] != "SyncPipeline" {
            continue;
        }
        examples += 1;
        // Examples name their own namespace (`shop`); the test's stands in for it.
        if let Some(meta) = manifest["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        match (dry_run_create(&client, &ar, "accepted", &manifest).await, standalone.get(file.as_str())) {
            (Ok(()), None) => {}
            (Err(message), None) => wrong.push(format!("examples/{file}: refused: {message}")),
            (Err(message), Some(fragment)) if message.contains(fragment) => {}
            (result, Some(fragment)) => {
                wrong.push(format!("examples/{file}: expected a refusal containing {fragment:?}, got {result:?}"))
            }
        }
    }
    assert!(examples >= 3, "examples/ lost its SyncPipelines ({examples})");
    assert!(wrong.is_empty(), "the real API server disagrees:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_service_account_gets_only_what_rbac_grants_it() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let ns = "rbac";
    namespace(&admin, ns).await;
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "nobody"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .patch("nobody", &PatchParams::apply(MANAGER), &Patch::Apply(&account))
        .await
        .expect("ServiceAccount created");

    let client = cp.service_account_client(ns, "nobody").await.expect("minted token");
    let config_maps: Api<ConfigMap> = Api::default_namespaced(client);
    match config_maps.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            // Authenticated as the ServiceAccount (not anonymous), and refused by RBAC.
            assert!(
                status.message.contains(r#"User "system:serviceaccount:rbac:nobody" cannot list resource "configmaps""#),
                "{}",
                status.message
            );
        }
        other => panic!("a ServiceAccount without RBAC listed ConfigMaps: {other:?}"),
    }

    // A Role and RoleBinding grant it; the authorizer sees them within moments.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "read-config"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "nobody-reads-config"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-config"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": ns}],
    }))
    .expect("binding");
    Api::<Role>::namespaced(admin.clone(), ns)
        .patch("read-config", &PatchParams::apply(MANAGER), &Patch::Apply(&role))
        .await
        .expect("Role");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .patch("nobody-reads-config", &PatchParams::apply(MANAGER), &Patch::Apply(&binding))
        .await
        .expect("RoleBinding");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match config_maps.list(&ListParams::default()).await {
            Ok(list) => {
                assert!(list.items.iter().all(|cm| cm.metadata.namespace.as_deref() == Some(ns)));
                break;
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("the RoleBinding did not grant list within 10 s: {e}"),
        }
    }
    // Still nothing it was not granted.
    let pods: Api<Pod> = Api::default_namespaced(cp.service_account_client(ns, "nobody").await.expect("token"));
    assert!(matches!(pods.list(&ListParams::default()).await, Err(kube::Error::Api(s)) if s.code == 403));
}

/// Poll `check` every 100 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_controller_manager_creates_pods_collects_garbage_and_deletes_namespaces() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let ns = "controllers";
    namespace(&admin, ns).await;

    // StatefulSet → Pod (Pending: there is no kubelet or scheduler).
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]},
            },
        },
    }))
    .expect("statefulset");
    Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .patch("web", &PatchParams::apply(MANAGER), &Patch::Apply(&sts))
        .await
        .expect("StatefulSet");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    eventually("the StatefulSet controller creates web-0", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { pods.get_opt("web-0").await.ok().flatten().is_some() }
    })
    .await;

    // An owner reference: deleting the owner deletes the dependent (garbage collector).
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    let owner = config_maps
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "owner"}})).expect("cm"))
        .await
        .expect("owner");
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "dependent", "ownerReferences": [owner.controller_owner_ref(&()).expect("owner ref")]},
    }))
    .expect("cm");
    config_maps.create(&PostParams::default(), &dependent).await.expect("dependent");
    config_maps.delete("owner", &DeleteParams::background()).await.expect("delete owner");
    eventually("the garbage collector deletes the dependent", Duration::from_secs(30), || {
        let config_maps = config_maps.clone();
        async move { matches!(config_maps.get_opt("dependent").await, Ok(None)) }
    })
    .await;

    // The namespace controller empties and removes a deleted namespace.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces.delete(ns, &DeleteParams::default()).await.expect("delete namespace");
    eventually("the namespace controller removes the namespace", Duration::from_secs(60), || {
        let namespaces = namespaces.clone();
        async move { matches!(namespaces.get_opt(ns).await, Ok(None)) }
    })
    .await;
}

/// `kubectl apply -f manifests/` against the real API server: every object of the plain
/// install (namespace, CRD, the operator's ServiceAccount, RBAC, Deployment, ...) is taken by
/// server-side apply with strict field validation, so nothing in it is unknown to Kubernetes
/// 1.37 or refused by its admission.
#[tokio::test]
async fn the_install_manifests_apply_to_the_real_api_server() {
    let cp = ControlPlane::shared();
    let client = cp.admin_client().await.expect("admin client");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("manifests/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut applied = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for doc in docs.into_iter().filter(|d| d.is_object()) {
            let (group, version) = match doc["apiVersion"].as_str().expect("apiVersion").split_once('/') {
                Some((g, v)) => (g.to_string(), v.to_string()),
                None => (String::new(), doc["apiVersion"].as_str().unwrap_or_default().to_string()),
            };
            let kind = doc["kind"].as_str().expect("kind").to_string();
            let gvk = GroupVersionKind::gvk(&group, &version, &kind);
            // Only this kind's group version is asked about (the server lists some groups it
            // cannot serve without their aggregated back ends).
            let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{}: {kind} is not served: {e}", file.display()));
            let name = doc["metadata"]["name"].as_str().expect("name").to_string();
            let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
                let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                Api::namespaced_with(client.clone(), ns, &ar)
            } else {
                Api::all_with(client.clone(), &ar)
            };
            let params = PatchParams { field_validation: Some(kube::api::ValidationDirective::Strict), ..PatchParams::apply(MANAGER).force() };
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .unwrap_or_else(|e| panic!("{}: {kind} {name} refused: {e}", file.display()));
            applied.push(format!("{kind}/{name}"));
        }
    }
    assert!(applied.iter().any(|a| a.starts_with("Deployment/")), "no Deployment in manifests/: {applied:?}");
    assert!(applied.iter().any(|a| a.starts_with("ClusterRole/")), "no ClusterRole in manifests/: {applied:?}");
}

/// Namespace users with the built-in `edit` role manage SyncPipelines, and `view` users read
/// them, through the chart's ClusterRoles aggregated into those roles (the controller manager's
/// ClusterRole aggregation does the rest).
#[tokio::test]
async fn users_of_the_built_in_roles_get_syncpipelines_through_aggregation() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let ar = install_crd(&admin).await;
    let ns = "aggregated";
    namespace(&admin, ns).await;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/02-operator.yaml")).expect("manifests");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    let aggregated: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .filter(|d| d["metadata"]["labels"].as_object().is_some_and(|l| l.keys().any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"))))
        .collect();
    assert_eq!(aggregated.len(), 2, "the chart's aggregated ClusterRoles");
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    for doc in aggregated {
        let name = doc["metadata"]["name"].as_str().expect("name");
        roles.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(doc)).await.expect("ClusterRole");
    }
    for (user, role) in [("developer", "edit"), ("auditor", "view")] {
        let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": user}})).expect("sa");
        Api::<ServiceAccount>::namespaced(admin.clone(), ns).patch(user, &PatchParams::apply(MANAGER), &Patch::Apply(&account)).await.expect("sa");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": ns}],
        }))
        .expect("binding");
        Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(user, &PatchParams::apply(MANAGER), &Patch::Apply(&binding)).await.expect("binding");
    }
    let pipeline = json!({
        "apiVersion": "monsoon.dev/v1alpha1", "kind": "SyncPipeline", "metadata": {"name": "mine"},
        "spec": {"mongodb": {"uri": "mongodb://db:27017/"}, "elasticsearch": {"urls": ["http://es:9200"]}, "namespaces": ["shop.orders"]},
    });
    let developer = cp.service_account_client(ns, "developer").await.expect("token");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match dry_run_create(&developer, &ar, ns, &pipeline).await {
            Ok(()) => break,
            Err(e) if e.starts_with("403") && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("an `edit` user cannot create a SyncPipeline: {e}"),
        }
    }
    let auditor = cp.service_account_client(ns, "auditor").await.expect("token");
    let as_auditor: Api<DynamicObject> = Api::namespaced_with(auditor.clone(), ns, &ar);
    eventually("a `view` user lists SyncPipelines", Duration::from_secs(30), || {
        let api = as_auditor.clone();
        async move { api.list(&ListParams::default()).await.is_ok() }
    })
    .await;
    let refused = dry_run_create(&auditor, &ar, ns, &pipeline).await.expect_err("a `view` user created a SyncPipeline");
    assert!(refused.starts_with("403"), "{refused}");
}
