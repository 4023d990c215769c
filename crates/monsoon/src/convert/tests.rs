//! Conversion tests: each Monstache option, and the invariant that every configuration either
//! converts into a pipeline `monsoon validate` accepts or is refused with one line naming the
//! option.

use super::connection::{ENV_ES_PASSWORD, ENV_MONGODB_URI};
use super::*;
use monsoon_api::{DropPolicy, WriteMode};

fn converted(text: &str) -> Conversion {
    let c = convert(text, "shop").expect("converts");
    // The output always passes validation.
    let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
    monsoon_api::parse_manifest(&yaml, monsoon_engine::check_connection_string).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    c
}

fn noted<'a>(c: &'a Conversion, option: &str) -> Option<&'a str> {
    c.notes.iter().find(|n| n.option == option).map(|n| n.reason.as_str())
}

#[test]
fn connection_namespaces_batching_and_mappings_carry_over() {
    let c = converted(
        r#"
mongo-url = "mongodb://db-0:27017/?replicaSet=rs0"
elasticsearch-urls = ["https://es-1:9200", "https://es-2:9200"]
elasticsearch-pem-file = "/etc/ssl/es-ca.pem"
gzip = true
direct-read-namespaces = ["shop.orders"]
change-stream-namespaces = ["shop.orders", "logs"]
elasticsearch-max-docs = 500
elasticsearch-max-seconds = 2
elasticsearch-max-conns = 8
dropped-collections = false

[[mapping]]
namespace = "shop.orders"
index = "orders"
type = "order"
"#,
    );
    let s = &c.pipeline.spec;
    assert_eq!(s.mongodb.uri.as_deref(), Some("mongodb://db-0:27017/?replicaSet=rs0"));
    assert_eq!(s.elasticsearch.urls, ["https://es-1:9200", "https://es-2:9200"]);
    assert_eq!(s.elasticsearch.ca_from.as_ref().and_then(|v| v.file.as_deref()), Some("/etc/ssl/es-ca.pem"));
    assert!(s.elasticsearch.gzip);
    assert_eq!(s.namespaces, ["logs.*", "shop.orders"]);
    assert!(s.snapshot);
    assert_eq!(s.snapshot_namespaces, ["shop.orders"], "Monstache reads shop.orders directly and only streams logs");
    assert_eq!((s.batch.max_docs, s.batch.flush_interval_ms, s.batch.concurrency), (500, 2000, 8));
    assert_eq!(s.on_drop, DropPolicy::Keep);
    assert_eq!(s.indexes.get("shop.orders").map(String::as_str), Some("orders"));
    assert!(noted(&c, "[[mapping]].type").is_some_and(|r| r.contains("no mapping types")));
}

#[test]
fn credentials_are_never_copied() {
    let c = converted(
        r#"
mongo-url = "mongodb://app:s3cret@db-0:27017/"
elasticsearch-user = "elastic"
elasticsearch-password = "hunter2"
change-stream-namespaces = ["shop.orders"]
"#,
    );
    let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
    assert!(!yaml.contains("s3cret") && !yaml.contains("hunter2"), "{yaml}");
    assert_eq!(c.pipeline.spec.mongodb.uri_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_MONGODB_URI));
    assert_eq!(c.pipeline.spec.elasticsearch.password_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_ES_PASSWORD));
    assert!(noted(&c, "mongo-url").is_some_and(|r| r.contains(ENV_MONGODB_URI)));
    assert!(!c.pipeline.spec.snapshot, "no direct reads: changes only");
}

#[test]
fn every_option_left_out_is_named_with_a_reason() {
    let c = converted(
        r#"
change-stream-namespaces = ["shop.orders"]
direct-read-namespaces = ["shop.orders", "shop.users"]
resume = true
workers = ["a", "b"]
time-machine-namespaces = ["shop.orders"]
no-such-option = 1

[[script]]
namespace = "shop.orders"
script = "module.exports = function(doc) { return doc; }"
"#,
    );
    assert!(noted(&c, "resume").is_some_and(|r| r.starts_with("not needed")));
    assert!(noted(&c, "workers").is_some_and(|r| r.contains("spec.workers")));
    assert!(noted(&c, "time-machine-namespaces").is_some_and(|r| r.starts_with("`timeMachine`")));
    assert_eq!(c.pipeline.spec.time_machine.as_ref().map(|t| t.namespaces.clone()), Some(vec!["shop.orders".to_string()]));
    assert_eq!(c.pipeline.spec.scripts.len(), 1, "[[script]] is carried");
    assert!(noted(&c, "no-such-option").is_some_and(|r| r.contains("ignored")));
    // A direct-read namespace outside the change streams is synced anyway, and said so.
    assert!(c.pipeline.spec.namespaces.contains(&"shop.users".to_string()));
    assert!(noted(&c, "direct-read-namespaces").is_some_and(|r| r.contains("shop.users")));
}

