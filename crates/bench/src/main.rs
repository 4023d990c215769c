//! `make bench`: monsoon's figures, each beside a baseline measured in the same run.
//!
//! Sections (all by default; `--only hot,scripts` or `--skip opensearch` choose):
//! - `hot`: in process on one core: change event (raw BSON) → bulk body lines, against a
//!   raw decode-and-serialize loop (`bson` → `serde_json::Value` → text) over the same
//!   documents; declarative mappings and the script pool on the same events.
//! - `noida`: through the stand-ins (SecantusDB, noida-db):
//!   1. Snapshot of N documents: wall time, monsoon's CPU seconds per 100k documents, peak
//!      RSS; against the stand-ins' own ceilings (MongoDB insert and read rates, noida-db
//!      bulk rate with the same documents).
//!   2. Streaming of M inserts: CPU per 100k events, peak RSS, last-insert-to-indexed lag;
//!      against the stand-in's own stream lag (monsoon's change stream, opened by the bench,
//!      under the same inserts).
//!   3. Backlog: peak RSS while Elasticsearch is down and MongoDB keeps changing.
//! - `opensearch`: the same snapshot and streaming into a real OpenSearch node
//!   ([`opensearch`]), against the node's own bulk ceiling with the same documents.
//! - `scripts`: a snapshot and streamed inserts with a typical script through the
//!   stand-ins, documents per CPU-second of monsoon against the plain pipeline ([`scripts`]).
//!
//! Usage: `monsoon-bench <monsoon binary> [--docs N] [--stream M] [--backlog K]
//! [--script-docs S] [--only LIST | --skip LIST]`

mod cpu;
mod opensearch;
mod scripts;
mod split;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document, RawDocumentBuf, Timestamp};
use monsoon_engine::checkpoint::ClusterTime;
use monsoon_engine::config::BatchConfig;
use monsoon_engine::convert::{self, ConvertStats};
use monsoon_engine::sink::elasticsearch::request;
use monsoon_engine::sink::{locations, Op, Write};
use monsoon_engine::transform::{Outcome, Shape};
use monsoon_engine::source::mongodb::event::{self, Action};
use monsoon_testkit::*;

/// A part of the bench that `--only` and `--skip` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Hot,
    Noida,
    OpenSearch,
    Scripts,
    Split,
}

const SECTIONS: [(&str, Section); 5] =
    [("hot", Section::Hot), ("noida", Section::Noida), ("opensearch", Section::OpenSearch), ("scripts", Section::Scripts), ("split", Section::Split)];

fn sections(list: &str) -> anyhow::Result<Vec<Section>> {
    list.split(',')
        .map(|name| {
            SECTIONS
                .iter()
                .find(|(n, _)| *n == name.trim())
                .map(|(_, s)| *s)
                .with_context(|| format!("unknown section {name:?}; sections: hot, noida, opensearch, scripts, split"))
        })
        .collect()
}

struct Args {
    monsoon: PathBuf,
    docs: i64,
    stream: i64,
    backlog: i64,
    /// Documents of the scripts section's snapshot, and again of its streamed inserts.
    script_docs: i64,
    sections: Vec<Section>,
}

impl Args {
    fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }
}

