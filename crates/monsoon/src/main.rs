//! The `monsoon` binary: `run` (standalone engine), `operator`, `worker`, `validate`, `crd`.

mod config;
mod convert;
mod systemd;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kube_crd::print_crd;
use monsoon_engine::checkpoint::file::FileStore;
use monsoon_engine::http::{self, Endpoints};
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_engine::RunOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

/// Keep Elasticsearch/OpenSearch indexes in sync with MongoDB.
#[derive(Parser)]
#[command(name = "monsoon", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MONSOON_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run one pipeline outside Kubernetes, checkpointing to a local file.
    Run {
        /// The SyncPipeline manifest (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Directory of the checkpoint file.
        #[arg(long, default_value = ".monsoon")]
        state_dir: PathBuf,
        /// Address of /healthz, /readyz, /metrics and /stats.
        #[arg(long, default_value = "127.0.0.1:9464")]
        http_addr: SocketAddr,
        /// Seconds in-flight bulks may take to finish after SIGTERM.
        #[arg(long, default_value_t = 20)]
        shutdown_grace_seconds: u64,
        /// Snapshot, wait until Elasticsearch acknowledged every write and the checkpoint is
        /// stored, then exit 0 instead of following changes (Monstache's
        /// `exit-after-direct-reads`). The checkpoint keeps where the stream starts, so a later
        /// run without `--once` follows every change made since. Needs `snapshot: true`.
        #[arg(long)]
        once: bool,
    },
    /// Run the Kubernetes operator: reconcile every SyncPipeline into its workers.
    Operator {
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:9464")]
        http_addr: SocketAddr,
        /// Image of the worker pods (normally the operator's own).
        #[arg(long, env = "MONSOON_WORKER_IMAGE")]
        worker_image: String,
        /// Namespaces to watch, comma-separated; every namespace when empty.
        #[arg(long, env = "MONSOON_WATCH_NAMESPACES", value_delimiter = ',', default_value = "")]
        watch_namespaces: Vec<String>,
        /// This replica's identity for leader election (its pod name).
        #[arg(long, env = "POD_NAME")]
        identity: String,
        /// Namespace of the leader-election Lease (the operator's own).
        #[arg(long, env = "POD_NAMESPACE")]
        leader_election_namespace: String,
        /// Seconds a worker has to deliver what it read after SIGTERM.
        #[arg(long, default_value_t = 20)]
        worker_shutdown_grace_seconds: u32,
        /// Name of the leader-election Lease (the chart uses the release name, so two
        /// releases in one namespace do not share it).
        #[arg(long, default_value = monsoon_operator::LEADER_LEASE)]
        leader_election_lease_name: String,
        /// Seconds leadership lasts without renewal (a standby takes over after it).
        #[arg(long, default_value_t = 15)]
        leader_election_lease_duration_seconds: u64,
        /// Seconds between renewals of the Lease by the leader (less than the duration).
        #[arg(long, default_value_t = 5)]
        leader_election_renew_period_seconds: u64,
        /// Seconds a worker pod may stay past its deletion deadline (a node that no longer
        /// answers) before deletion or a re-shard goes on without it.
        #[arg(long, default_value_t = 60)]
        worker_stuck_after_seconds: u64,
    },
    /// Run one shard of a pipeline (inside a worker pod created by the operator).
    Worker {
        /// Address of /healthz, /readyz, /metrics and /stats.
        #[arg(long, default_value = "0.0.0.0:9464")]
        http_addr: SocketAddr,
        /// Seconds in-flight bulks may take to finish after SIGTERM.
        #[arg(long, default_value_t = 20)]
        shutdown_grace_seconds: u64,
    },
    /// Print the objects the operator would apply for a SyncPipeline (for review and GitOps
    /// diffs; the operator applies them itself).
    Render {
        /// The SyncPipeline manifest (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Namespace of the pipeline.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Image of the worker pods.
        #[arg(long, default_value = "ghcr.io/monsoon-dev/monsoon:0.1.0")]
        worker_image: String,
    },
    /// Check a SyncPipeline manifest and print what is wrong with it.
    Validate {
        /// The SyncPipeline manifest (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the SyncPipeline CustomResourceDefinition (YAML).
    Crd,
    /// Turn a Monstache TOML configuration into a SyncPipeline (YAML on standard output; each
    /// option not carried over, and why, on standard error).
    Convert {
        /// The Monstache configuration file.
        file: PathBuf,
        /// Name of the pipeline (default: from the file name).
        #[arg(long)]
        name: Option<String>,
    },
}

