//! Behaviour of [`Scripts`]: Monstache's documented examples, return values, `_meta_monstache`,
//! limits and recovery, lookups, the pool. `_` has its own tests in `tests/underscore.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::*;

fn one_worker(config: Config) -> Config {
    Config { workers: 1, ..config }
}

fn map_scripts(scripts: Vec<ScriptSource>) -> Scripts {
    Scripts::new(one_worker(Config { scripts, ..Config::default() })).expect("scripts compile")
}

fn replaced(outcome: MapOutcome) -> (Value, Meta) {
    match outcome {
        MapOutcome::Replace { doc, meta } => (serde_json::from_str(&doc).expect("JSON out"), meta),
        other => panic!("expected a replaced document, got {other:?}"),
    }
}

// ---- Monstache's documentation examples ----

#[test]
fn global_omit_script_removes_password_and_secret() {
    let s = map_scripts(vec![ScriptSource::global(
        r#"
module.exports = function(doc, ns, updateDesc) {
	// the doc namespace e.g. test.test is passed as the 2nd arg
	return _.omit(doc, "password", "secret");
}
"#,
    )]);
    let out = s.map("test.users", r#"{"_id":"u1","name":"ada","password":"x","secret":"y"}"#, None).expect("maps");
    let (doc, meta) = replaced(out);
    assert_eq!(doc, json!({"_id": "u1", "name": "ada"}));
    assert!(meta.is_empty());
}

#[test]
fn soft_delete_script_drops_deleted_documents_and_keeps_the_rest() {
    let s = map_scripts(vec![ScriptSource::for_namespace(
        "db.collection",
        r#"
module.exports = function(doc) {
	if (!!doc.deletedAt) {
		return false;
	}
	return true;
}
"#,
    )]);
    assert_eq!(s.map("db.collection", r#"{"_id":1,"deletedAt":"2024-01-01T00:00:00Z"}"#, None), Ok(MapOutcome::Drop));
    assert_eq!(s.map("db.collection", r#"{"_id":1}"#, None), Ok(MapOutcome::Keep));
    // Another namespace has no script: kept without running anything.
    assert!(!s.has_map("db.other"));
    assert_eq!(s.map("db.other", r#"{"_id":1,"deletedAt":"x"}"#, None), Ok(MapOutcome::Keep));
}

#[test]
fn routing_comments_by_post_id_sets_meta_and_strips_it_from_the_source() {
    let s = map_scripts(vec![ScriptSource::for_namespace(
        "blog.comments",
        r#"
module.exports = function(doc) {
	doc._meta_monstache = { routing: doc.post_id };
	return doc;
}
"#,
    )]);
    let (doc, meta) = replaced(s.map("blog.comments", r#"{"_id":"c1","title":"Did you read this?","post_id":"123"}"#, None).expect("maps"));
    assert_eq!(doc, json!({"_id": "c1", "title": "Did you read this?", "post_id": "123"}));
    assert_eq!(meta, Meta { routing: Some("123".into()), ..Meta::default() });
}

#[test]
fn high_score_example_routes_to_another_index_and_refuses_type() {
    let src = |with_type: bool| {
        format!(
            r#"
module.exports = function(doc) {{
	if (doc.score >= 100) {{
		doc._meta_monstache = {{ index: "blog.comments.highscore", {} routing: doc.post_id }};
	}} else {{
		doc._meta_monstache = {{ routing: doc.post_id }};
	}}
	return doc;
}}
"#,
            if with_type { r#"type: "highScoreComment","# } else { "" }
        )
    };
    let s = map_scripts(vec![ScriptSource::for_namespace("blog.comments", src(false))]);
    let (_, meta) = replaced(s.map("blog.comments", r#"{"_id":"c1","score":150,"post_id":"9"}"#, None).expect("maps"));
    assert_eq!(meta.index.as_deref(), Some("blog.comments.highscore"));
    assert_eq!(meta.routing.as_deref(), Some("9"));
    let (_, meta) = replaced(s.map("blog.comments", r#"{"_id":"c2","score":5,"post_id":"9"}"#, None).expect("maps"));
    assert_eq!(meta.index, None);

    let s = map_scripts(vec![ScriptSource::for_namespace("blog.comments", src(true))]);
    let e = s.map("blog.comments", r#"{"_id":"c1","score":150,"post_id":"9"}"#, None).expect_err("type refused");
    assert!(matches!(e, ScriptError::Meta { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("script for blog.comments") && text.contains("no mapping types"), "{text}");
    // Documents that don't set `type` are unaffected.
    assert!(s.map("blog.comments", r#"{"_id":"c2","score":5,"post_id":"9"}"#, None).is_ok());
}

#[test]
fn parent_from_the_company_example_is_refused_with_routing_as_the_fix() {
    let s = map_scripts(vec![ScriptSource::for_namespace(
        "test.company",
        r#"
module.exports = function(doc, ns) {
    var meta = { index: ns.split(".")[1] };
    if (doc.type === "employee") {
        meta.parent = doc.branch;
    }
    doc._meta_monstache = meta;
    return _.omit(doc, "branch", "type");
}
"#,
    )]);
    let (doc, meta) = replaced(s.map("test.company", r#"{"_id":"london","type":"branch","name":"London Westminster"}"#, None).expect("branch"));
    assert_eq!(doc, json!({"_id": "london", "name": "London Westminster"}));
    assert_eq!(meta.index.as_deref(), Some("company"));
    let e = s.map("test.company", r#"{"_id":"alice","type":"employee","branch":"london"}"#, None).expect_err("parent refused");
    assert!(e.to_string().contains("set `routing` to the parent's id"), "{e}");
}

#[test]
fn closures_keep_state_between_calls_on_a_worker() {
    let s = map_scripts(vec![ScriptSource::for_namespace(
        "mydb.mycollection",
        r#"
var counter = 1;
module.exports = function(doc) {
	doc.foo += "test" + counter;
	counter++;
	return doc;
}
"#,
    )]);
    let foo = |n: &str| -> Value {
        let (doc, _) = replaced(s.map("mydb.mycollection", &format!(r#"{{"_id":{n},"foo":"a"}}"#), None).expect("maps"));
        doc["foo"].clone()
    };
    assert_eq!(foo("1"), json!("atest1"));
    assert_eq!(foo("2"), json!("atest2"));
    assert_eq!(foo("3"), json!("atest3"));
}

#[test]
fn field_watch_pipeline_matches_updated_fields_on_change_streams_only() {
    let s = Scripts::new(one_worker(Config {
        pipelines: vec![ScriptSource::for_namespace(
            "test.test",
            r#"
module.exports = function(ns, changeStream) {
  if (changeStream) {
    return [
      {
        $match: {
          $or: [
            { "updateDescription": {$exists: false} },
            { "updateDescription.updatedFields.foo": {$exists: true}},
            { "updateDescription.updatedFields.bar": {$exists: true}}
          ]
        }
      }
    ];
  } else {
    return [];
  }
}
"#,
        )],
        ..Config::default()
    }))
    .expect("compiles");
    let stages = s.pipeline("test.test", true).expect("stages");
    assert_eq!(
        stages,
        vec![json!({"$match": {"$or": [
            {"updateDescription": {"$exists": false}},
            {"updateDescription.updatedFields.foo": {"$exists": true}},
            {"updateDescription.updatedFields.bar": {"$exists": true}}
        ]}})]
    );
    assert_eq!(s.pipeline("test.test", false).expect("no stages"), Vec::<Value>::new());
    assert_eq!(s.pipeline("test.other", true).expect("none apply"), Vec::<Value>::new());
}

#[test]
fn global_pipeline_stages_come_before_the_namespaces_and_both_see_the_namespace() {
    let s = Scripts::new(one_worker(Config {
        pipelines: vec![
            ScriptSource::for_namespace("a.b", r#"module.exports = function(ns, cs) { return [{$match: {ns: ns, own: true}}]; }"#),
            ScriptSource::global(r#"module.exports = function(ns, cs) { return cs ? [{$match: {"fullDocument.foo": 1, ns: ns}}] : [{$match: {foo: 1}}]; }"#),
        ],
        ..Config::default()
    }))
    .expect("compiles");
    assert_eq!(
        s.pipeline("a.b", true).expect("stages"),
        vec![json!({"$match": {"fullDocument.foo": 1, "ns": "a.b"}}), json!({"$match": {"ns": "a.b", "own": true}})]
    );
    assert_eq!(s.pipeline("x.y", false).expect("global only"), vec![json!({"$match": {"foo": 1}})]);
}

#[test]
fn a_pipeline_that_returns_no_array_is_an_error() {
    let s = Scripts::new(one_worker(Config {
        pipelines: vec![
            ScriptSource::for_namespace("a.b", "module.exports = function() { return {$match: {}}; }"),
            ScriptSource::for_namespace("a.c", "module.exports = function() { return [{$match: {}}, 5]; }"),
        ],
        ..Config::default()
    }))
    .expect("compiles");
    let e = s.pipeline("a.b", true).expect_err("object");
    assert!(matches!(e, ScriptError::BadReturn { .. }) && e.to_string().contains("returned an object"), "{e}");
    let e = s.pipeline("a.c", true).expect_err("number stage");
    assert!(e.to_string().contains("element 1 is a number (5)"), "{e}");
}

// ---- mapping semantics ----

#[test]
fn global_scripts_run_before_the_namespaces_own_and_hand_it_their_result() {
    let s = map_scripts(vec![
        ScriptSource::for_namespace("a.b", "module.exports = function(doc) { doc.order.push('ns'); doc.sawMeta = !!doc._meta_monstache; return doc; }"),
        ScriptSource::global("module.exports = function(doc) { doc.order = ['global']; doc._meta_monstache = {routing: 'r'}; return doc; }"),
    ]);
    let (doc, meta) = replaced(s.map("a.b", r#"{"_id":1}"#, None).expect("maps"));
    assert_eq!(doc, json!({"_id": 1, "order": ["global", "ns"], "sawMeta": true}));
    assert_eq!(meta.routing.as_deref(), Some("r"));
    // Only the global one applies elsewhere.
    let (doc, _) = replaced(s.map("c.d", r#"{"_id":1}"#, None).expect("maps"));
    assert_eq!(doc["order"], json!(["global"]));
}

#[test]
fn true_after_a_replacing_script_keeps_the_replaced_document() {
    let s = map_scripts(vec![
        ScriptSource::global("module.exports = function(doc) { return {replaced: true}; }"),
        ScriptSource::for_namespace("a.b", "module.exports = function(doc) { return true; }"),
    ]);
    let (doc, _) = replaced(s.map("a.b", r#"{"_id":1}"#, None).expect("maps"));
    assert_eq!(doc, json!({"replaced": true}));
}

#[test]
fn a_falsy_global_result_drops_before_the_namespace_script_runs() {
    let s = map_scripts(vec![
        ScriptSource::global("module.exports = function(doc) { return doc.keep ? true : null; }"),
        ScriptSource::for_namespace("a.b", "module.exports = function(doc) { throw new Error('must not run'); }"),
    ]);
    assert_eq!(s.map("a.b", r#"{"_id":1}"#, None), Ok(MapOutcome::Drop));
}

#[test]
fn every_falsy_value_drops() {
    for v in ["false", "null", "undefined", "0", "''", "NaN"] {
        let s = map_scripts(vec![ScriptSource::global(format!("module.exports = function(doc) {{ return {v}; }}"))]);
        assert_eq!(s.map("a.b", r#"{"_id":1}"#, None), Ok(MapOutcome::Drop), "{v}");
    }
    // A function that forgets to return drops too (Monstache's behaviour).
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { doc.x = 1; }")]);
    assert_eq!(s.map("a.b", r#"{"_id":1}"#, None), Ok(MapOutcome::Drop));
}

#[test]
fn garbage_return_values_are_errors_that_say_what_came_back() {
    for (v, what) in [
        ("42", "a number (42)"),
        ("'oops'", "a string (\"oops\")"),
        ("[doc]", "an array"),
        ("function() {}", "a function"),
        ("new Date(0)", "a Date"),
        ("new Error('x')", "a Error"),
        ("/re/", "a RegExp"),
    ] {
        let s = map_scripts(vec![ScriptSource::for_namespace("a.b", format!("module.exports = function(doc) {{ return {v}; }}"))]);
        let e = s.map("a.b", r#"{"_id":1}"#, None).expect_err(v);
        assert!(matches!(e, ScriptError::BadReturn { .. }), "{v}: {e:?}");
        let text = e.to_string();
        assert!(text.contains(&format!("script for a.b returned {what}")), "{v}: {text}");
        assert!(!e.is_retriable());
    }
}

#[test]
fn this_is_the_document_and_arguments_follow_monstache() {
    let s = map_scripts(vec![ScriptSource::global(
        "module.exports = function(doc, ns, updateDesc) { return {same: this === doc, ns: ns, ud: updateDesc}; }",
    )]);
    let (doc, _) = replaced(s.map("db.c", r#"{"_id":1}"#, Some(r#"{"updatedFields":{"a":2},"removedFields":[]}"#)).expect("maps"));
    assert_eq!(doc, json!({"same": true, "ns": "db.c", "ud": {"updatedFields": {"a": 2}, "removedFields": []}}));
    // No update description: an empty object, as Monstache passes.
    let (doc, _) = replaced(s.map("db.c", r#"{"_id":1}"#, None).expect("maps"));
    assert_eq!(doc["ud"], json!({}));
}

#[test]
fn values_cross_as_json_both_ways() {
    let s = map_scripts(vec![ScriptSource::global(
        r#"module.exports = function(doc) {
            return {
                year: new Date(doc.created).getUTCFullYear(),
                stamped: new Date(Date.UTC(2024, 0, 2, 3, 4, 5)),
                nan: NaN, inf: Infinity, gone: undefined, fn: function() {},
                oid: doc._id, big: doc.big, nested: doc.a.b[1]
            };
        }"#,
    )]);
    let (doc, _) = replaced(
        s.map("a.b", r#"{"_id":"65a1b2c3d4e5f6a7b8c90001","created":"2023-05-06T07:08:09.010Z","big":9007199254740993,"a":{"b":[1,{"c":true}]}}"#, None)
            .expect("maps"),
    );
    assert_eq!(
        doc,
        json!({"year": 2023, "stamped": "2024-01-02T03:04:05.000Z", "nan": null, "inf": null,
               "oid": "65a1b2c3d4e5f6a7b8c90001", "big": 9007199254740992_u64, "nested": {"c": true}})
    );
}

#[test]
fn unreadable_input_is_an_input_error() {
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { return true; }")]);
    let e = s.map("a.b", "{not json", None).expect_err("bad JSON");
    assert!(matches!(e, ScriptError::Input { .. }), "{e:?}");
    let e = s.map("a.b", "[1,2]", None).expect_err("not an object");
    assert!(e.to_string().contains("the document is an array"), "{e}");
}

#[test]
fn a_meta_that_is_not_an_object_is_refused() {
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { doc._meta_monstache = 'blog'; return doc; }")]);
    let e = s.map("a.b", r#"{"_id":1}"#, None).expect_err("string meta");
    assert!(matches!(e, ScriptError::Meta { .. }) && e.to_string().contains("expected an object"), "{e}");
}

// ---- filters ----

#[test]
fn filters_keep_truthy_and_ignore_falsy_global_first() {
    let s = Scripts::new(one_worker(Config {
        filters: vec![
            ScriptSource::for_namespace("db.collection", "module.exports = function(doc, ns, updateDesc) { return !!doc.interesting; }"),
            ScriptSource::global("module.exports = function(doc) { return doc.tenant !== 'blocked' ? 1 : 0; }"),
        ],
        ..Config::default()
    }))
    .expect("compiles");
    assert_eq!(s.filter("db.collection", r#"{"interesting":true}"#, None), Ok(true));
    assert_eq!(s.filter("db.collection", r#"{"interesting":false}"#, None), Ok(false));
    assert_eq!(s.filter("db.collection", r#"{"interesting":true,"tenant":"blocked"}"#, None), Ok(false));
    assert_eq!(s.filter("db.other", r#"{"tenant":"x"}"#, None), Ok(true));
    assert_eq!(s.filter("db.other", r#"{"tenant":"blocked"}"#, None), Ok(false));
    assert!(!s.has_map("db.collection"));
}

// ---- errors, limits and recovery ----

#[test]
fn a_throwing_script_reports_its_message_and_line() {
    let s = map_scripts(vec![ScriptSource {
        namespace: Some("a.b".into()),
        source: "module.exports = function(doc) {\n  var x = doc.missing;\n  return x.field;\n}".into(),
        origin: Some("transform.js".into()),
    }]);
    let e = s.map("a.b", r#"{"_id":1}"#, None).expect_err("throws");
    let ScriptError::Threw { script, message, stack } = &e else { panic!("{e:?}") };
    assert_eq!(script, "script for a.b (transform.js)");
    assert!(message.starts_with("TypeError"), "{message}");
    let stack = stack.as_deref().unwrap_or_default();
    assert!(stack.contains("script for a.b (transform.js):3"), "{stack}");
    assert!(e.to_string().contains(":3"), "{e}");
}

#[test]
fn throwing_a_non_error_value_still_says_what_was_thrown() {
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { throw {code: 7}; }")]);
    let e = s.map("a.b", r#"{"_id":1}"#, None).expect_err("throws");
    assert!(e.to_string().contains(r#"uncaught {"code":7}"#), "{e}");
}

#[test]
fn a_looping_script_is_interrupted_and_the_worker_goes_on() {
    let s = Scripts::new(Config {
        scripts: vec![ScriptSource::global("module.exports = function(doc) { if (doc.loop) { while (true) {} } return true; }")],
        limits: Limits { timeout: Duration::from_millis(200), ..Limits::default() },
        workers: 1,
        ..Config::default()
    })
    .expect("compiles");
    let e = s.map("a.b", r#"{"loop":true}"#, None).expect_err("interrupted");
    assert!(matches!(e, ScriptError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("interrupted after running longer than 200ms"), "{e}");
    // Same worker (there is one), next document: fine.
    assert_eq!(s.map("a.b", r#"{"loop":false}"#, None), Ok(MapOutcome::Keep));
    // A try/catch cannot swallow the interrupt.
    let s = Scripts::new(Config {
        scripts: vec![ScriptSource::global("module.exports = function(doc) { try { while (true) {} } catch (e) { return true; } }")],
        limits: Limits { timeout: Duration::from_millis(100), ..Limits::default() },
        workers: 1,
        ..Config::default()
    })
    .expect("compiles");
    assert!(matches!(s.map("a.b", "{}", None), Err(ScriptError::Timeout { .. })));
}

#[test]
fn a_script_that_exhausts_memory_fails_alone_and_the_worker_recovers() {
    let s = Scripts::new(Config {
        scripts: vec![ScriptSource::global(
            r#"var hoard = [];
            module.exports = function(doc) {
                if (doc.greedy) { while (true) { hoard.push(new Array(100000).fill(hoard.length)); } }
                return {hoarded: hoard.length};
            }"#,
        )],
        limits: Limits { memory_limit: 16 << 20, timeout: Duration::from_secs(10), ..Limits::default() },
        workers: 1,
        ..Config::default()
    })
    .expect("compiles");
    let e = s.map("a.b", r#"{"greedy":true}"#, None).expect_err("out of memory");
    assert!(matches!(e, ScriptError::OutOfMemory { limit, .. } if limit == 16 << 20), "{e:?}");
    // The worker's runtime was rebuilt: the hoard is gone and documents go through.
    let (doc, _) = replaced(s.map("a.b", r#"{"greedy":false}"#, None).expect("recovered"));
    assert_eq!(doc, json!({"hoarded": 0}));
}

#[test]
fn deep_recursion_fails_cleanly() {
    let s = map_scripts(vec![ScriptSource::global(
        "function f(n) { return n <= 0 ? 0 : 1 + f(n - 1); }\nmodule.exports = function(doc) { return {n: f(doc.depth)}; }",
    )]);
    let e = s.map("a.b", r#"{"depth":10000000}"#, None).expect_err("stack overflow");
    assert!(e.to_string().to_lowercase().contains("stack"), "{e}");
    let (doc, _) = replaced(s.map("a.b", r#"{"depth":100}"#, None).expect("fine"));
    assert_eq!(doc, json!({"n": 100}));
}

#[test]
fn compile_errors_name_the_script_and_line() {
    let cfg = |src: &str| Config { scripts: vec![ScriptSource::for_namespace("a.b", src)], workers: 1, ..Config::default() };
    let e = Scripts::new(cfg("module.exports = function(doc) {\n  return doc +;\n}")).expect_err("syntax");
    let ScriptError::Compile { script, message } = &e else { panic!("{e:?}") };
    assert_eq!(script, "script for a.b");
    assert!(message.contains("SyntaxError") && message.contains(":2"), "{message}");
    let e = Scripts::new(cfg("module.exports = 42;")).expect_err("no function");
    assert!(e.to_string().contains("must assign a function to module.exports, got a number (42)"), "{e}");
    let e = Scripts::new(cfg("throw new Error('boom at load');")).expect_err("throws at load");
    assert!(e.to_string().contains("boom at load"), "{e}");
    let e = Scripts::new(Config {
        scripts: vec![ScriptSource::global("while (true) {}")],
        limits: Limits { timeout: Duration::from_millis(50), ..Limits::default() },
        workers: 1,
        ..Config::default()
    })
    .expect_err("loops at load");
    assert!(e.to_string().contains("loading took longer"), "{e}");
}

#[test]
fn invalid_configurations_are_refused() {
    let e = Scripts::new(Config {
        scripts: vec![ScriptSource::for_namespace("a.b", "module.exports = function(){return true;}"); 2],
        ..Config::default()
    })
    .expect_err("duplicate");
    assert!(e.to_string().contains("two scripts for namespace a.b"), "{e}");
    let e = Scripts::new(Config { filters: vec![ScriptSource::global("  ")], ..Config::default() }).expect_err("empty");
    assert!(e.to_string().contains("has no source"), "{e}");
}

#[test]
fn scripts_do_not_see_each_others_top_level_variables() {
    let s = map_scripts(vec![
        ScriptSource::global("var tag = 'global'; module.exports = function(doc) { doc.a = tag; return doc; }"),
        ScriptSource::for_namespace("a.b", "var tag = 'ns'; module.exports = function(doc) { doc.b = tag; return doc; }"),
    ]);
    let (doc, _) = replaced(s.map("a.b", "{}", None).expect("maps"));
    assert_eq!(doc, json!({"a": "global", "b": "ns"}));
}

// ---- lookups ----

/// An in-memory stand-in for the engine's MongoDB lookups: equality filters, sort, limit,
/// projection, and `$match`/`$limit`/`$project` stages.
#[derive(Default)]
struct MemoryLookup {
    collections: HashMap<(String, String), Vec<Value>>,
    fail: Option<String>,
    seen: Mutex<Vec<LookupRequest>>,
    barrier: Option<Barrier>,
}

impl MemoryLookup {
    fn with(mut self, db: &str, coll: &str, docs: Value) -> Self {
        let docs = docs.as_array().cloned().unwrap_or_default();
        self.collections.insert((db.to_owned(), coll.to_owned()), docs);
        self
    }
}

fn matches(doc: &Value, filter: &Value) -> bool {
    filter.as_object().is_none_or(|f| f.iter().all(|(k, v)| doc.get(k) == Some(v)))
}

fn project(doc: &Value, select: &serde_json::Map<String, Value>) -> Value {
    if select.is_empty() {
        return doc.clone();
    }
    let include: Vec<&String> = select.iter().filter(|(_, v)| v.as_i64() == Some(1)).map(|(k, _)| k).collect();
    let mut out = serde_json::Map::new();
    for (k, v) in doc.as_object().into_iter().flatten() {
        let wanted = if k == "_id" { select.get("_id").and_then(Value::as_i64) != Some(0) } else { include.contains(&k) };
        if wanted {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

impl Lookup for MemoryLookup {
    fn lookup(&self, r: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
        self.seen.lock().expect("lock").push(r.clone());
        if let Some(b) = &self.barrier {
            b.wait();
        }
        if let Some(msg) = &self.fail {
            return Err(msg.clone().into());
        }
        let docs = self.collections.get(&(r.database.clone(), r.collection.clone())).cloned().unwrap_or_default();
        let mut out: Vec<Value> = match r.kind {
            LookupKind::Pipe => {
                let mut docs = docs;
                for stage in r.query.as_array().into_iter().flatten() {
                    if let Some(m) = stage.get("$match") {
                        docs.retain(|d| matches(d, m));
                    } else if let Some(n) = stage.get("$limit").and_then(Value::as_u64) {
                        docs.truncate(n as usize);
                    } else if let Some(p) = stage.get("$project").and_then(Value::as_object) {
                        docs = docs.iter().map(|d| project(d, p)).collect();
                    }
                }
                docs
            }
            _ => docs.into_iter().filter(|d| matches(d, &r.query)).collect(),
        };
        for (field, dir) in r.sort.iter().rev() {
            out.sort_by(|a, b| {
                let o = a[field].as_str().cmp(&b[field].as_str()).then(a[field].as_f64().partial_cmp(&b[field].as_f64()).unwrap_or(std::cmp::Ordering::Equal));
                if *dir < 0 { o.reverse() } else { o }
            });
        }
        if let Some(n) = r.limit {
            out.truncate(n as usize);
        }
        Ok(out.iter().map(|d| project(d, &r.select)).collect())
    }
}

fn with_lookup(lookup: Arc<MemoryLookup>, scripts: Vec<ScriptSource>) -> Scripts {
    with_lookup_dyn(lookup, scripts)
}

fn with_lookup_dyn(lookup: Arc<dyn Lookup>, scripts: Vec<ScriptSource>) -> Scripts {
    Scripts::with_lookup(one_worker(Config { scripts, ..Config::default() }), lookup).expect("compiles")
}

#[test]
fn find_id_embeds_the_referenced_document() {
    let lookup = Arc::new(MemoryLookup::default().with("test", "users", json!([
        {"_id": "65a1b2c3d4e5f6a7b8c90001", "name": "ada"},
        {"_id": "65a1b2c3d4e5f6a7b8c90002", "name": "charles"}
    ])));
    let s = with_lookup(
        Arc::clone(&lookup),
        vec![ScriptSource::for_namespace(
            "test.posts",
            r#"
module.exports = function(post) {
    if (post.author) { // author is a an object id reference
        post.author = findId(post.author, {
          database: "test",
          collection: "users"
        });
    }
    return post;
}
"#,
        )],
    );
    let (doc, _) = replaced(s.map("test.posts", r#"{"_id":"p1","author":"65a1b2c3d4e5f6a7b8c90002"}"#, None).expect("maps"));
    assert_eq!(doc, json!({"_id": "p1", "author": {"_id": "65a1b2c3d4e5f6a7b8c90002", "name": "charles"}}));
    // Not found: null, as in Monstache.
    let (doc, _) = replaced(s.map("test.posts", r#"{"_id":"p2","author":"nobody"}"#, None).expect("maps"));
    assert_eq!(doc["author"], Value::Null);
    let seen = lookup.seen.lock().expect("lock");
    assert_eq!(seen[0].kind, LookupKind::FindId);
    assert_eq!(seen[0].query, json!({"_id": "65a1b2c3d4e5f6a7b8c90002"}));
}

#[test]
fn find_sorts_limits_and_selects_in_the_documents_namespace_by_default() {
    let lookup = Arc::new(MemoryLookup::default().with("test", "test", json!([
        {"_id": 1, "name": "c", "age": 30}, {"_id": 2, "name": "a", "age": 20}, {"_id": 3, "name": "b", "age": 40},
        {"_id": 4, "name": "a", "age": 50}
    ])));
    let s = with_lookup(
        Arc::clone(&lookup),
        vec![ScriptSource::for_namespace(
            "test.test",
            r#"
module.exports = function(doc) {
    doc.twoAgesSortedByName = find({}, {
            sort: ["name"],
            limit: 2,
            select: {
              age: 1
            }
    });
    doc.byAgeDesc = _.pluck(find({}, {sort: {age: -1}}), "_id");
    doc.byNameThenAgeDesc = _.pluck(find({}, {sort: {name: 1, age: -1}}), "_id");
    doc.none = find({name: "zzz"});
    doc.one = findOne({name: "b"}, {select: {name: 1, _id: 0}});
    return doc;
}
"#,
        )],
    );
    let (doc, _) = replaced(s.map("test.test", r#"{"_id":9}"#, None).expect("maps"));
    assert_eq!(doc["twoAgesSortedByName"], json!([{"_id": 2, "age": 20}, {"_id": 4, "age": 50}]));
    assert_eq!(doc["byAgeDesc"], json!([4, 3, 1, 2]));
    // The object form keeps its keys' order (name first), unlike a JSON map sorted by key.
    assert_eq!(doc["byNameThenAgeDesc"], json!([4, 2, 3, 1]));
    assert_eq!(doc["none"], json!([]));
    assert_eq!(doc["one"], json!({"name": "b"}));
    let seen = lookup.seen.lock().expect("lock");
    assert_eq!((seen[0].database.as_str(), seen[0].collection.as_str()), ("test", "test"));
}

#[test]
fn pipe_runs_stages_and_stores_the_result() {
    let lookup = Arc::new(MemoryLookup::default().with("test", "test", json!([{"_id": 1, "foo": 2}, {"_id": 2, "foo": 1}, {"_id": 3, "foo": 1}])));
    let s = with_lookup(
        lookup,
        vec![ScriptSource::for_namespace(
            "test.test",
            r#"
module.exports = function(doc, ns) {
  doc.extra = pipe([
    { $match: {foo: 1} },
    { $limit: 1 },
    { $project: { _id: 0, foo: 1}}
  ]
  // optional , { database: "foo", collection: "bar"} // defaults to same namespace
  );
  return doc;
}
"#,
        )],
    );
    let (doc, _) = replaced(s.map("test.test", r#"{"_id":9}"#, None).expect("maps"));
    assert_eq!(doc["extra"], json!([{"foo": 1}]));
}

#[test]
fn a_failed_lookup_fails_the_document_as_retriable_unless_the_script_catches_it() {
    let failing = || Arc::new(MemoryLookup { fail: Some("connection refused".into()), ..MemoryLookup::default() });
    let s = with_lookup(failing(), vec![ScriptSource::global("module.exports = function(doc) { doc.u = findId(doc.uid); return doc; }")]);
    let e = s.map("a.b", r#"{"uid":"x"}"#, None).expect_err("lookup failed");
    assert!(matches!(e, ScriptError::Lookup { .. }) && e.is_retriable(), "{e:?}");
    assert!(e.to_string().contains("connection refused"), "{e}");
    let s = with_lookup(
        failing(),
        vec![ScriptSource::global("module.exports = function(doc) { try { doc.u = findId(doc.uid); } catch (e) { doc.err = e.message; } return doc; }")],
    );
    let (doc, _) = replaced(s.map("a.b", r#"{"uid":"x"}"#, None).expect("caught"));
    assert_eq!(doc["err"], json!("findId failed: connection refused"));
}

/// A lookup the server refused for good (a malformed query) is the document's error, not an
/// outage: retrying it would only delay the dead letter.
#[test]
fn a_refused_query_fails_the_document_without_retries() {
    struct Refusing;
    impl Lookup for Refusing {
        fn lookup(&self, _r: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
            Err(Box::new(crate::QueryError("unknown operator: $eqq".into())))
        }
    }
    let s = with_lookup_dyn(Arc::new(Refusing), vec![ScriptSource::global("module.exports = function(doc) { doc.u = findOne({a: {$eqq: 1}}); return doc; }")]);
    let e = s.map("a.b", "{}", None).expect_err("refused");
    assert!(matches!(e, ScriptError::Threw { .. }) && !e.is_retriable(), "{e:?}");
    assert!(e.to_string().contains("unknown operator: $eqq"), "{e}");
}

#[test]
fn bad_lookup_arguments_are_script_errors_not_retriable() {
    let s = with_lookup(Arc::new(MemoryLookup::default()), vec![ScriptSource::global("module.exports = function(doc) { return {r: find({}, {limt: 1})}; }")]);
    let e = s.map("a.b", "{}", None).expect_err("bad option");
    assert!(matches!(e, ScriptError::Threw { .. }) && !e.is_retriable(), "{e:?}");
    assert!(e.to_string().contains("unknown option `limt`"), "{e}");
}

#[test]
fn without_a_lookup_scripts_get_a_clear_error() {
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { return {r: findOne({a: 1})}; }")]);
    let e = s.map("a.b", "{}", None).expect_err("no lookup");
    assert!(e.to_string().contains("lookups are not available"), "{e}");
}

// ---- the pool ----

#[test]
fn map_batch_returns_results_in_order_across_workers() {
    let s = Scripts::new(Config {
        scripts: vec![ScriptSource::global("module.exports = function(doc) { if (doc.n % 5 === 0) return false; return {n: doc.n * 2}; }")],
        workers: 2,
        ..Config::default()
    })
    .expect("compiles");
    assert_eq!(s.workers(), 2);
    let items: Vec<Item> = (0..200)
        .map(|n| Item { namespace: "a.b".into(), doc: format!(r#"{{"n":{n}}}"#), update_desc: None })
        .collect();
    let results = s.map_batch(items);
    assert_eq!(results.len(), 200);
    for (n, r) in results.into_iter().enumerate() {
        if n % 5 == 0 {
            assert_eq!(r, Ok(MapOutcome::Drop));
        } else {
            assert_eq!(replaced(r.expect("maps")).0, json!({"n": n * 2}));
        }
    }
}

#[test]
fn workers_run_scripts_at_the_same_time() {
    // Each lookup waits until two are in flight at once: with a global lock this would hang
    // until the deadline; with two workers both calls finish.
    let lookup = Arc::new(MemoryLookup { barrier: Some(Barrier::new(2)), ..MemoryLookup::default() }.with("a", "b", json!([{"_id": 1}])));
    let s = Scripts::with_lookup(
        Config {
            scripts: vec![ScriptSource::global("module.exports = function(doc) { return {found: findId(1)}; }")],
            workers: 2,
            limits: Limits { timeout: Duration::from_secs(20), ..Limits::default() },
            ..Config::default()
        },
        lookup,
    )
    .expect("compiles");
    let item = || Item { namespace: "a.b".into(), doc: "{}".into(), update_desc: None };
    for r in s.map_batch(vec![item(), item()]) {
        assert_eq!(replaced(r.expect("maps")).0, json!({"found": {"_id": 1}}));
    }
}

#[test]
fn pending_results_can_be_awaited_without_blocking_a_thread() {
    use std::future::Future;
    use std::task::{Context as TaskContext, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let s = map_scripts(vec![ScriptSource::global("module.exports = function(doc) { return {x: doc.x + 1}; }")]);
    let mut pending = s.submit_map(Item { namespace: "a.b".into(), doc: r#"{"x":1}"#.into(), update_desc: None });
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let result = loop {
        match std::pin::Pin::new(&mut pending).poll(&mut cx) {
            Poll::Ready(r) => break r,
            Poll::Pending => std::thread::park(),
        }
    };
    assert_eq!(replaced(result.expect("maps")).0, json!({"x": 2}));
}

#[test]
fn a_submitted_batch_can_be_awaited_once_for_all_its_items() {
    use std::future::Future;
    use std::task::{Context as TaskContext, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let s = Scripts::new(Config {
        scripts: vec![ScriptSource::for_namespace("a.b", "module.exports = function(doc) { return {x: doc.x + 1}; }")],
        workers: 2,
        ..Config::default()
    })
    .expect("compiles");
    let items: Vec<Item> = (0..50)
        .map(|x| Item { namespace: if x == 7 { "no.script".into() } else { "a.b".into() }, doc: format!(r#"{{"x":{x}}}"#), update_desc: None })
        .collect();
    let mut pending = s.submit_map_batch(items);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let results = loop {
        match std::pin::Pin::new(&mut pending).poll(&mut cx) {
            Poll::Ready(r) => break r,
            Poll::Pending => std::thread::park(),
        }
    };
    assert_eq!(results.len(), 50);
    for (x, r) in results.into_iter().enumerate() {
        if x == 7 {
            assert_eq!(r, Ok(MapOutcome::Keep), "no script for that namespace");
        } else {
            assert_eq!(replaced(r.expect("maps")).0, json!({"x": x + 1}));
        }
    }
}

/// `{"x": 0}` to `{"x": 19}`: the first ten in `a.b`, the rest in `c.d`.
fn twenty_items() -> Vec<Item> {
    (0..20).map(|x| Item { namespace: if x < 10 { "a.b".into() } else { "c.d".into() }, doc: format!(r#"{{"x":{x}}}"#), update_desc: None }).collect()
}

/// A filter of `a.b` keeping even `x`.
fn even_filter() -> ScriptSource {
    ScriptSource::for_namespace("a.b", "module.exports = function(doc) { return doc.x % 2 === 0; }")
}

#[test]
fn filter_batch_keeps_order_and_namespaces() {
    let s = Scripts::new(Config {
        filters: vec![even_filter()],
        workers: 2,
        ..Config::default()
    })
    .expect("compiles");
    let items = twenty_items();
    let kept: Vec<bool> = s.filter_batch(items).into_iter().map(|r| r.expect("filters")).collect();
    let expected: Vec<bool> = (0..20).map(|x| x >= 10 || x % 2 == 0).collect();
    assert_eq!(kept, expected);
}

/// One call per document runs the filter and then, only for what it keeps, the map script:
/// results in order, the map script never sees a dropped document, a namespace without
/// scripts is kept as it is without a call.
#[test]
fn decide_batch_runs_the_map_script_only_for_what_the_filter_keeps() {
    let s = Scripts::new(Config {
        filters: vec![even_filter()],
        scripts: vec![ScriptSource::for_namespace(
            "a.b",
            "var seen = 0; module.exports = function(doc) { if (doc.x % 2 !== 0) throw new Error('saw a dropped document'); seen++; return {x: doc.x, seen: seen > 0}; }",
        )],
        workers: 2,
        ..Config::default()
    })
    .expect("compiles");
    let items = twenty_items();
    let batch = s.submit_decide_batch(items);
    let decided: Vec<Decision> = batch.wait().into_iter().map(|r| r.expect("decides")).collect();
    for (x, d) in decided.iter().enumerate() {
        let expected = match x {
            10.. => Decision::Mapped(MapOutcome::Keep),
            x if x % 2 == 0 => Decision::Mapped(MapOutcome::Replace { doc: format!(r#"{{"x":{x},"seen":true}}"#), meta: Meta::default() }),
            _ => Decision::Ignored,
        };
        assert_eq!(d, &expected, "document {x}");
    }
    let one = s.submit_decide(Item { namespace: "a.b".into(), doc: r#"{"x":3}"#.into(), update_desc: None }).wait();
    assert_eq!(one, Ok(Decision::Ignored));
}

#[test]
fn dropping_scripts_stops_the_workers() {
    let s = Scripts::new(Config { scripts: vec![ScriptSource::global("module.exports = function(d) { return true; }")], workers: 2, ..Config::default() })
        .expect("compiles");
    drop(s); // joins both workers; a hang here fails the test by timeout
}

#[test]
fn scripts_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Scripts>();
    assert_send_sync::<Pending<MapOutcome>>();
    assert_send_sync::<PendingBatch<bool>>();
}

#[test]
fn a_panicking_lookup_fails_its_document_and_the_worker_goes_on() {
    struct Panics;
    impl Lookup for Panics {
        fn lookup(&self, r: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
            if r.query == json!({"_id": "boom"}) {
                panic!("lookup bug");
            }
            Ok(vec![json!({"ok": true})])
        }
    }
    let s = with_lookup_dyn(Arc::new(Panics), vec![ScriptSource::global("module.exports = function(doc) { return {r: findId(doc.id)}; }")]);
    let e = s.map("a.b", r#"{"id":"boom"}"#, None).expect_err("panicked");
    assert!(matches!(&e, ScriptError::Internal(m) if m.contains("lookup bug")) && !e.is_retriable(), "{e:?}");
    let (doc, _) = replaced(s.map("a.b", r#"{"id":"fine"}"#, None).expect("recovered"));
    assert_eq!(doc, json!({"r": {"ok": true}}));
}

#[test]
fn an_empty_configuration_starts_no_workers() {
    let s = Scripts::new(Config::default()).expect("empty is fine");
    assert_eq!(s.workers(), 0);
    assert_eq!(s.map("a.b", "{}", None), Ok(MapOutcome::Keep));
    assert_eq!(s.filter("a.b", "{}", None), Ok(true));
    assert_eq!(s.pipeline("a.b", true), Ok(vec![]));
}

#[test]
fn only_scripts_naming_meta_may_place_documents() {
    let config = Config {
        scripts: vec![
            ScriptSource::for_namespace("db.plain", "module.exports = function(doc) { doc.x = 1; return doc; }"),
            ScriptSource::for_namespace("db.routed", "module.exports = function(doc) { doc._meta_monstache = { routing: doc.r }; return doc; }"),
        ],
        ..Config::default()
    };
    let scripts = Scripts::new(config).expect("compiles");
    assert!(!scripts.may_place("db.plain"));
    assert!(scripts.may_place("db.routed"));
    assert!(!scripts.may_place("db.other"));
}