const USAGE: &str = "usage: monsoon-bench <monsoon binary> [--docs N] [--stream M] [--backlog K] [--script-docs S] [--only LIST | --skip LIST] (sections: hot, noida, opensearch, scripts, split)";

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let monsoon = PathBuf::from(it.next().context(USAGE)?);
    let mut args = Args {
        monsoon,
        docs: 200_000,
        stream: 100_000,
        backlog: 1_000_000,
        script_docs: 40_000,
        sections: SECTIONS.iter().map(|(_, s)| *s).collect(),
    };
    while let Some(flag) = it.next() {
        let mut text = || it.next().with_context(|| format!("{flag} needs a value; {USAGE}"));
        match flag.as_str() {
            "--docs" => args.docs = text()?.parse()?,
            "--stream" => args.stream = text()?.parse()?,
            "--backlog" => args.backlog = text()?.parse()?,
            "--script-docs" => args.script_docs = text()?.parse()?,
            "--only" => args.sections = sections(&text()?)?,
            "--skip" => {
                let skipped = sections(&text()?)?;
                args.sections.retain(|s| !skipped.contains(s));
            }
            other => bail!("unknown flag {other}; {USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!("# monsoon bench ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let micro = args.runs(Section::Hot).then(hot_path);
    if args.sections.iter().all(|s| *s == Section::Hot) {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        if args.runs(Section::Noida) {
            end_to_end(&args).await?;
        }
        if args.runs(Section::OpenSearch) {
            opensearch::run(&args.monsoon, args.docs, args.stream).await?;
        }
        if args.runs(Section::Scripts) {
            scripts::run(&args.monsoon, args.script_docs, micro).await?;
        }
        if args.runs(Section::Split) {
            split::run(&args.monsoon, args.docs).await?;
        }
        Ok(())
    })
}

/// Change events like the stream delivers for inserts of the sample documents.
fn sample_events(n: i64) -> Vec<RawDocumentBuf> {
    sample_docs(0, n)
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let id = d.get("_id").cloned().unwrap_or_default();
            let e = doc! {
                "_id": {"_data": format!("{:064x}", i)},
                "operationType": "insert",
                "clusterTime": Timestamp { time: 1_800_000_000, increment: i as u32 },
                "wallTime": mongodb::bson::DateTime::now(),
                "ns": {"db": "shop", "coll": "orders"},
                "documentKey": {"_id": id},
                "fullDocument": d,
            };
            RawDocumentBuf::from_document(&e).expect("event encodes")
        })
        .collect()
}

fn best_of<F: FnMut() -> usize>(rounds: usize, mut f: F) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out)
}

