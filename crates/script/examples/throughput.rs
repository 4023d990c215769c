//! Throughput of the issue's typical script through the public API (pool dispatch, JSON in and
//! out, `_meta_monstache` parsed), on 1 and 2 workers.
//!
//! `cargo run --release -p monsoon-script --example throughput [EVENTS]`
//!
//! Prints events/s of wall time, and events per CPU-second of the whole process (workers and the
//! submitting thread) and of the worker threads alone: on a busy machine wall time suffers, CPU
//! time much less.

use std::time::Instant;

use monsoon_script::{Config, Item, MapOutcome, ScriptSource, Scripts};

const TYPICAL: &str = r#"
module.exports = function(doc, ns, updateDesc) {
  var out = _.omit(doc, "password", "secret");
  out.fullName = doc.first + " " + doc.last;
  out._meta_monstache = { routing: doc.post_id };
  return out;
};
"#;

/// A ~1 KiB document as the engine hands it in (relaxed JSON: ObjectId as hex, dates as ISO).
fn document(i: usize) -> String {
    serde_json::json!({
        "_id": format!("65a1b2c3d4e5f6a7b8c9{:04x}", i % 65536),
        "first": "Ada", "last": "Lovelace",
        "password": "hunter2-hunter2", "secret": "s3cr3t-s3cr3t-s3cr3t",
        "post_id": format!("post-{}", i % 1000),
        "email": "ada.lovelace@example.com",
        "created": "2024-01-15T10:20:30.123Z",
        "updated": "2024-06-01T08:00:00.000Z",
        "age": 36, "score": 98.5, "active": true,
        "tags": ["math", "engines", "poetry", "analysis", "notes"],
        "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH", "country": "UK",
                    "geo": {"lat": 51.5074, "lon": -0.1278}},
        "counts": {"views": 12345, "likes": 678, "shares": 90},
        "history": [
            {"at": "2024-01-15T10:20:30.123Z", "what": "created", "by": "system"},
            {"at": "2024-02-15T10:20:30.123Z", "what": "edited", "by": "ada"},
            {"at": "2024-03-15T10:20:30.123Z", "what": "edited", "by": "charles"}
        ],
        "bio": "English mathematician and writer, chiefly known for her work on Charles Babbage's proposed mechanical general-purpose computer, the Analytical Engine.",
        "notes": "Wrote the first algorithm intended to be carried out by such a machine; often regarded as the first programmer.",
        "n": i
    })
    .to_string()
}

/// CPU seconds used by this process so far (user + system), from /proc.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// CPU seconds used so far by the pool's worker threads (named `monsoon-script-N`).
fn worker_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("monsoon-script") {
            let sched = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            ns += sched.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(ns as f64 / 1e9)
}

fn run(label: &str, source: &str, workers: usize, events: usize) -> anyhow::Result<()> {
    let t = Instant::now();
    let scripts = Scripts::new(Config { scripts: vec![ScriptSource::global(source)], workers, ..Config::default() })?;
    let start = t.elapsed();
    let docs: Vec<String> = (0..1000).map(document).collect();
    let batch = 1000;
    // Warm up (JIT-free, but caches and allocator).
    let warm: Vec<Item> = docs.iter().map(|d| Item { namespace: "db.users".into(), doc: d.clone(), update_desc: None }).collect();
    scripts.map_batch(warm);

    let cpu0 = process_cpu_seconds();
    let wcpu0 = worker_cpu_seconds();
    let t0 = Instant::now();
    let mut done = 0;
    let mut replaced = 0;
    while done < events {
        let items: Vec<Item> = docs
            .iter()
            .take(batch.min(events - done))
            .map(|d| Item { namespace: "db.users".into(), doc: d.clone(), update_desc: None })
            .collect();
        done += items.len();
        for r in scripts.map_batch(items) {
            if let MapOutcome::Replace { meta, .. } = r? {
                replaced += usize::from(meta.routing.is_some());
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => format!("{:>7.0} events/CPU-s (process)", events as f64 / (b - a)),
        _ => "n/a".to_owned(),
    };
    let wcpu = match (wcpu0, worker_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => format!("{:>7.0} events/CPU-s (workers)", events as f64 / (b - a)),
        _ => "n/a".to_owned(),
    };
    println!(
        "{label:<20} workers={workers} {:>7.0} events/s wall  {cpu}  {wcpu}  ({events} events of {} B, {replaced} routed; started in {:.1} ms)",
        events as f64 / wall,
        docs[0].len(),
        start.as_secs_f64() * 1e3
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(200_000);
    for workers in [1, 2] {
        run("typical script", TYPICAL, workers, events)?;
    }
    // Floors: the same pool and JSON in and out with a script that does nothing; JSON in only.
    run("return doc", "module.exports = function(doc) { return doc; };", 1, events)?;
    run("return true", "module.exports = function(doc) { return true; };", 1, events)?;
    Ok(())
}