#[test]
fn index_as_update_oplog_time_and_mapping_pipelines_become_mappings() {
    let c = converted(
        r#"
change-stream-namespaces = ["shop.orders", "logs"]
index-as-update = true
index-oplog-time = true
oplog-ts-field-name = "ts"
oplog-date-field-format = "2006-01-02"
routing-namespaces = ["shop.orders"]
delete-strategy = 1

[[mapping]]
namespace = "logs.app"
index = "app-logs"
pipeline = "parse-logs"
"#,
    );
    let m = &c.pipeline.spec.mappings;
    let by_ns = |ns: &str| m.iter().find(|m| m.namespace == ns).unwrap_or_else(|| panic!("{ns}: {m:?}"));
    let orders = by_ns("shop.orders");
    assert_eq!(orders.write_mode, WriteMode::Update);
    assert_eq!(orders.oplog_time.as_ref().map(|t| (t.ts_field.as_str(), t.date_field.as_str())), Some(("ts", "oplog_date")));
    assert_eq!(by_ns("logs.*").write_mode, WriteMode::Update);
    // Partial updates run no ingest pipeline: indexed whole, as Monstache does, and said so.
    let app = by_ns("logs.app");
    assert_eq!((app.ingest_pipeline.as_deref(), app.write_mode), (Some("parse-logs"), WriteMode::Index));
    assert!(noted(&c, "index-as-update").is_some_and(|r| r.contains("logs.app")));
    assert_eq!(c.pipeline.spec.indexes.get("logs.app").map(String::as_str), Some("app-logs"));
    assert!(noted(&c, "oplog-date-field-format").is_some_and(|r| r.contains("yyyy/MM/dd")));
    assert!(noted(&c, "routing-namespaces").is_some_and(|r| r.starts_with("not needed")));
    assert!(noted(&c, "delete-strategy").is_some_and(|r| r.contains("monsoon-locations")));
}