/// The hot-path tables; returns the script pool's in-process figure for the scripts section.
fn hot_path() -> ScriptMicro {
    let n = 100_000;
    let events = sample_events(n);
    let docs: Vec<&[u8]> = events
        .iter()
        .map(|e| match e.get("fullDocument") {
            Ok(Some(mongodb::bson::RawBsonRef::Document(d))) => d.as_bytes(),
            _ => &[],
        })
        .collect();
    let avg_doc = docs.iter().map(|d| d.len()).sum::<usize>() / docs.len();

    // Baseline: decode each document into a serde_json::Value and serialize it.
    let (raw_secs, raw_bytes) = best_of(3, || {
        let mut out = Vec::with_capacity(64 << 20);
        for d in &docs {
            let v: serde_json::Value = mongodb::bson::from_slice(d).expect("decodes");
            serde_json::to_writer(&mut out, &v).expect("writes");
            out.push(b'\n');
        }
        out.len()
    });
    // The naive path: owned Document → relaxed extended JSON → text.
    let (ext_secs, _) = best_of(3, || {
        let mut out = Vec::with_capacity(64 << 20);
        for d in &docs {
            let doc: Document = mongodb::bson::from_slice(d).expect("decodes");
            let v = mongodb::bson::Bson::Document(doc).into_relaxed_extjson();
            serde_json::to_writer(&mut out, &v).expect("writes");
            out.push(b'\n');
        }
        out.len()
    });
    // monsoon: parse the event, compute the ES _id, convert the document, encode the action.
    let ns: Arc<str> = Arc::from("shop.orders");
    let (our_secs, our_bytes) = best_of(3, || {
        let mut body = Vec::with_capacity(96 << 20);
        let mut stats = ConvertStats::default();
        for e in &events {
            let Ok(Action::Upsert { id, doc, time, .. }) = event::parse(e) else { panic!("insert event") };
            let mut id_buf = Vec::with_capacity(16);
            convert::write_es_id(id, &mut id_buf).expect("id");
            let mut source = Vec::with_capacity(doc.as_bytes().len() + 64);
            convert::write_document(doc, true, &mut source, &mut stats).expect("converts");
            let w = Write::new(
                ns.clone(),
                ns.clone(),
                String::from_utf8_lossy(&id_buf).into(),
                ClusterTime::from(time).version(),
                Op::Index(Bytes::from(source)),
            );
            request::encode(&w, &mut body);
        }
        body.len()
    });
    // The same through a mapping: two fields excluded and routing by a field (so the sink
    // also plans a location record for each document, included here).
    let mapping: monsoon_api::Mapping =
        serde_json::from_value(serde_json::json!({"namespace": "shop.orders", "exclude": ["note", "address.zip"], "routing": "customer"})).expect("mapping");
    let shape = Shape::compile(&mapping).expect("compiles");
    let locations_index: Arc<str> = Arc::from(locations::DEFAULT_INDEX);
    let no_records = std::collections::HashMap::new();
    let (shaped_secs, _) = best_of(3, || {
        let mut body = Vec::with_capacity(96 << 20);
        let mut stats = ConvertStats::default();
        let mut batch = Vec::with_capacity(1000);
        let flush = |batch: &mut Vec<Write>, body: &mut Vec<u8>| {
            let plan = locations::plan(std::mem::take(batch), &no_records, &locations_index);
            for w in plan.intents.iter().chain(&plan.writes).chain(&plan.records) {
                request::encode(w, body);
            }
        };
        for e in &events {
            let Ok(Action::Upsert { id, doc, time, .. }) = event::parse(e) else { panic!("insert event") };
            let mut id_buf = Vec::with_capacity(16);
            convert::write_es_id(id, &mut id_buf).expect("id");
            let Ok(Outcome::Write(shaped)) = shape.shape(doc, time, &mut stats) else { panic!("shaped") };
            let mut w = Write::new(
                ns.clone(),
                ns.clone(),
                String::from_utf8_lossy(&id_buf).into(),
                ClusterTime::from(time).version(),
                Op::Index(Bytes::from(shaped.source)),
            );
            w.routing = shaped.routing;
            w.origin = Some(Arc::from(locations::record_id("bench", &ns, &String::from_utf8_lossy(&id_buf))));
            batch.push(w);
            if batch.len() == 1000 {
                flush(&mut batch, &mut body);
            }
        }
        flush(&mut batch, &mut body);
        body.len()
    });
    // A shape on its own, without the sink's location record: what the transform stage costs.
    let shaped_only = |shape: &Shape| {
        best_of(3, || {
            let mut body = Vec::with_capacity(96 << 20);
            let mut stats = ConvertStats::default();
            for e in &events {
                let Ok(Action::Upsert { id, doc, time, .. }) = event::parse(e) else { panic!("insert event") };
                let mut id_buf = Vec::with_capacity(16);
                convert::write_es_id(id, &mut id_buf).expect("id");
                let Ok(Outcome::Write(shaped)) = shape.shape(doc, time, &mut stats) else { panic!("shaped") };
                let mut w = Write::new(ns.clone(), ns.clone(), String::from_utf8_lossy(&id_buf).into(), ClusterTime::from(time).version(), Op::Index(Bytes::from(shaped.source)));
                w.routing = shaped.routing;
                request::encode(&w, &mut body);
            }
            body.len()
        })
        .0
    };
    let routed_secs = shaped_only(&shape);
    // Fields only (no routing: no location records).
    let trim: monsoon_api::Mapping = serde_json::from_value(serde_json::json!({"namespace": "shop.orders", "exclude": ["note", "address.zip"]})).expect("mapping");
    let trim_secs = shaped_only(&Shape::compile(&trim).expect("compiles"));
    println!("\n## Hot path (one core, {n} insert events, {avg_doc}-byte documents)");
    println!("| path | events/s | vs raw loop |");
    println!("|---|---|---|");
    let rate = |s: f64| n as f64 / s;
    println!("| raw loop: bson → serde_json::Value → text | {:.0} | 1.00 |", rate(raw_secs));
    println!("| naive: bson → Document → relaxed ext JSON → text | {:.0} | {:.2} |", rate(ext_secs), raw_secs / ext_secs);
    println!("| monsoon: event → _id + _source + bulk action line | {:.0} | {:.2} |", rate(our_secs), raw_secs / our_secs);
    println!("(bytes out: raw {raw_bytes}, monsoon {our_bytes} incl. action lines)");
    println!("\n## Declarative mappings (one core, same events): CPU per event against monsoon's plain path");
    println!("| path | events/s | CPU per event vs plain |");
    println!("|---|---|---|");
    println!("| plain (above) | {:.0} | 1.00 |", rate(our_secs));
    println!("| exclude two fields | {:.0} | {:.2} |", rate(trim_secs), trim_secs / our_secs);
    println!("| exclude two fields + routing by a field (the transform stage) | {:.0} | {:.2} |", rate(routed_secs), routed_secs / our_secs);
    println!("| the same + its location record planned and encoded (the sink's extra item) | {:.0} | {:.2} |", rate(shaped_secs), shaped_secs / our_secs);
    println!("(a routed namespace also costs one multi-get per bulk request, not in this figure)");
    script_path(&docs_json(&events), our_secs, n)
}