mod kube_crd {
    /// The CRD as YAML, exactly as checked in under `crds/`.
    pub fn print_crd() -> anyhow::Result<String> {
        let crd = monsoon_api::crd::crd()?;
        let yaml = serde_saphyr::to_string(&crd)?;
        Ok(format!("# Generated by `monsoon crd`; do not edit.\n---\n{yaml}"))
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The glibc malloc settings the engine runs with (see [`reexec_with_malloc_tunables`]).
const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=8388608:glibc.malloc.arena_max=1";

/// glibc's malloc gives every allocation over 128 KiB (a change-stream reply, a bulk body) its
/// own mmap, and hands freed heap back to the kernel at once, so each batch pays page faults
/// and page zeroing again. With the thresholds at 4 and 8 MiB those buffers are reused from
/// the heap; one arena (instead of one per thread) keeps the free space in one place. Measured
/// with `make bench`, streaming 30k inserts, alternating runs: about 15 % less CPU per event,
/// and peak RSS 16.2 MiB against 16.9–17.1 MiB with the defaults (mimalloc, tried instead,
/// grew to 67 MiB). glibc reads tunables only when a process starts, and `unsafe` (mallopt) is
/// forbidden here, so the engine's commands re-execute the binary once with `GLIBC_TUNABLES`
/// set: same pid, same arguments. A `GLIBC_TUNABLES` already set is left as it is.
fn reexec_with_malloc_tunables() {
    use std::os::unix::process::CommandExt;
    const KEY: &str = "GLIBC_TUNABLES";
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os(KEY).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` returns only when it failed; the engine then runs with glibc's defaults.
    let error = std::process::Command::new(&exe).arg0(arg0).args(args).env(KEY, MALLOC_TUNABLES).exec();
    eprintln!("note: could not re-execute {} with {KEY} set ({error}); running with glibc's malloc defaults", exe.display());
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. } | Command::Worker { .. }) {
        reexec_with_malloc_tunables();
    }
    init_logging(cli.log_format);
    // The process-wide rustls provider: aws-lc-rs, the one the MongoDB driver, kube and the AWS
    // SDK use. reqwest (under the elasticsearch crate, which only offers reqwest's ring-backed
    // `rustls-tls`) takes the installed provider, so its ring fallback is never used.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let result = match cli.command {
        Command::Crd => print_crd().map(|yaml| print!("{yaml}")),
        Command::Convert { file, name } => convert_file(&file, name.as_deref()).map(|yaml| print!("{yaml}")),
        Command::Validate { file } => config::load_pipeline(&file).map(|p| {
            println!("{}: pipeline `{}` is valid", file.display(), p.name);
        }),
        Command::Run {
            file,
            state_dir,
            http_addr,
            shutdown_grace_seconds,
            once,
        } => run(file, state_dir, http_addr, Duration::from_secs(shutdown_grace_seconds), once),
        Command::Render {
            file,
            namespace,
            worker_image,
        } => render(&file, &namespace, &worker_image).map(|yaml| print!("{yaml}")),
        Command::Worker {
            http_addr,
            shutdown_grace_seconds,
        } => worker::worker(http_addr, Duration::from_secs(shutdown_grace_seconds)),
        Command::Operator {
            http_addr,
            worker_image,
            watch_namespaces,
            identity,
            leader_election_namespace,
            worker_shutdown_grace_seconds,
            leader_election_lease_name,
            leader_election_lease_duration_seconds,
            leader_election_renew_period_seconds,
            worker_stuck_after_seconds,
        } => operator(
            http_addr,
            monsoon_operator::OperatorOptions {
                watch_namespaces: watch_namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
                identity,
                lease_namespace: leader_election_namespace,
                election: monsoon_operator::Election {
                    lease_name: leader_election_lease_name,
                    lease_duration: Duration::from_secs(leader_election_lease_duration_seconds),
                    renew_period: Duration::from_secs(leader_election_renew_period_seconds),
                },
                stuck_pod_after: Duration::from_secs(worker_stuck_after_seconds),
                settings: monsoon_operator::workload::WorkerSettings {
                    image: worker_image,
                    log_format: match cli.log_format {
                        LogFormat::Text => "text".into(),
                        LogFormat::Json => "json".into(),
                    },
                    shutdown_grace_seconds: worker_shutdown_grace_seconds,
                },
            },
        ),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(
    file: PathBuf,
    state_dir: PathBuf,
    http_addr: SocketAddr,
    grace: Duration,
    once: bool,
) -> anyhow::Result<()> {
    let pipeline = config::load_pipeline(&file)?;
    if once && !pipeline.spec.snapshot {
        anyhow::bail!("--once snapshots and exits, but {} sets `snapshot: false`: set `spec.snapshot: true`, or run without --once", file.display());
    }
    let engine_config = config::engine_config(&pipeline)?;
    let store = FileStore::new(&state_dir, &pipeline.name)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Metrics::new(&pipeline.name);
        let health = Arc::new(Health::new(Duration::from_secs(120)));
        let shutdown = CancellationToken::new();
        let listener = http::bind(http_addr)
            .await
            .with_context(|| format!("failed to listen on --http-addr {http_addr}"))?;
        info!(addr = %http_addr, "serving /healthz /readyz /metrics /stats");
        let endpoints = Endpoints {
            pipeline: pipeline.name.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
        };
        let http_stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, endpoints, http_stop.clone()).instrument(tracing::info_span!("http")));
        tokio::spawn(watch_signals(shutdown.clone()).instrument(tracing::info_span!("signals")));
        let notifier = tokio::spawn(systemd::notify(health.clone(), http_stop.clone()).instrument(tracing::info_span!("systemd")));
        info!(pipeline = %pipeline.name, checkpoint = %store.path().display(), "pipeline starting");
        let result = monsoon_engine::run(
            engine_config,
            store,
            metrics,
            health,
            shutdown,
            RunOptions {
                shutdown_grace: grace,
                exit_after_snapshot: once,
                ..RunOptions::default()
            },
        )
        .await;
        http_stop.cancel();
        let _ = notifier.await;
        match result {
            Ok(()) => {
                info!(pipeline = %pipeline.name, "pipeline stopped cleanly");
                Ok(())
            }
            Err(e) => {
                error!(pipeline = %pipeline.name, error = %monsoon_engine::error_chain(&e), "pipeline failed");
                Err(anyhow::anyhow!(monsoon_engine::error_chain(&e)))
            }
        }
    })
}

/// `monsoon convert`: the pipeline as YAML; notes go to standard error as they are found.
fn convert_file(file: &std::path::Path, name: Option<&str>) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => convert::pipeline_name(&file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
    };
    let c = convert::convert(&text, &name).with_context(|| format!("{}", file.display()))?;
    for n in &c.notes {
        eprintln!("note: {}: {}", n.option, n.reason);
    }
    let yaml = serde_saphyr::to_string(&c.pipeline)?;
    let run = if c.once {
        "# Monstache's `exit-after-direct-reads`: run it with `monsoon run --once -f FILE` (snapshot, then exit 0).\n"
    } else {
        ""
    };
    Ok(format!("# Converted from {} by `monsoon convert`.\n{run}{yaml}", file.display()))
}

fn render(file: &std::path::Path, namespace: &str, image: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("failed to read {}", file.display()))?;
    let validated = monsoon_api::parse_manifest(&text, monsoon_engine::check_connection_string).with_context(|| format!("{}", file.display()))?;
    let mut pipeline = monsoon_api::SyncPipeline::new(&validated.name, validated.spec);
    pipeline.metadata.namespace = Some(namespace.to_string());
    monsoon_api::validate_for_cluster(&pipeline, monsoon_engine::check_connection_string).map_err(|errors| {
        anyhow::anyhow!(
            "{} cannot run in a cluster: {}",
            file.display(),
            errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        )
    })?;
    let shards = pipeline.spec.workers.max(1);
    let replicas = if pipeline.spec.paused { 0 } else { shards };
    let settings = monsoon_operator::workload::WorkerSettings {
        image: image.to_string(),
        log_format: "json".into(),
        shutdown_grace_seconds: 20,
    };
    let w = monsoon_operator::workload::build(&pipeline, shards, replicas, &settings);
    let mut out = format!("# Objects the operator applies for SyncPipeline {namespace}/{} (owner uid assigned by the API server).\n", validated.name);
    let docs = [
        with_type(&w.service_account, "v1", "ServiceAccount")?,
        with_type(&w.role, "rbac.authorization.k8s.io/v1", "Role")?,
        with_type(&w.role_binding, "rbac.authorization.k8s.io/v1", "RoleBinding")?,
        with_type(&w.service, "v1", "Service")?,
        with_type(&w.stateful_set, "apps/v1", "StatefulSet")?,
        with_type(&w.disruption_budget, "policy/v1", "PodDisruptionBudget")?,
    ];
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&doc)?);
    }
    Ok(out)
}

fn with_type<T: serde::Serialize>(obj: &T, api_version: &str, kind: &str) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(obj)?;
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    Ok(value)
}

fn operator(http_addr: SocketAddr, options: monsoon_operator::OperatorOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let endpoints = monsoon_operator::OperatorEndpoints::new(monsoon_operator::OperatorMetrics::default());
        let listener = http::bind(http_addr)
            .await
            .with_context(|| format!("failed to listen on --http-addr {http_addr}"))?;
        let http_stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, endpoints.clone(), http_stop.clone()).instrument(tracing::info_span!("http")));
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()).instrument(tracing::info_span!("signals")));
        let client = kube::Client::try_default()
            .await
            .context("failed to configure the Kubernetes client (in-cluster service account or kubeconfig)")?;
        info!(identity = %options.identity, namespaces = ?options.watch_namespaces, "operator starting");
        let result = monsoon_operator::run(client, options, endpoints, shutdown).await;
        http_stop.cancel();
        result.map_err(anyhow::Error::from)
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once (the checkpoint on disk is
/// always a safe place to resume from).
pub(crate) async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down gracefully"),
        _ = int.recv() => info!("SIGINT: shutting down gracefully"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: exiting now; the stored checkpoint is safe to resume from");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is generated by `make crds`; this fails when the API types changed since.
    #[test]
    fn crds_folder_matches_the_api_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/syncpipeline.yaml");
        let stored = std::fs::read_to_string(&path).unwrap_or_default();
        let fresh = print_crd().expect("crd renders");
        assert!(stored == fresh, "crds/syncpipeline.yaml is stale: run `make crds` and commit the result");
    }

    /// The operator Deployment in `manifests/` (rendered from the chart) and the worker pods
    /// the operator builds must call this binary with arguments it accepts.
    #[test]
    fn the_chart_and_the_worker_pods_pass_arguments_this_binary_accepts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/02-operator.yaml");
        let text = std::fs::read_to_string(&path).expect("manifests/02-operator.yaml");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("yaml");
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
        let args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string())
            .collect();
        // POD_NAME / POD_NAMESPACE come from the downward API in the pod.
        let mut argv = vec!["monsoon".to_string()];
        argv.extend(args);
        argv.extend(["--identity=pod-0".to_string(), "--leader-election-namespace=monsoon-system".to_string()]);
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(matches!(cli.command, Command::Operator { .. }));

        let mut p = monsoon_api::SyncPipeline::new("p", monsoon_api::SyncPipelineSpec::default());
        p.metadata.namespace = Some("ns".into());
        let settings = monsoon_operator::workload::WorkerSettings {
            image: "i".into(),
            log_format: "json".into(),
            shutdown_grace_seconds: 20,
        };
        let sts = monsoon_operator::workload::build(&p, 1, 1, &settings).stateful_set;
        let container = &sts.spec.expect("spec").template.spec.expect("pod").containers[0];
        let mut argv = vec!["monsoon".to_string()];
        argv.extend(container.args.clone().expect("args"));
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        assert!(matches!(cli.command, Command::Worker { .. }));
    }

    #[test]
    fn every_example_is_a_valid_pipeline() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                config::load_pipeline(&path).unwrap_or_else(|e| panic!("{e:#}"));
                checked += 1;
            }
        }
        assert!(checked >= 2, "expected the examples in {}", dir.display());
    }

    #[test]
    fn crd_schema_is_structural_enough_for_the_api_server() {
        let yaml = print_crd().expect("crd renders");
        let crd: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        // Structural schemas give every node a type and never mix `properties` with
        // `additionalProperties: false`.
        fn walk(node: &serde_json::Value, path: &str, problems: &mut Vec<String>) {
            if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
                if node.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) {
                    problems.push(format!("{path}: properties with additionalProperties: false"));
                }
                for (k, v) in props {
                    if v.get("type").is_none() && v.get("x-kubernetes-int-or-string").is_none() && v.get("x-kubernetes-preserve-unknown-fields").is_none() {
                        problems.push(format!("{path}.{k}: no type"));
                    }
                    walk(v, &format!("{path}.{k}"), problems);
                }
            }
            if let Some(items) = node.get("items") {
                walk(items, &format!("{path}[]"), problems);
            }
            if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
                walk(ap, &format!("{path}{{}}"), problems);
            }
        }
        let mut problems = Vec::new();
        walk(schema, "", &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
