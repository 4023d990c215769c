//! `--only split`: a split snapshot (`snapshotSplit`, `_id` ranges read at once) against one
//! pass, the same N documents through the same stand-ins in the same run, into noida-db and
//! into the real OpenSearch node. Each run starts on an empty index; the two alternate (one
//! pass, split, one pass, split) so drift in the stand-ins' speed falls on both.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::Document;
use monsoon_testkit::*;

use super::{delete_index, monsoon_pid, proc_usage, wait_indexed};

/// Ranges of the split runs.
const RANGES: u32 = 4;

pub async fn run(bin: &Path, n: i64) -> anyhow::Result<()> {
    let cap = (n + 10_000).to_string();
    let mongo = Mongo::start(&["--oplog-max-entries", &cap])?;
    let client = mongo.client().await?;
    insert_all(&client.database("bench").collection::<Document>("items"), sample_docs(0, n)).await?;
    for kind in [SearchKind::Noida, SearchKind::OpenSearch] {
        let search = SearchServer::start(kind)?;
        let esc = search.client()?;
        let mut one = Vec::new();
        let mut split = Vec::new();
        for round in 0..4 {
            let extra = if round % 2 == 0 { String::new() } else { format!("  snapshotSplit:\n    ranges: {RANGES}\n    minDocuments: 1\n") };
            let state = TempDir::new("bench-split");
            let yaml = pipeline_yaml("bench", &mongo.uri(), &search.url(), &["bench.items"], &extra);
            let t = Instant::now();
            let mut monsoon = Monsoon::start(bin, &yaml, state.path())?;
            let pid = monsoon_pid(&monsoon)?;
            let done = wait_indexed(&monsoon, n as u64, Duration::from_secs(1800)).await?;
            let wall = done.duration_since(t).as_secs_f64();
            let (cpu, _) = proc_usage(pid).context("proc usage")?;
            let (code, _) = monsoon.terminate()?;
            anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");
            delete_index(&esc, "bench.items").await?;
            if round % 2 == 0 { one.push((wall, cpu)) } else { split.push((wall, cpu)) }
        }
        let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let (one_wall, split_wall) = (mean(&one, |r| r.0), mean(&split, |r| r.0));
        println!("\n## Split snapshot of {n} documents into {kind:?}: {RANGES} ranges against one pass");
        println!("| run | wall (each) | CPU s (each) |");
        println!("|---|---|---|");
        let show = |v: &[(f64, f64)]| (v.iter().map(|r| format!("{:.1} s", r.0)).collect::<Vec<_>>().join(", "), v.iter().map(|r| format!("{:.2}", r.1)).collect::<Vec<_>>().join(", "));
        let (w, c) = show(&one);
        println!("| one pass | {w} | {c} |");
        let (w, c) = show(&split);
        println!("| {RANGES} ranges | {w} | {c} |");
        println!("| split wall / one-pass wall (means) | {:.2} | |", split_wall / one_wall);
    }
    Ok(())
}