/// Each event's document as the JSON a script receives (`_id` included).
fn docs_json(events: &[RawDocumentBuf]) -> Vec<String> {
    let mut stats = ConvertStats::default();
    events
        .iter()
        .map(|e| {
            let Ok(Action::Upsert { doc, .. }) = event::parse(e) else { panic!("insert event") };
            let mut out = Vec::new();
            convert::write_document(doc, false, &mut out, &mut stats).expect("converts");
            String::from_utf8(out).expect("utf8")
        })
        .collect()
}

/// The in-process script figures: events/s through the script pool with one worker thread and
/// with two (JSON in, QuickJS call, JSON out).
#[derive(Clone, Copy, Debug)]
struct ScriptMicro {
    one_worker: f64,
    two_workers: f64,
}

/// The issue's typical script (omit two fields, add one computed field, set routing) through
/// the script pool, in chunks of 64 documents as the source hands them over, with one worker
/// thread and with two.
fn script_path(docs: &[String], plain_secs: f64, n: i64) -> ScriptMicro {
    use monsoon_script::{Config, Item, ScriptSource, Scripts};
    const TYPICAL: &str = r#"module.exports = function(doc) {
  var out = _.omit(doc, "note", "tags");
  out.total_with_tax = Math.round(doc.total * 120) / 100;
  out._meta_monstache = { routing: doc.customer };
  return out;
}"#;
    let rate = |s: f64| n as f64 / s;
    let mut rows = Vec::new();
    for workers in [1usize, 2] {
        let scripts = Scripts::new(Config { scripts: vec![ScriptSource::for_namespace("shop.orders", TYPICAL)], workers, ..Config::default() }).expect("compiles");
        let (secs, _) = best_of(3, || {
            let mut kept = 0;
            for chunk in docs.chunks(64) {
                let items = chunk.iter().map(|d| Item { namespace: "shop.orders".into(), doc: d.clone(), update_desc: None }).collect();
                kept += scripts.map_batch(items).into_iter().filter(Result::is_ok).count();
            }
            assert_eq!(kept, docs.len(), "every document mapped");
            kept
        });
        rows.push((workers, secs));
    }
    let one = rows[0].1;
    println!("\n## JavaScript middleware (the typical script: omit two fields, add a computed field, set routing; chunks of 64)");
    println!("| path | events/s | vs plain path | vs one worker |");
    println!("|---|---|---|---|");
    println!("| plain path (above, one core) | {:.0} | 1.00 | |", rate(plain_secs));
    for &(workers, secs) in &rows {
        println!("| script, {workers} worker thread(s) | {:.0} | {:.2} | {:.2} |", rate(secs), rate(secs) / rate(plain_secs), one / secs);
    }
    println!("(script rows: JSON in, QuickJS call, JSON out; conversion of the document is in the plain path's figure)");
    ScriptMicro { one_worker: rate(rows[0].1), two_workers: rate(rows[1].1) }
}