#[test]
fn scripts_filters_and_pipelines_of_monstaches_docs_carry_over() {
    let dir = std::env::temp_dir().join(format!("monsoon-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("transform.js");
    std::fs::write(&path, "module.exports = function(doc) { return doc; }").expect("write");
    let text = format!(
        r#"
change-stream-namespaces = ["test.test", "blog.comments", "anotherdb.anothercollection"]

[[script]]
script = """
module.exports = function(doc, ns, updateDesc) {{
  return _.omit(doc, "password", "secret");
}}
"""

[[script]]
namespace = "blog.comments"
routing = true
script = """
module.exports = function(doc) {{
  doc._meta_monstache = {{ routing: doc.post_id }};
  return doc;
}}
"""

[[script]]
namespace = "anotherdb.anothercollection"
path = "{}"

[[filter]]
namespace = "test.test"
script = "module.exports = function(doc, ns, updateDesc) {{ return !!doc.interesting; }}"

[[pipeline]]
namespace = "test.test"
script = """
module.exports = function(ns, changeStream) {{
  if (changeStream) {{
return [{{ $match: {{ $or: [{{ "updateDescription": {{$exists: false}} }}, {{ "updateDescription.updatedFields.foo": {{$exists: true}} }}] }} }}];
  }} else {{
return [];
  }}
}}
"""

[[pipeline]]
namespace = "blog.comments"
script = "module.exports = function(ns, changeStream) {{ return [{{ $group: {{ _id: 1 }} }}]; }}"
"#,
        path.display()
    );
    let c = converted(&text);
    let s = &c.pipeline.spec;
    assert_eq!(s.scripts.len(), 3);
    assert!(s.scripts[0].namespace.is_none() && s.scripts[0].script.as_deref().is_some_and(|t| t.contains("_.omit")));
    assert_eq!(s.scripts[2].script_from.as_ref().and_then(|f| f.file.as_deref()), Some(path.to_str().expect("utf8")));
    assert!(noted(&c, "[[script]].path").is_some_and(|r| r.contains("configMapKeyRef")));
    assert!(noted(&c, "[[script]].routing").is_some_and(|r| r.starts_with("not needed")));
    assert_eq!(s.filters.len(), 1);
    let watch = s.mappings.iter().find(|m| m.namespace == "test.test").and_then(|m| m.aggregation.clone()).expect("declared stages");
    assert!(watch.snapshot.is_empty());
    assert_eq!(watch.change_stream.len(), 1);
    assert!(watch.change_stream[0].to_string().contains("updateDescription.updatedFields.foo"));
    // A stage monsoon cannot run is said so, not carried.
    assert!(c.notes.iter().any(|n| n.option == "[[pipeline]]" && n.reason.contains("`$group`")), "{:?}", c.notes);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn namespace_regular_expressions_carry_over() {
    let c = converted(
        r#"
namespace-regex = "^(shop|logs)\\."
namespace-exclude-regex = "\\.tmp$"
"#,
    );
    assert!(c.pipeline.spec.namespaces.is_empty());
    assert_eq!(c.pipeline.spec.namespace_regex.as_deref(), Some(r"^(shop|logs)\."));
    assert_eq!(c.pipeline.spec.exclude_namespace_regex.as_deref(), Some(r"\.tmp$"));
    assert!(!c.pipeline.spec.snapshot);
}

#[test]
fn unusable_input_is_one_clear_error() {
    assert!(matches!(convert("mongo-url = ", "x"), Err(Error::Toml(_))));
    assert!(matches!(convert("direct-read-namespaces = \"shop.orders\"", "x"), Err(Error::Type { .. })));
    let e = convert("change-stream-namespaces = [\"admin.users\"]", "x").expect_err("a system database");
    assert!(e.to_string().starts_with("`change-stream-namespaces`: `admin` is a MongoDB system database"), "{e}");
}

#[test]
fn pipeline_names_are_dns_labels() {
    assert_eq!(pipeline_name("Monstache_Prod.Config"), "monstache-prod-config");
    assert_eq!(pipeline_name("___"), "monstache");
}

fn refused(text: &str) -> String {
    let e = convert(text, "shop").expect_err("refused");
    let line = format!("{e:#}");
    assert!(!line.contains('\n'), "one line: {line}");
    line
}

#[test]
fn a_config_without_namespaces_follows_the_whole_deployment_as_monstache_does() {
    let c = converted("mongo-url = \"mongodb://db-0:27017/?replicaSet=rs0\"\n");
    let s = &c.pipeline.spec;
    assert!(s.namespaces.is_empty());
    assert_eq!(s.namespace_regex.as_deref(), Some(".*"));
    assert_eq!(s.exclude_namespaces, ["monstache.*"], "Monstache's own state is not synced");
    assert!(!s.snapshot);
    assert!(noted(&c, "change-stream-namespaces").is_some_and(|r| r.contains("every database")));

    // Direct reads without change-stream-namespaces: everything followed, the listed snapshotted.
    let c = converted("direct-read-namespaces = [\"shop.orders\", \"shop.users\"]\n");
    let s = &c.pipeline.spec;
    assert_eq!(s.namespace_regex.as_deref(), Some(".*"));
    assert!(s.snapshot);
    assert_eq!(s.snapshot_namespaces, ["shop.orders", "shop.users"]);

    // `""` in the direct reads: every collection is snapshotted.
    let c = converted("direct-read-namespaces = [\"\"]\nchange-stream-namespaces = [\"shop.orders\"]\n");
    assert_eq!(c.pipeline.spec.namespace_regex.as_deref(), Some(".*"));
    assert!(c.pipeline.spec.snapshot && c.pipeline.spec.snapshot_namespaces.is_empty());
}

#[test]
fn a_namespace_regex_alone_carries_what_it_selects() {
    let dir = std::env::temp_dir().join(format!("monsoon-convert-regex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("users.js");
    std::fs::write(&path, "module.exports = function(doc) { return !!doc.active; }").expect("write");
    let c = converted(&format!(
        r#"
namespace-regex = "^shop\\."
direct-read-namespaces = ["shop.orders", "logs.app"]

[[mapping]]
namespace = "shop.orders"
index = "Orders"
pipeline = "enrich"

[[mapping]]
namespace = "other.things"
index = "things"

[[script]]
namespace = "shop.orders"
script = "module.exports = function(doc) {{ return doc; }}"

[[filter]]
namespace = "shop.users"
path = "{}"

[[pipeline]]
namespace = "shop.orders"
script = "module.exports = function(ns, changeStream) {{ return [{{ $match: {{ total: {{ $gt: 0 }} }} }}]; }}"
"#,
        path.display()
    ));
    let s = &c.pipeline.spec;
    assert_eq!(s.namespace_regex.as_deref(), Some(r"^shop\."));
    assert!(s.namespaces.is_empty());
    let orders = s.mappings.iter().find(|m| m.namespace == "shop.orders").expect("the mapping is carried");
    assert_eq!(orders.index.as_deref(), Some("orders"), "lower-cased");
    assert_eq!(orders.ingest_pipeline.as_deref(), Some("enrich"));
    assert!(orders.aggregation.is_some(), "[[pipeline]] declared");
    assert!(noted(&c, "[[mapping]].index").is_some_and(|r| r.contains("lower-cased")));
    assert_eq!(s.scripts.len(), 1);
    assert_eq!(s.filters.len(), 1);
    // Only what the expression leaves out is said to be left out.
    let left_out: Vec<&Note> = c.notes.iter().filter(|n| n.reason.contains("not synced") || n.reason.contains("left out")).collect();
    assert!(left_out.iter().all(|n| n.reason.contains("other.things") || n.reason.contains("logs.app")), "{left_out:?}");
    assert_eq!(left_out.len(), 2, "{left_out:?}");
    assert_eq!(s.snapshot_namespaces, ["shop.orders"], "Monstache filters direct reads by the expression too");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn placeholders_become_environment_references_or_a_clear_refusal() {
    let c = converted("mongo-url = \"<mongodb-url>\"\n");
    assert_eq!(c.pipeline.spec.mongodb.uri_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_MONGODB_URI));
    assert!(noted(&c, "mongo-url").is_some_and(|r| r.contains("<mongodb-url>") && r.contains(ENV_MONGODB_URI)));
    let c = converted("mongo-url = \"${MONGO_URL}\"\n");
    assert_eq!(c.pipeline.spec.mongodb.uri_from.as_ref().and_then(|v| v.env.as_deref()), Some("MONGO_URL"));
    let c = converted("mongo-url = \"mongodb://admin:$MONGOPASSWORD@db-0:27017/?replicaSet=rs0\"\n");
    assert_eq!(c.pipeline.spec.mongodb.uri_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_MONGODB_URI));
    assert!(noted(&c, "mongo-url").is_some_and(|r| r.contains("$MONGOPASSWORD")));

    let line = refused("elasticsearch-urls = [\"*elastic-host*\"]\n");
    assert!(line.starts_with("`elasticsearch-urls`: `*elastic-host*` is a placeholder"), "{line}");
    let line = refused("elasticsearch-urls = [\"http://${ES_HOST}:9200\"]\n");
    assert!(line.contains("`elasticsearch-urls`") && line.contains("${ES_HOST}"), "{line}");
    let line = refused("elasticsearch-user = \"$ES_USER\"\nelasticsearch-password = \"x\"\n");
    assert!(line.starts_with("`elasticsearch-user`"), "{line}");
}

#[test]
fn credentials_in_elasticsearch_urls_move_to_username_and_an_env_password() {
    let c = converted("elasticsearch-urls = [\"https://elastic:changeme@es-0:9200\", \"https://elastic:changeme@es-1:9200\"]\n");
    let es = &c.pipeline.spec.elasticsearch;
    assert_eq!(es.urls, ["https://es-0:9200", "https://es-1:9200"]);
    assert_eq!(es.username.as_deref(), Some("elastic"));
    assert_eq!(es.password_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_ES_PASSWORD));
    let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
    assert!(!yaml.contains("changeme"), "{yaml}");
    assert!(c.notes.iter().any(|n| n.option == "elasticsearch-urls" && n.reason.contains(ENV_ES_PASSWORD)), "{:?}", c.notes);

    let c = converted("elasticsearch-urls = [\"https://elastic:${ES_PASSWORD}@es:9200\"]\n");
    assert_eq!(c.pipeline.spec.elasticsearch.password_from.as_ref().and_then(|v| v.env.as_deref()), Some("ES_PASSWORD"));
    let line = refused("elasticsearch-urls = [\"https://a:x@es-0:9200\", \"https://b:y@es-1:9200\"]\n");
    assert!(line.starts_with("`elasticsearch-urls`") && line.contains("one user"), "{line}");
    assert!(!line.contains(":x@") && !line.contains(":y@"), "no password in the message: {line}");
}

#[test]
fn namespaces_without_a_database_and_missing_script_files_are_refused_by_name() {
    let line = refused("change-stream-namespaces = [\"shop.orders\"]\n[[mapping]]\nnamespace = \"orders\"\nindex = \"orders\"\n");
    assert!(line.starts_with("`[[mapping]].namespace`: `orders` has no database"), "{line}");
    let line = refused("change-stream-namespaces = [\"shop.orders\"]\n[[script]]\nnamespace = \"shop.*\"\nscript = \"module.exports = function(d) { return d; }\"\n");
    assert!(line.starts_with("`[[script]].namespace`"), "{line}");
    let line = refused("change-stream-namespaces = [\"shop.orders\"]\n[[script]]\nnamespace = \"shop.orders\"\npath = \"/nonexistent/transform.js\"\n");
    assert!(line.starts_with("`[[script]].path`: failed to read script file `/nonexistent/transform.js`"), "{line}");
}

#[test]
fn start_points_and_one_shot_runs_carry_over() {
    let c = converted("direct-read-namespaces = [\"shop.orders\"]\nresume-from-timestamp = 1700000000\n");
    assert_eq!(c.pipeline.spec.stream_start.as_ref().and_then(|s| s.timestamp), Some(1_700_000_000));
    // Monstache also reads a whole oplog timestamp (seconds << 32 | increment).
    let c = converted(&format!("direct-read-namespaces = [\"shop.orders\"]\nresume-from-timestamp = {}\n", (1_700_000_000_i64 << 32) | 7));
    assert_eq!(c.pipeline.spec.stream_start.as_ref().and_then(|s| s.timestamp), Some(1_700_000_000));
    let c = converted("change-stream-namespaces = [\"shop.orders\"]\nreplay = true\nresume-from-timestamp = 5\n");
    assert_eq!(c.pipeline.spec.stream_start.as_ref().map(|s| s.oldest), Some(true));
    assert!(noted(&c, "resume-from-timestamp").is_some_and(|r| r.contains("replay")));

    let c = converted("direct-read-namespaces = [\"shop.orders\", \"shop.users\"]\nexit-after-direct-reads = true\n");
    assert!(c.once);
    let s = &c.pipeline.spec;
    assert_eq!((s.namespaces.as_slice(), s.namespace_regex.as_deref()), (&["shop.orders".to_string(), "shop.users".to_string()][..], None), "only what is read once");
    assert!(s.snapshot && s.snapshot_namespaces.is_empty());
    assert!(noted(&c, "exit-after-direct-reads").is_some_and(|r| r.contains("--once")));
    let c = converted("direct-read-namespaces = [\"shop.orders\"]\nchange-stream-namespaces = [\"shop\"]\nexit-after-direct-reads = true\n");
    assert_eq!(c.pipeline.spec.namespaces, ["shop.orders"]);
    assert!(noted(&c, "change-stream-namespaces").is_some_and(|r| r.starts_with("not carried")));
}

#[test]
fn a_database_and_an_expression_together_are_refused_with_the_fix() {
    let line = refused("change-stream-namespaces = [\"shop\"]\nnamespace-regex = \"^shop\\\\.(orders|users)$\"\n");
    assert!(line.starts_with("`change-stream-namespaces`: lists the database `shop`") && line.contains("shop.orders"), "{line}");
    // Listed collections are filtered by the expression now, as Monstache filters them.
    let c = converted("change-stream-namespaces = [\"shop.orders\", \"shop.audit\"]\nnamespace-regex = \"^shop\\\\.orders$\"\n");
    assert_eq!(c.pipeline.spec.namespaces, ["shop.orders"]);
    assert!(c.pipeline.spec.namespace_regex.is_none());
}

/// The invariant: every configuration converts into a pipeline that `monsoon validate` accepts,
/// or is refused with one line naming the option. Configurations as users publish them.
#[test]
fn every_realistic_config_converts_into_a_valid_pipeline_or_one_clear_refusal() {
    let corpus: &[(&str, &str, Option<&str>)] = &[
        ("empty", "", None),
        ("docker-compose", "mongo-url = \"mongodb://mongo:27017\"\nelasticsearch-urls = [\"http://elasticsearch:9200\"]\ndirect-read-namespaces = [\"mydb.mycollection\"]\nchange-stream-namespaces = [\"mydb.mycollection\"]\ngzip = true\nstats = true\nindex-stats = true\nelasticsearch-max-conns = 4\nelasticsearch-retry = true\nverbose = true\nresume = true\nresume-name = \"default\"\n", None),
        ("tutorial with placeholders", "mongo-url = \"<mongodb-url>\"\nelasticsearch-urls = [\"<elasticsearch-url>\"]\n", Some("elasticsearch-urls")),
        ("env passwords", "mongo-url = \"mongodb://admin:$MONGOPASSWORD@mongo1:27017,mongo2:27017/?replicaSet=rs0\"\nelasticsearch-urls = [\"https://es:9200\"]\nelasticsearch-user = \"elastic\"\nelasticsearch-password = \"${ELASTIC_PASSWORD}\"\nnamespace-regex = \"^app\\\\.(users|posts)$\"\n", None),
        ("glob host", "elasticsearch-urls = [\"http://*elastic-host*:9200\"]\n", Some("elasticsearch-urls")),
        ("url credentials", "elasticsearch-urls = [\"https://elastic:s3cr3t@search.example.com:443\"]\nchange-stream-namespaces = [\"shop\"]\n[[mapping]]\nnamespace = \"shop.Orders\"\nindex = \"Shop_Orders\"\n", None),
        ("no scheme", "elasticsearch-urls = [\"elasticsearch:9200\"]\n", None),
        ("mapping without a database", "direct-read-namespaces = [\"test.users\"]\n[[mapping]]\nnamespace = \"users\"\nindex = \"users\"\n", Some("[[mapping]].namespace")),
        ("two namespaces one index", "change-stream-namespaces = [\"a.x\", \"b.x\"]\n[[mapping]]\nnamespace = \"a.x\"\nindex = \"x\"\n[[mapping]]\nnamespace = \"b.x\"\nindex = \"x\"\n", None),
        ("bad index", "change-stream-namespaces = [\"a.x\"]\n[[mapping]]\nnamespace = \"a.x\"\nindex = \"_x\"\n", Some("[[mapping]].index")),
        ("system database", "direct-read-namespaces = [\"admin.system.users\"]\n", Some("direct-read-namespaces")),
        ("bad regex", "namespace-regex = \"(?<=shop)\\\\.x\"\n", Some("namespace-regex")),
        ("regex selects nothing listed", "change-stream-namespaces = [\"shop.orders\"]\nnamespace-regex = \"^logs\\\\.\"\n", Some("namespace-regex")),
        ("no change events, no reads", "disable-change-events = true\n", Some("direct-read-namespaces")),
        ("one-shot reindex", "direct-read-namespaces = [\"shop.orders\"]\nexit-after-direct-reads = true\nelasticsearch-max-seconds = 5\nelasticsearch-max-bytes = 8000000\n", None),
        ("view replication", "direct-read-namespaces = [\"thingdb.thingview\"]\nchange-stream-namespaces = [\"thingdb.thing\", \"thingdb.state\"]\n[[mapping]]\nnamespace = \"thingdb.thing\"\nindex = \"things\"\n[[mapping]]\nnamespace = \"thingdb.thingview\"\nindex = \"things\"\n[[relate]]\nnamespace = \"thingdb.thing\"\nwith-namespace = \"thingdb.thingview\"\n", None),
        ("time machine and patches", "change-stream-namespaces = [\"test.test\"]\ntime-machine-namespaces = [\"test.test\"]\nenable-patches = true\npatch-namespaces = [\"test.test\"]\n", None),
        ("documentdb", "mongo-url = \"mongodb://user:pass@docdb.cluster.example:27017/?tls=true&replicaSet=rs0&readPreference=primary\"\nchange-stream-namespaces = [\"db1.col1\", \"db2.col2\"]\nresume-strategy = 1\n", None),
        ("start points", "resume-from-timestamp = 1717243200\nchange-stream-namespaces = [\"shop\"]\nindex-as-update = true\nindex-oplog-time = true\n", None),
        ("follow all, update everything", "index-as-update = true\n[[mapping]]\nnamespace = \"shop.orders\"\nindex = \"orders\"\n", None),
        ("not a connection string", "mongo-url = \"localhost:27017\"\n", Some("mongo-url")),
        ("aws documented example", "elasticsearch-urls = [\"https://<endpoint_from_aws_overview_screen>:443\"]\n[aws-connect]\naccess-key = \"XXX\"\nsecret-key = \"YYY\"\nregion = \"ZZZ\"\n", Some("elasticsearch-urls")),
        ("aws static keys", "mongo-url = \"mongodb://mongo:27017\"\nelasticsearch-urls = [\"https://search-app-x1.us-east-1.es.amazonaws.com:443\"]\nchange-stream-namespaces = [\"app.users\"]\n[aws-connect]\naccess-key = \"AKIAIOSFODNN7EXAMPLE\"\nsecret-key = \"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\"\nregion = \"us-east-1\"\n", None),
        ("aws instance role", "elasticsearch-urls = [\"https://vpc-app-x1.eu-central-1.es.amazonaws.com\"]\nchange-stream-namespaces = [\"app.users\"]\n[aws-connect]\nstrategy = 3\nregion = \"eu-central-1\"\nforce-expire = \"5m\"\n", None),
        ("aws upper-case region", "elasticsearch-urls = [\"https://search-app.es.amazonaws.com\"]\n[aws-connect]\nstrategy = 4\nregion = \"US-EAST-1\"\n", Some("[aws-connect]")),
    ];
    for (name, text, refusal) in corpus {
        match (convert(text, "corpus"), refusal) {
            (Ok(c), None) => {
                let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
                monsoon_api::parse_manifest(&yaml, monsoon_engine::check_connection_string).unwrap_or_else(|e| panic!("{name}: `monsoon validate` refuses the conversion: {e}\n{yaml}"));
            }
            (Err(e), Some(option)) => {
                let line = format!("{e:#}");
                assert!(!line.contains('\n') && line.starts_with(&format!("`{option}`")), "{name}: {line}");
            }
            (Ok(c), Some(option)) => panic!("{name}: expected a refusal naming `{option}`, got {:#?}", c.pipeline.spec),
            (Err(e), None) => panic!("{name}: refused: {e:#}"),
        }
    }
}

#[test]
fn aws_connect_static_keys_become_env_references_never_copies() {
    let c = converted(
        r#"
mongo-url = "mongodb://db-0:27017/"
elasticsearch-urls = ["https://search-shop-abc123.us-east-1.es.amazonaws.com:443"]
elasticsearch-user = "admin"
elasticsearch-password = "hunter2"
change-stream-namespaces = ["shop.orders"]

[aws-connect]
access-key = "AKIAIOSFODNN7EXAMPLE"
secret-key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
region = "us-east-1"
"#,
    );
    let es = &c.pipeline.spec.elasticsearch;
    let aws = es.aws.as_ref().expect("aws");
    assert_eq!((aws.region.as_str(), aws.service), ("us-east-1", monsoon_api::AwsService::Es));
    assert_eq!(aws.access_key_id_from.as_ref().and_then(|v| v.env.as_deref()), Some(connection::ENV_AWS_ACCESS_KEY_ID));
    assert_eq!(aws.secret_access_key_from.as_ref().and_then(|v| v.env.as_deref()), Some(connection::ENV_AWS_SECRET_ACCESS_KEY));
    assert!(es.username.is_none() && es.password_from.is_none(), "signing replaces basic authentication");
    assert!(noted(&c, "[aws-connect].secret-key").is_some_and(|r| r.contains("never copied") && r.contains(connection::ENV_AWS_SECRET_ACCESS_KEY)));
    assert!(noted(&c, "elasticsearch-user").is_some_and(|r| r.contains("AWS credentials")));
    assert!(noted(&c, "elasticsearch-password").is_none(), "no note asks for a password that is no longer used");
    let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
    for secret in ["AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "hunter2"] {
        assert!(!yaml.contains(secret), "{secret} copied into:\n{yaml}");
    }

    // Keys that are environment references keep their variables.
    let c = converted("elasticsearch-urls = [\"https://es.example:443\"]\nchange-stream-namespaces = [\"shop.orders\"]\n[aws-connect]\naccess-key = \"${AWS_KEY}\"\nsecret-key = \"$AWS_SECRET\"\nregion = \"eu-west-1\"\n");
    let aws = c.pipeline.spec.elasticsearch.aws.expect("aws");
    assert_eq!(aws.access_key_id_from.and_then(|v| v.env).as_deref(), Some("AWS_KEY"));
    assert_eq!(aws.secret_access_key_from.and_then(|v| v.env).as_deref(), Some("AWS_SECRET"));
}

#[test]
fn aws_connect_strategies_use_the_default_chain_with_notes() {
    let c = converted(
        r#"
elasticsearch-urls = ["https://abc123.eu-west-1.aoss.amazonaws.com"]
change-stream-namespaces = ["shop.orders"]

[aws-connect]
strategy = 1
profile = "sync"
credentials-file = "/etc/monstache/aws-credentials"
watch-credentials = true
force-expire = "5m"
region = "eu-west-1"
"#,
    );
    let aws = c.pipeline.spec.elasticsearch.aws.as_ref().expect("aws");
    assert!(aws.access_key_id_from.is_none() && aws.secret_access_key_from.is_none(), "the default chain");
    assert_eq!(aws.service, monsoon_api::AwsService::Aoss, "a Serverless collection URL");
    assert!(noted(&c, "[aws-connect].strategy").is_some_and(|r| r.contains("shared credentials file") && r.contains("default AWS credentials chain")));
    assert!(noted(&c, "[aws-connect].profile").is_some_and(|r| r.contains("AWS_PROFILE=sync")));
    assert!(noted(&c, "[aws-connect].credentials-file").is_some_and(|r| r.contains("AWS_SHARED_CREDENTIALS_FILE=/etc/monstache/aws-credentials")));
    assert!(noted(&c, "[aws-connect].watch-credentials").is_some_and(|r| r.contains("not needed")));
    assert!(noted(&c, "[aws-connect].force-expire").is_some_and(|r| r.contains("refreshed")));
    assert!(noted(&c, "aws-connect").is_none(), "no longer 'not supported yet'");

    for strategy in 2..=4 {
        let c = converted(&format!("elasticsearch-urls = [\"https://es.example:443\"]\nchange-stream-namespaces = [\"shop.orders\"]\n[aws-connect]\nstrategy = {strategy}\nregion = \"us-west-2\"\n"));
        assert!(c.pipeline.spec.elasticsearch.aws.is_some(), "strategy {strategy}");
    }
    // Strategy 0 without keys: Monstache did not sign either.
    let c = converted("change-stream-namespaces = [\"shop.orders\"]\n[aws-connect]\nregion = \"us-east-1\"\n");
    assert!(c.pipeline.spec.elasticsearch.aws.is_none());
    assert!(noted(&c, "[aws-connect]").is_some_and(|r| r.contains("ignored")));
}

#[test]
fn aws_connect_that_cannot_sign_is_refused_naming_the_option() {
    let base = "elasticsearch-urls = [\"https://es.example:443\"]\nchange-stream-namespaces = [\"shop.orders\"]\n[aws-connect]\n";
    let e = refused(&format!("{base}access-key = \"AKID\"\nregion = \"us-east-1\"\n"));
    assert!(e.starts_with("`[aws-connect]`") && e.contains("both `access-key` and `secret-key`"), "{e}");
    assert!(!e.contains("AKID"), "{e}");
    let e = refused(&format!("{base}strategy = 2\n"));
    assert!(e.contains("[aws-connect].region") && e.contains("us-east-1"), "{e}");
    let e = refused(&format!("{base}strategy = 7\nregion = \"us-east-1\"\n"));
    assert!(e.contains("[aws-connect].strategy"), "{e}");
    let e = refused(&format!("{base}strategy = 2\nregion = \"US East\"\n"));
    assert!(e.contains("[aws-connect]") && e.contains("spec.elasticsearch.aws.region"), "{e}");
    let e = refused("elasticsearch-urls = [\"https://a:443\", \"https://b:443\"]\nchange-stream-namespaces = [\"shop.orders\"]\n[aws-connect]\nstrategy = 2\nregion = \"us-east-1\"\n");
    assert!(e.contains("elasticsearch-urls") && e.contains("exactly one URL"), "{e}");
}

#[test]
fn time_machines_carry_over_with_their_index_names() {
    let c = converted(
        r#"
change-stream-namespaces = ["shop.orders", "shop.users"]
direct-read-namespaces = ["shop.orders"]
time-machine-namespaces = ["shop.orders", "other.things"]
time-machine-index-prefix = "History"
time-machine-index-suffix = "2006.01"
time-machine-direct-reads = true
"#,
    );
    let tm = c.pipeline.spec.time_machine.clone().expect("time machine");
    assert_eq!(tm.namespaces, ["shop.orders"]);
    assert_eq!((tm.index_prefix.as_str(), tm.index_suffix.as_str(), tm.snapshot), ("history", "%Y.%m", true));
    assert!(noted(&c, "time-machine-namespaces").is_some_and(|r| r.contains("other.things")), "{:?}", c.notes);
    assert!(noted(&c, "time-machine-index-suffix").is_some_and(|r| r.contains("%Y.%m")));
    // Monstache's defaults are monsoon's; without direct reads there is nothing to log from a snapshot.
    let c = converted("change-stream-namespaces = [\"shop.orders\"]\ntime-machine-namespaces = [\"shop.orders\"]\ntime-machine-direct-reads = true\n");
    let tm = c.pipeline.spec.time_machine.clone().expect("time machine");
    assert_eq!((tm.index_prefix.as_str(), tm.index_suffix.as_str(), tm.snapshot), ("log", "%Y-%m-%d", false));
    assert!(noted(&c, "time-machine-direct-reads").is_some_and(|r| r.starts_with("ignored")));
    // A layout monsoon cannot write, and a namespace without a database: one line each.
    for (text, option) in [
        ("change-stream-namespaces = [\"shop.orders\"]\ntime-machine-namespaces = [\"shop.orders\"]\ntime-machine-index-suffix = \"2006-01-02 15:04\"\n", "time-machine-index-suffix"),
        ("change-stream-namespaces = [\"shop.orders\"]\ntime-machine-namespaces = [\"orders\"]\n", "time-machine-namespaces"),
        ("change-stream-namespaces = [\"shop.orders\"]\ntime-machine-namespaces = [\"shop.orders\"]\ntime-machine-index-prefix = \"_log\"\n", "time-machine-index-prefix"),
    ] {
        let e = convert(text, "tm").expect_err(text).to_string();
        assert!(e.starts_with(&format!("`{option}`")) && !e.contains('\n'), "{e}");
    }
}

#[test]
fn direct_read_split_max_becomes_a_snapshot_split() {
    let c = converted("direct-read-namespaces = [\"shop.orders\"]\ndirect-read-split-max = 9\n");
    let split = c.pipeline.spec.snapshot_split.as_ref().expect("split");
    assert_eq!((split.ranges, split.min_documents), (9, 100_000));
    assert!(noted(&c, "direct-read-split-max").is_some_and(|n| n.contains("ranges: 9")));
    let c = converted("direct-read-namespaces = [\"shop.orders\"]\ndirect-read-split-max = 1\n");
    assert!(c.pipeline.spec.snapshot_split.is_none());
}

#[test]
fn gridfs_options_become_files() {
    let c = converted("change-stream-namespaces = [\"users.fs.files\"]\nindex-files = true\nfile-namespaces = [\"users.fs.files\"]\nfile-highlighting = true\nmax-file-size = 5000000\n");
    let files = c.pipeline.spec.files.as_ref().expect("files");
    assert_eq!((files.namespaces.clone(), files.max_file_size, files.pipeline.as_str(), files.create_pipeline), (vec!["users.fs.files".to_string()], 5_000_000, "attachment", true));
    assert!(noted(&c, "file-highlighting").is_some_and(|n| n.contains("highlight")));
    let c = converted("change-stream-namespaces = [\"users.fs.files\"]\nfile-namespaces = [\"users.fs.files\"]\n");
    assert!(c.pipeline.spec.files.is_none() && noted(&c, "file-namespaces").is_some());
}

#[test]
fn a_script_on_a_files_collection_is_carried_with_a_note() {
    let c = converted(
        r#"
change-stream-namespaces = ["users.fs.files", "users.people"]
index-files = true
file-namespaces = ["users.fs.files"]

[[script]]
namespace = "users.fs.files"
script = """
module.exports = function(doc) {
  if (doc.metadata.private) return false;
  doc.owner = doc.metadata.owner;
  return doc;
}
"""

[[filter]]
namespace = "users.fs.files"
script = "module.exports = function(doc) { return !doc.metadata.draft; }"

[[script]]
namespace = "users.people"
script = "module.exports = function(doc) { return doc; }"
"#,
    );
    let spec = &c.pipeline.spec;
    assert_eq!(spec.files.as_ref().map(|f| f.namespaces.clone()), Some(vec!["users.fs.files".to_string()]));
    assert_eq!(spec.scripts.iter().map(|s| s.namespace.as_deref()).collect::<Vec<_>>(), [Some("users.fs.files"), Some("users.people")]);
    assert!(spec.scripts[0].script.as_deref().is_some_and(|s| s.contains("doc.metadata.owner")));
    assert_eq!(spec.filters.iter().map(|s| s.namespace.as_deref()).collect::<Vec<_>>(), [Some("users.fs.files")]);
    let note = noted(&c, "[[script]]").expect("a note on the files collection's script");
    assert!(note.contains("users.fs.files") && note.contains("without its content"), "{note}");
    assert_eq!(c.notes.iter().filter(|n| n.option == "[[script]]").count(), 1, "one note, for the files collection only: {:?}", c.notes);
    // A script for every namespace runs on the files collection too.
    let c = converted("change-stream-namespaces = [\"users.fs.files\"]\nindex-files = true\nfile-namespaces = [\"users.fs.files\"]\n[[script]]\nscript = \"module.exports = function(doc) { return true; }\"\n");
    assert!(noted(&c, "[[script]]").is_some_and(|n| n.contains("users.fs.files")), "{:?}", c.notes);
}

#[test]
fn merge_patches_carry_over() {
    let c = converted(
        r#"
change-stream-namespaces = ["test.test", "test.other"]
enable-patches = true
patch-namespaces = ["test.test", "elsewhere.things"]
merge-patch-attribute = "custom-merge-attr"
"#,
    );
    let mp = c.pipeline.spec.merge_patches.clone().expect("merge patches");
    assert_eq!((mp.namespaces, mp.attribute.as_str()), (vec!["test.test".to_string()], "custom-merge-attr"));
    assert!(noted(&c, "patch-namespaces").is_some_and(|r| r.contains("elsewhere.things")), "{:?}", c.notes);
    // Monstache's default attribute; nothing without `enable-patches`.
    let c = converted("change-stream-namespaces = [\"test.test\"]\nenable-patches = true\npatch-namespaces = [\"test.test\"]\n");
    assert_eq!(c.pipeline.spec.merge_patches.as_ref().map(|m| m.attribute.as_str()), Some("json-merge-patches"));
    let c = converted("change-stream-namespaces = [\"test.test\"]\npatch-namespaces = [\"test.test\"]\n");
    assert!(c.pipeline.spec.merge_patches.is_none() && noted(&c, "patch-namespaces").is_some_and(|r| r.starts_with("ignored")));
    // What monsoon cannot carry is refused in one line naming the option.
    for (text, option) in [
        ("change-stream-namespaces = [\"test.test\"]\nenable-patches = true\npatch-namespaces = [\"test\"]\n", "patch-namespaces"),
        ("change-stream-namespaces = [\"test.test\"]\nenable-patches = true\npatch-namespaces = [\"test.test\"]\nmerge-patch-attribute = \"_patches\"\n", "merge-patch-attribute"),
        (
            "change-stream-namespaces = [\"test.test\"]\nenable-patches = true\npatch-namespaces = [\"test.test\"]\n[[script]]\nnamespace = \"test.test\"\nscript = \"module.exports = function(doc) { return doc; }\"\n",
            "patch-namespaces",
        ),
    ] {
        let e = convert(text, "mp").expect_err(text).to_string();
        assert!(e.starts_with(&format!("`{option}`")) && !e.contains('\n'), "{e}");
    }
}

/// Monstache's view replication example (its documentation's "thing / state / thingview"),
/// unchanged: both relations carry over, the view is snapshotted (and only it), and the index
/// the collection and its view share is listed in `sharedIndexes`.
const THINGS: &str = include_str!("../../../../examples/monstache-view-replication.toml");

#[test]
fn relations_and_view_replication_carry_over() {
    let c = converted(THINGS);
    let spec = &c.pipeline.spec;
    assert_eq!(spec.relate.len(), 2);
    let (thing, state) = (&spec.relate[0], &spec.relate[1]);
    assert_eq!((thing.namespace.as_str(), thing.with_namespace.as_str(), thing.src_field.as_str(), thing.match_field.as_str(), thing.keep_src), ("thingdb.thing", "thingdb.thingview", "_id", "_id", false));
    assert_eq!((state.namespace.as_str(), state.with_namespace.as_str(), state.src_field.as_str(), state.match_field.as_str()), ("thingdb.state", "thingdb.thing", "_id", "s"));
    assert_eq!(spec.snapshot_namespaces, ["thingdb.thingview"]);
    assert!(spec.namespaces.contains(&"thingdb.thingview".to_string()), "{:?}", spec.namespaces);
    assert_eq!(spec.shared_indexes, ["things"]);
    assert!(noted(&c, "[[mapping]].index").is_some_and(|n| n.contains("things") && n.contains("sharedIndexes")));
    assert!(noted(&c, "relate").is_none(), "relate is converted, not left out");

    let c = converted("change-stream-namespaces = [\"a.orders\", \"a.customers\"]\nrelate-buffer = 10\n[[relate]]\nnamespace = \"a.orders\"\nwith-namespace = \"a.customers\"\nsrc-field = \"customer.id\"\nmatch-field = \"_id\"\nmatch-field-type = \"objectId\"\nkeep-src = true\nmax-depth = 2\ndot-notation = true\n");
    let r = &c.pipeline.spec.relate[0];
    assert_eq!((r.src_field.as_str(), r.match_field_type, r.keep_src, r.max_depth, r.dot_notation), ("customer.id", Some(monsoon_api::MatchFieldType::ObjectId), true, 2, true));
    assert!(noted(&c, "relate-buffer").is_some_and(|n| n.contains("none is skipped")));
    // A relation from a namespace the configuration does not follow is noted, not kept.
    let c = converted("change-stream-namespaces = [\"a.orders\"]\n[[relate]]\nnamespace = \"b.x\"\nwith-namespace = \"a.orders\"\n");
    assert!(c.pipeline.spec.relate.is_empty());
    assert!(noted(&c, "[[relate]]").is_some_and(|n| n.contains("b.x")));
    for (text, option) in [
        ("[[relate]]\nnamespace = \"a.x\"\n", "[[relate]]"),
        ("[[relate]]\nnamespace = \"a.x\"\nwith-namespace = \"y\"\n", "[[relate]].with-namespace"),
        ("[[relate]]\nnamespace = \"a.x\"\nwith-namespace = \"a.y\"\nmatch-field-type = \"uuid\"\n", "[[relate]].match-field-type"),
    ] {
        assert!(refused(text).starts_with(&format!("`{option}`")), "{text}: {}", refused(text));
    }
}
