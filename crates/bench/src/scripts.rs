//! `--only scripts`: the JavaScript middleware end to end through the stand-ins (SecantusDB,
//! noida-db). Three pipelines over the same S documents: plain; routed by a field (no script,
//! but a location record per document, as a scripted namespace keeps); and with the typical
//! script (omit two fields, add a computed one). Each snapshots S documents, then follows S
//! streamed inserts. The figure is documents per CPU-second of the monsoon process (user +
//! system time of every thread, script workers included, from /proc), side by side, with the
//! script pool's in-process figure from the `hot` section for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::Document;
use monsoon_testkit::*;

use super::{delete_index, monsoon_pid, proc_usage, request_counts, wait_indexed, ScriptMicro};

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

/// Routing by a field, no script: the sink keeps a location record per document, as it does
/// for every scripted namespace (a script may move documents). Separates what the records
/// cost from what the script costs.
const ROUTED: &str = r#"  mappings:
    - namespace: bench.routed
      routing: customer
"#;

/// What one pipeline cost.
struct Run {
    snapshot_cpu: f64,
    snapshot_wall: f64,
    stream_cpu: f64,
    stream_wall: f64,
    peak_rss_kib: u64,
    /// "bulk requests, checkpoint writes".
    requests: String,
    /// Documents in `monsoon-locations` afterwards.
    records: usize,
}

pub async fn run(bin: &Path, s: i64, micro: Option<ScriptMicro>) -> anyhow::Result<()> {
    // Every insert of the section stays in the oplog (an open stream past pruning skips).
    let cap = (4 * s + 10_000).to_string();
    let mongo = Mongo::start(&["--oplog-max-entries", &cap])?;
    let es = Elastic::start()?;
    let client = mongo.client().await?;
    let esc = es.client()?;
    let mut runs = Vec::new();
    for (name, spec) in [("plain", ""), ("routed", ROUTED), ("scripted", TYPICAL)] {
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
        let requests = request_counts(&monsoon);
        let (code, _) = monsoon.terminate()?;
        anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");
        let records = count(&esc, "monsoon-locations").await?;
        delete_index(&esc, &ns).await?;
        delete_index(&esc, "monsoon-locations").await?;
        runs.push(Run { snapshot_cpu, snapshot_wall, stream_cpu: cpu1 - cpu0, stream_wall, peak_rss_kib, requests, records });
    }
    let (plain, routed, scripted) = (&runs[0], &runs[1], &runs[2]);
    let per_core = |cpu: f64| s as f64 / cpu;
    let us = |cpu: f64| cpu * 1e6 / s as f64;
    println!("\n## Scripts end to end through the stand-ins ({s}-document snapshot, then {s} streamed inserts; the typical script: omit two fields, add a computed one)");
    println!("| figure | plain pipeline | location records only (routing by a field, no script) | with the script | script / plain |");
    println!("|---|---|---|---|---|");
    let cpu_row = |label: &str, cpu: fn(&Run) -> f64| {
        println!(
            "| {label}: **docs per CPU-second of monsoon** (target ≥ 50k with the script) | {:.0} ({:.1} µs/doc) | {:.0} ({:.1} µs/doc) | {:.0} ({:.1} µs/doc) | CPU per doc {:.2}× |",
            per_core(cpu(plain)),
            us(cpu(plain)),
            per_core(cpu(routed)),
            us(cpu(routed)),
            per_core(cpu(scripted)),
            us(cpu(scripted)),
            cpu(scripted) / cpu(plain)
        );
    };
    cpu_row("snapshot", |r| r.snapshot_cpu);
    cpu_row("streaming", |r| r.stream_cpu);
    let wall_row = |label: &str, wall: fn(&Run) -> f64| {
        println!("| {label} | {:.1} s | {:.1} s | {:.1} s | {:.2} |", wall(plain), wall(routed), wall(scripted), wall(scripted) / wall(plain));
    };
    wall_row("snapshot wall (start → every document indexed)", |r| r.snapshot_wall);
    wall_row("streaming wall (first insert → last indexed)", |r| r.stream_wall);
    println!("| peak RSS | {:.1} MiB | {:.1} MiB | {:.1} MiB | |", plain.peak_rss_kib as f64 / 1024.0, routed.peak_rss_kib as f64 / 1024.0, scripted.peak_rss_kib as f64 / 1024.0);
    println!("| bulk requests, checkpoint writes | {} | {} | {} | |", plain.requests, routed.requests, scripted.requests);
    println!("| location records written | {} | {} | {} | |", plain.records, routed.records, scripted.records);
    match micro {
        Some(m) => println!(
            "| in process (`hot` section): the script pool alone, JSON in → QuickJS → JSON out | | | {:.0} events/s on one worker thread, {:.0} on two | |",
            m.one_worker, m.two_workers
        ),
        None => println!("| in process (`hot` section) | | | not run (`--only` left it out) | |"),
    }
    println!("(CPU: user + system seconds of the monsoon process, every thread; the snapshot's includes start-up)");
    Ok(())
}

/// The pipeline wrote what it should: the script's shape, or the document unchanged.
async fn check_shape(esc: &elasticsearch::Elasticsearch, index: &str, scripted: bool) -> anyhow::Result<()> {
    // A search (a routed document is not found by a GET without its routing), after a refresh.
    esc.indices().refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[index])).send().await?;
    let r = esc
        .search(elasticsearch::SearchParts::Index(&[index]))
        .body(serde_json::json!({"query": {"ids": {"values": ["5"]}}}))
        .send()
        .await?;
    let body: serde_json::Value = r.json().await?;
    let source = &body["hits"]["hits"][0]["_source"];
    let shaped = source.get("total_with_tax").is_some() && source.get("note").is_none() && source.get("tags").is_none();
    let plain = source.get("note").is_some() && source.get("total_with_tax").is_none();
    anyhow::ensure!(if scripted { shaped } else { plain }, "document 5 of {index} is not as expected: {body}");
    Ok(())
}

/// `MONSOON_BENCH_PERF=DIR`: `perf record` of the whole machine while each pipeline runs
/// (snapshot and stream) into `DIR/<pipeline>-<pid>.perf.data`, to see where the script path's
/// CPU goes: `perf report -i FILE --pid PID --no-children --sort comm,dso,sym -g none`.
/// System-wide (needs root or `perf_event_paranoid` ≤ 0) because `perf record -p` did not
/// follow the script pool's threads, started after it attached.
struct Profile(std::process::Child);

impl Profile {
    fn start(name: &str, pid: u32) -> anyhow::Result<Option<Self>> {
        let Some(dir) = std::env::var_os("MONSOON_BENCH_PERF") else { return Ok(None) };
        std::fs::create_dir_all(&dir)?;
        let out = Path::new(&dir).join(format!("{name}-{pid}.perf.data"));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-F", "999", "-a", "-o"])
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