/// A `Key: value kB` line of /proc/<pid>/status, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory right now, split as the kernel counts it: anonymous (heap, stacks) and
/// file-backed (the binary's pages that were touched), from /proc.
fn rss_split(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mib = |key| status_kib(&status, key).unwrap_or(0) as f64 / 1024.0;
    format!("now: {:.1} MiB anonymous + {:.1} MiB of the binary's pages", mib("RssAnon:"), mib("RssFile:"))
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let (_, secs) = cpu::stat_of(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status_kib(&status, "VmHWM:")?;
    Some((secs, hwm))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn indexed(m: &Monsoon) -> u64 {
    m.stats().and_then(|s| s["indexed"].as_u64()).unwrap_or(0)
}

async fn wait_indexed(m: &Monsoon, target: u64, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = indexed(m);
        if now >= target {
            return Ok(Instant::now());
        }
        // Every poll is an HTTP request monsoon serves, and counts in its CPU: far from the
        // target poll twice a second, close to it 20 times (the end is timed to 50 ms).
        // Close: within 5 %, or within a few full rounds of bulk requests (4 × 1000
        // documents), so a small run's last batches are not timed to 500 ms.
        if now + (target / 20).max(5_000) < target {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if Instant::now() > deadline {
            bail!("only {} of {target} indexed after {timeout:?}\n{}", indexed(m), tail(&m.log(), 20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn end_to_end(args: &Args) -> anyhow::Result<()> {
    let cap = (args.docs + args.stream + args.backlog + 10_000).to_string();
    let mongo = Mongo::start(&["--oplog-max-entries", &cap])?;
    let mut es = Elastic::start()?;
    let client = mongo.client().await?;
    let esc = es.client()?;
    let coll = client.database("bench").collection::<Document>("items");
    let n = args.docs;

    // Ceilings of the stand-ins themselves, with the same documents.
    let t = Instant::now();
    insert_all(&coll, sample_docs(0, n)).await?;
    let mongo_insert = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let raw = client.database("bench").collection::<RawDocumentBuf>("items");
    let read = read_sorted(&raw).await?;
    let mongo_read = read.len() as f64 / t.elapsed().as_secs_f64();
    let bodies = bulk_bodies(&read, "ceiling")?;
    drop(read);
    let es_bulk = es_ceiling(&esc, bodies.clone()).await?;
    // noida-db slows down as it holds more documents: start each scenario on an empty one.
    delete_index(&esc, "ceiling").await?;
    let together = together_ceiling(&raw, &esc, bodies.clone(), n).await?;
    println!("\n## Stand-in ceilings ({n} documents)");
    println!("| stand-in | docs/s |");
    println!("|---|---|");
    println!("| SecantusDB insert (1000-doc batches) | {mongo_insert:.0} |");
    println!("| SecantusDB sorted read (one cursor) | {mongo_read:.0} |");
    println!("| noida-db bulk index (1000-doc bulks, 4 in flight) | {es_bulk:.0} |");
    println!("| both at once: sorted read beside the bulk indexing | {together:.0} |");

    // Snapshot.
    let state = TempDir::new("bench");
    let yaml = pipeline_yaml("bench", &mongo.uri(), &es.url(), &["bench.items"], "");
    let SnapshotRun { wall: snap_wall, cpu: snap_cpu, rss: snap_rss, rss_now, requests, busy, .. } = snapshot_run(&args.monsoon, &yaml, state.path(), n).await?;
    let slots = BatchConfig::default().concurrency;
    delete_index(&esc, "bench.items").await?;
    // The stand-ins' speed drifts within a run (other work on the machine): bracket monsoon's
    // run with a second measurement of their ceiling and compare with the mean of the two.
    let together_after = together_ceiling(&raw, &esc, bodies, n).await?;
    let (before, after) = (n as f64 / together, n as f64 / together_after);
    let ceiling = (before + after) / 2.0;
    println!("\n## Snapshot of {n} documents");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| wall | {snap_wall:.1} s ({:.0} docs/s) |", n as f64 / snap_wall);
    println!("| stand-ins' ceiling (both at once), measured before and after monsoon's run | {before:.1} s, {after:.1} s; monsoon wall / before = {:.2}, / after = {:.2}, / their mean = {:.2} |", snap_wall / before, snap_wall / after, snap_wall / ceiling);
    println!("| monsoon CPU | {snap_cpu:.2} s total, {:.2} s per 100k docs |", snap_cpu * 100_000.0 / n as f64);
    println!("| monsoon peak RSS | {:.1} MiB ({rss_now}) |", snap_rss as f64 / 1024.0);
    println!("| bulk requests, checkpoint writes | {requests} |");
    println!("| request slots busy (bulk request time / (wall × {slots})) | {:.0} % |", busy * 100.0);
    // Monstache 6.7.17 on this machine kind, as quoted in the issue (not measured here):
    // 9.3 CPU s and ~420 MiB for a 200k snapshot, i.e. 4.65 CPU s per 100k documents.
    println!("| vs Monstache (quoted, not measured here: 4.65 CPU s per 100k, ~420 MiB) | CPU {:.3}×, RSS {:.3}× |", snap_cpu * 100_000.0 / n as f64 / 4.65, snap_rss as f64 / 1024.0 / 420.0);

    // Streaming, from a fresh state like the snapshot: a new pipeline on an empty collection,
    // so its CPU and peak RSS are the stream's alone.
    if args.stream == 0 {
        return Ok(());
    }
    let m = args.stream;
    // The stand-in's own delivery of monsoon's change stream under the same inserts, before
    // monsoon runs: SecantusDB builds events in the process that takes the inserts.
    let (watch_rate, watch_lag) = stream_ceiling(&client, m).await?;
    let events = client.database("bench").collection::<Document>("events");
    events.insert_one(doc! {"_id": -1}).await?;
    let stream_state = TempDir::new("bench-stream");
    let yaml = pipeline_yaml("stream", &mongo.uri(), &es.url(), &["bench.events"], "  snapshot: false\n");
    let mut monsoon = Monsoon::start(&args.monsoon, &yaml, stream_state.path())?;
    let pid = monsoon_pid(&monsoon)?;
    monsoon.wait_stats(Duration::from_secs(60), |s| s["phase"] == "Streaming")?;
    let (cpu0, _) = proc_usage(pid).context("proc usage")?;
    let t = Instant::now();
    insert_all(&events, sample_docs(10_000_000, m)).await?;
    let last_insert = Instant::now();
    let insert_wall = last_insert.duration_since(t).as_secs_f64();
    let done = wait_indexed(&monsoon, m as u64, Duration::from_secs(1800)).await?;
    let lag = done.duration_since(last_insert).as_secs_f64();
    let index_wall = done.duration_since(t).as_secs_f64();
    let (cpu1, rss1) = proc_usage(pid).context("proc usage")?;
    println!("\n## Streaming {m} inserts (1000-doc insert_many batches, fresh pipeline and index)");
    println!("| figure | value |");
    println!("|---|---|");
    println!("| inserts took (MongoDB with an open stream) | {insert_wall:.1} s ({:.0} docs/s) |", m as f64 / insert_wall);
    println!("| first insert → last document indexed | {index_wall:.1} s ({:.0} docs/s; noida-db bulk ceiling above: {es_bulk:.0} docs/s) |", m as f64 / index_wall);
    println!("| last insert → last document indexed | {lag:.2} s |");
    println!("| the stand-in alone: monsoon's change stream opened by the bench, same inserts, last insert → last event read | {watch_lag:.2} s ({watch_rate:.0} events/s); monsoon's lag beyond it: {:.2} s |", lag - watch_lag);
    println!("| monsoon CPU | {:.2} s per 100k events |", (cpu1 - cpu0) * 100_000.0 / m as f64);
    println!("| bulk requests, checkpoint writes (whole run) | {} |", request_counts(&monsoon));
    println!("| monsoon peak RSS | {:.1} MiB ({}) |", rss1 as f64 / 1024.0, rss_split(pid));
    println!("| vs Monstache (quoted, not measured here: 5.5–8.7 CPU s per 100k, 57–101 MiB) | CPU {:.3}×, RSS {:.3}× of its best case |", (cpu1 - cpu0) * 100_000.0 / m as f64 / 5.5, rss1 as f64 / 1024.0 / 57.0);
    let coll = events;

    // Backlog while Elasticsearch is down: memory must stay bounded.
    if args.backlog == 0 {
        // Stopped as a user stops it (a profiler wrapping the binary writes its report then).
        let (code, _) = monsoon.terminate()?;
        anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");
    } else {
        monsoon.kill();
        // A fresh process so its peak RSS is the backlog's alone.
        monsoon.restart()?;
        let pid = monsoon_pid(&monsoon)?;
        monsoon.wait_stats(Duration::from_secs(60), |s| s["phase"] == "Streaming")?;
        es.stop();
        let k = args.backlog;
        let t = Instant::now();
        insert_all(&coll, sample_docs(20_000_000, k)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (_, rss) = proc_usage(pid).context("proc usage")?;
        let stats = monsoon.stats().unwrap_or_default();
        println!("\n## Backlog: {k} inserts while Elasticsearch is down ({:.0} s to insert)", t.elapsed().as_secs_f64());
        println!("| figure | value |");
        println!("|---|---|");
        println!("| monsoon peak RSS | {:.1} MiB ({}) |", rss as f64 / 1024.0, rss_split(pid));
        println!("| writes held in memory (in flight) | {} |", stats["inFlight"]);
        println!("| ready while sink down | {} |", stats["ready"]);
    }
    Ok(())
}

/// What [`snapshot_run`] measured.
struct SnapshotRun {
    /// Start to the last document indexed, seconds.
    wall: f64,
    /// CPU seconds (user + system) of the monsoon process until then.
    cpu: f64,
    /// Its peak RSS, KiB.
    rss: u64,
    /// Its resident memory then, split (see [`rss_split`]).
    rss_now: String,
    /// "bulk requests, checkpoint writes".
    requests: String,
    /// The share of the wall time its request slots spent waiting on bulk requests: whether
    /// monsoon or the server set the pace. Near 100 % means the server always had as many
    /// requests as monsoon may send (start-up and the last partial round count against it).
    busy: f64,
    /// Start to the first document read, seconds (to 20 ms): how long the source's first
    /// batch took to come.
    first_read: f64,
}

/// Run monsoon (`bin`) on pipeline `yaml` until it has indexed `n` documents, measure it, and
/// stop it (SIGTERM; it must exit 0). The snapshot scenario of the `noida` and `opensearch`
/// sections.
async fn snapshot_run(bin: &std::path::Path, yaml: &str, state: &std::path::Path, n: i64) -> anyhow::Result<SnapshotRun> {
    let t = Instant::now();
    let mut monsoon = Monsoon::start(bin, yaml, state)?;
    let pid = monsoon_pid(&monsoon)?;
    let first_read = wait_first_read(&monsoon, Duration::from_secs(600)).await?.duration_since(t).as_secs_f64();
    let done = wait_indexed(&monsoon, n as u64, Duration::from_secs(1800)).await?;
    let wall = done.duration_since(t).as_secs_f64();
    let (cpu, rss) = proc_usage(pid).context("proc usage")?;
    let rss_now = rss_split(pid);
    let requests = request_counts(&monsoon);
    let metrics = monsoon.get("/metrics").map(|(_, body)| body).unwrap_or_default();
    if let Some(path) = std::env::var_os("MONSOON_BENCH_LOG") {
        // The run's log (info, the engine at debug), to see where its wall time went.
        std::fs::write(path, monsoon.log())?;
    }
    let busy = metric_sum(&metrics, "monsoon_bulk_request_seconds_sum") / (wall * BatchConfig::default().concurrency as f64);
    let (code, _) = monsoon.terminate()?;
    anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");
    Ok(SnapshotRun { wall, cpu, rss, rss_now, requests, busy, first_read })
}

/// When monsoon's snapshot had read its first document (`snapshotDocuments` in `/stats`,
/// polled every 20 ms).
async fn wait_first_read(m: &Monsoon, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    while m.stats().and_then(|s| s["snapshotDocuments"].as_u64()).unwrap_or(0) == 0 {
        if Instant::now() > deadline {
            bail!("no document read after {timeout:?}\n{}", tail(&m.log(), 20));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Instant::now())
}

/// How long SecantusDB takes to answer the snapshot's query (sorted by `_id`) with its first
/// batch, in seconds.
async fn first_batch(raw: &mongodb::Collection<RawDocumentBuf>) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut cursor = sorted_cursor(raw).await?;
    cursor.try_next().await?.context("empty collection")?;
    Ok(t.elapsed().as_secs_f64())
}

/// The change stream monsoon opens for database `bench` (database level, the same pipeline and
/// options), as raw events: what the bench's stream ceilings read.
async fn bench_stream(client: &mongodb::Client) -> anyhow::Result<mongodb::change_stream::ChangeStream<RawDocumentBuf>> {
    use monsoon_engine::source::mongodb::{stream_options, stream_pipeline};
    Ok(client
        .database("bench")
        .watch()
        .pipeline(stream_pipeline(Some(&["bench".to_string()]), false, false))
        .with_options(stream_options(false, false))
        .await?
        .with_type::<RawDocumentBuf>())
}

/// Every document of `raw`, read sorted by `_id` with one cursor (as the snapshot reads).
async fn read_sorted(raw: &mongodb::Collection<RawDocumentBuf>) -> anyhow::Result<Vec<RawDocumentBuf>> {
    Ok(sorted_cursor(raw).await?.try_collect().await?)
}

/// The snapshot's query of `raw`: every document by `_id`, 1000 a batch.
async fn sorted_cursor(raw: &mongodb::Collection<RawDocumentBuf>) -> mongodb::error::Result<mongodb::Cursor<RawDocumentBuf>> {
    raw.find(doc! {}).sort(doc! {"_id": 1}).hint(mongodb::options::Hint::Keys(doc! {"_id": 1})).batch_size(1000).await
}

/// SecantusDB's change-stream ceiling: the bench opens the stream monsoon opens (database
/// level, the same pipeline and options, raw events) and inserts `m` documents. Returns
/// (events/s from the first insert, seconds from the last insert to the last event read).
async fn stream_ceiling(client: &mongodb::Client, m: i64) -> anyhow::Result<(f64, f64)> {
    let coll = client.database("bench").collection::<Document>("watched");
    let mut stream = bench_stream(client).await?;
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < m {
            stream.next().await.context("change stream ended")??;
            seen += 1;
        }
        Ok::<_, anyhow::Error>(Instant::now())
    });
    let t = Instant::now();
    insert_all(&coll, sample_docs(30_000_000, m)).await?;
    let last_insert = Instant::now();
    let done = tokio::time::timeout(Duration::from_secs(1800), reader).await???;
    coll.drop().await?;
    Ok((m as f64 / done.duration_since(t).as_secs_f64(), done.duration_since(last_insert).as_secs_f64()))
}

async fn delete_index(esc: &elasticsearch::Elasticsearch, index: &str) -> anyhow::Result<()> {
    esc.indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[index]))
        .send()
        .await?;
    Ok(())
}

/// "bulk requests, checkpoint writes" so far, from monsoon's `/metrics`.
fn request_counts(m: &Monsoon) -> String {
    let metrics = m.get("/metrics").map(|(_, body)| body).unwrap_or_default();
    format!("{}, {}", metric_sum(&metrics, "monsoon_bulk_requests_total"), metric_sum(&metrics, "monsoon_checkpoints_total"))
}

/// The sum of a metric's series in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn monsoon_pid(m: &Monsoon) -> anyhow::Result<u32> {
    m.pid().context("monsoon not running")
}

/// The bulk bodies monsoon would send for `docs` (its default batch size), into `index`.
fn bulk_bodies(docs: &[RawDocumentBuf], index: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let index: Arc<str> = Arc::from(index);
    let mut bodies = Vec::new();
    let mut stats = ConvertStats::default();
    for chunk in docs.chunks(BatchConfig::default().max_docs) {
        let mut body = Vec::new();
        for d in chunk {
            let id = d.get("_id").ok().flatten().context("_id")?;
            let mut id_buf = Vec::new();
            convert::write_es_id(id, &mut id_buf)?;
            let mut src = Vec::new();
            convert::write_document(d, true, &mut src, &mut stats)?;
            let w = Write::new(index.clone(), index.clone(), String::from_utf8_lossy(&id_buf).into(), 1, Op::Index(Bytes::from(src)));
            request::encode(&w, &mut body);
        }
        bodies.push(body);
    }
    Ok(bodies)
}

/// The pipeline's real ceiling, in documents per second: both stand-ins at once (they share
/// the machine's cores), the sorted read of every document beside the bulk indexing of the
/// same documents into an empty index (deleted again afterwards).
async fn together_ceiling(
    raw: &mongodb::Collection<RawDocumentBuf>,
    esc: &elasticsearch::Elasticsearch,
    bodies: Vec<Vec<u8>>,
    n: i64,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let reading = async {
        let docs = read_sorted(raw).await?;
        Ok::<_, anyhow::Error>(docs.len())
    };
    let (read_back, _) = tokio::try_join!(reading, es_ceiling(esc, bodies))?;
    anyhow::ensure!(read_back as i64 == n, "read {read_back} of {n}");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    delete_index(esc, "ceiling").await?;
    Ok(rate)
}

/// The server's bulk rate (documents/s) for `bodies`, with as many requests in flight as
/// monsoon keeps by default (4).
async fn es_ceiling(esc: &elasticsearch::Elasticsearch, bodies: Vec<Vec<u8>>) -> anyhow::Result<f64> {
    // Two lines per document: the action and the source.
    let docs = bodies.iter().map(|b| b.iter().filter(|c| **c == b'\n').count() / 2).sum::<usize>();
    let t = Instant::now();
    let mut pending = futures_util::stream::iter(bodies.into_iter().map(|b| {
        let esc = esc.clone();
        async move {
            let r = esc
                .transport()
                .send(
                    elasticsearch::http::Method::Post,
                    "/_bulk",
                    elasticsearch::http::headers::HeaderMap::new(),
                    Option::<&()>::None,
                    Some(Bytes::from(b)),
                    None,
                )
                .await?;
            anyhow::ensure!(r.status_code().is_success(), "bulk failed");
            // A 200 may still hold failed items (as monsoon reads it): a ceiling that skipped
            // documents would flatter the server.
            let body: serde_json::Value = r.json().await?;
            anyhow::ensure!(body["errors"] == false, "bulk items failed: {}", truncate(&body.to_string(), 500));
            Ok::<_, anyhow::Error>(())
        }
    }))
    .buffer_unordered(BatchConfig::default().concurrency);
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(docs as f64 / t.elapsed().as_secs_f64())
}

/// At most `n` bytes of `text` (on a character boundary), for error messages.
fn truncate(text: &str, n: usize) -> &str {
    let mut end = n.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
