//! `--only scripts`: the JavaScript middleware end to end through the stand-ins (SecantusDB,
//! noida-db). Two pipelines over the same S documents, one plain and one with the typical
//! script (omit two fields, add a computed one): each snapshots S documents, then follows S
//! streamed inserts. The figure is documents per CPU-second of the monsoon process (user +
//! system time of every thread, script workers included, from /proc), the plain pipeline's
//! beside the scripted one's, and the script pool's in-process figure from the `hot`
//! section for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::Document;
use monsoon_testkit::*;

use super::{delete_index, monsoon_pid, proc_usage, wait_indexed, ScriptMicro};

/// The issue's typical script: two fields omitted, one computed field added.
const TYPICAL: &str = r#"  scripts:
    - namespace: bench.scripted
      script: |
        module.exports = function(doc) {
          var out = _.omit(doc, "note", "tags");
          out.total_with_tax = Math.round(doc.total * 120) / 100;
          return out;
        }
"#;

/// What one pipeline cost.
struct Run {
    snapshot_cpu: f64,
    snapshot_wall: f64,
    stream_cpu: f64,
    stream_wall: f64,
    peak_rss_kib: u64,
}

pub async fn run(bin: &Path, s: i64, micro: Option<ScriptMicro>) -> anyhow::Result<()> {
    // Every insert of the section stays in the oplog (an open stream past pruning skips).
    let cap = (4 * s + 10_000).to_string();
    let mongo = Mongo::start(&["--oplog-max-entries", &cap])?;
    let es = Elastic::start()?;
    let client = mongo.client().await?;
    let esc = es.client()?;
    let mut runs = Vec::new();
    for (name, spec) in [("plain", ""), ("scripted", TYPICAL)] {
        let coll = client.database("bench").collection::<Document>(name);
        insert_all(&coll, sample_docs(0, s)).await?;
        let ns = format!("bench.{name}");
        let state = TempDir::new("bench-scripts");
        let yaml = pipeline_yaml(name, &mongo.uri(), &es.url(), &[&ns], spec);
        let t = Instant::now();
        let mut monsoon = Monsoon::start(bin, &yaml, state.path())?;
        let pid = monsoon_pid(&monsoon)?;
        let profile = Profile::start(name, pid)?;
        let done = wait_indexed(&monsoon, s as u64, Duration::from_secs(1800)).await?;
        let snapshot_wall = done.duration_since(t).as_secs_f64();
        let (snapshot_cpu, _) = proc_usage(pid).context("proc usage")?;
        monsoon.wait_stats(Duration::from_secs(60), |st| st["phase"] == "Streaming")?;
        let (cpu0, _) = proc_usage(pid).context("proc usage")?;
        let t = Instant::now();
        insert_all(&coll, sample_docs(10_000_000, s)).await?;
        let done = wait_indexed(&monsoon, 2 * s as u64, Duration::from_secs(1800)).await?;
        let (cpu1, peak_rss_kib) = proc_usage(pid).context("proc usage")?;
        let stream_wall = done.duration_since(t).as_secs_f64();
        if let Some(p) = profile {
            p.stop()?;
        }
        check_shape(&esc, &ns, name == "scripted").await?;
        let (code, _) = monsoon.terminate()?;
        anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");
        delete_index(&esc, &ns).await?;
        runs.push(Run { snapshot_cpu, snapshot_wall, stream_cpu: cpu1 - cpu0, stream_wall, peak_rss_kib });
    }
    let (plain, scripted) = (&runs[0], &runs[1]);
    let per_core = |cpu: f64| s as f64 / cpu;
    let us = |cpu: f64| cpu * 1e6 / s as f64;
    println!("\n## Scripts end to end through the stand-ins ({s}-document snapshot, then {s} streamed inserts; the typical script: omit two fields, add a computed one)");
    println!("| figure | plain pipeline | with the script | script / plain |");
    println!("|---|---|---|---|");
    println!(
        "| snapshot: **docs per CPU-second of monsoon** (target ≥ 50k with the script) | {:.0} ({:.1} µs/doc) | {:.0} ({:.1} µs/doc) | CPU per doc {:.2}× |",
        per_core(plain.snapshot_cpu),
        us(plain.snapshot_cpu),
        per_core(scripted.snapshot_cpu),
        us(scripted.snapshot_cpu),
        scripted.snapshot_cpu / plain.snapshot_cpu
    );
    println!(
        "| streaming: **docs per CPU-second of monsoon** (target ≥ 50k with the script) | {:.0} ({:.1} µs/doc) | {:.0} ({:.1} µs/doc) | CPU per doc {:.2}× |",
        per_core(plain.stream_cpu),
        us(plain.stream_cpu),
        per_core(scripted.stream_cpu),
        us(scripted.stream_cpu),
        scripted.stream_cpu / plain.stream_cpu
    );
    println!("| snapshot wall (start → every document indexed) | {:.1} s | {:.1} s | {:.2} |", plain.snapshot_wall, scripted.snapshot_wall, scripted.snapshot_wall / plain.snapshot_wall);
    println!("| streaming wall (first insert → last indexed) | {:.1} s | {:.1} s | {:.2} |", plain.stream_wall, scripted.stream_wall, scripted.stream_wall / plain.stream_wall);
    println!("| peak RSS | {:.1} MiB | {:.1} MiB | |", plain.peak_rss_kib as f64 / 1024.0, scripted.peak_rss_kib as f64 / 1024.0);
    match micro {
        Some(m) => println!(
            "| in process (`hot` section): the script pool alone, JSON in → QuickJS → JSON out | | {:.0} events/s on one worker thread, {:.0} on two | |",
            m.one_worker, m.two_workers
        ),
        None => println!("| in process (`hot` section) | | not run (`--only` left it out) | |"),
    }
    println!("(CPU: user + system seconds of the monsoon process, every thread; the snapshot's includes start-up)");
    Ok(())
}

/// The pipeline wrote what it should: the script's shape, or the document unchanged.
async fn check_shape(esc: &elasticsearch::Elasticsearch, index: &str, scripted: bool) -> anyhow::Result<()> {
    let r = esc.get(elasticsearch::GetParts::IndexId(index, "5")).send().await?;
    let body: serde_json::Value = r.json().await?;
    let source = &body["_source"];
    let shaped = source.get("total_with_tax").is_some() && source.get("note").is_none() && source.get("tags").is_none();
    let plain = source.get("note").is_some() && source.get("total_with_tax").is_none();
    anyhow::ensure!(if scripted { shaped } else { plain }, "document 5 of {index} is not as expected: {body}");
    Ok(())
}

/// `MONSOON_BENCH_PERF=DIR`: `perf record` of each pipeline's monsoon process (snapshot and
/// stream) into `DIR/<pipeline>.perf.data`, to see where the script path's CPU goes
/// (`perf report -i DIR/scripted.perf.data --no-children --sort dso,sym`).
struct Profile(std::process::Child);

impl Profile {
    fn start(name: &str, pid: u32) -> anyhow::Result<Option<Self>> {
        let Some(dir) = std::env::var_os("MONSOON_BENCH_PERF") else { return Ok(None) };
        std::fs::create_dir_all(&dir)?;
        let out = Path::new(&dir).join(format!("{name}.perf.data"));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-F", "1999", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("failed to start perf (MONSOON_BENCH_PERF is set)")?;
        Ok(Some(Self(child)))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        // SIGINT: perf writes its data and exits.
        std::process::Command::new("kill").args(["-INT", &self.0.id().to_string()]).status()?;
        self.0.wait()?;
        Ok(())
    }
}
