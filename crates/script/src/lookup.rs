//! Lookups from scripts into MongoDB: `findId`, `findOne`, `find`, `pipe`, as Monstache offers
//! them. This crate parses the script's arguments into a [`LookupRequest`] (pure, tested here)
//! and hands it to a [`Lookup`] that the engine implements with the MongoDB driver. The call is
//! synchronous on the script's worker thread: a slow lookup holds that worker only, the other
//! workers go on with other documents.

use std::time::Instant;

use serde_json::{Map, Value};

/// Which lookup function the script called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupKind {
    /// `findId(id)`: the query is `{"_id": id}`; at most one document.
    FindId,
    /// `findOne(query)`: at most one document.
    FindOne,
    /// `find(query)`: every matching document, with `sort` and `limit`.
    Find,
    /// `pipe(stages)`: an aggregation; `query` is the array of stages.
    Pipe,
}

impl LookupKind {
    fn from_name(name: &str) -> Option<LookupKind> {
        Some(match name {
            "findId" => LookupKind::FindId,
            "findOne" => LookupKind::FindOne,
            "find" => LookupKind::Find,
            "pipe" => LookupKind::Pipe,
            _ => return None,
        })
    }

    /// True for the kinds that return one document or `null`.
    pub fn is_single(self) -> bool {
        matches!(self, LookupKind::FindId | LookupKind::FindOne)
    }
}

/// One lookup a script asked for, with Monstache's defaults applied.
///
/// Values are relaxed JSON as scripts see documents (see the crate docs). In particular an
/// ObjectId reaches the script as a 24-hex-digit string, so a script passes such strings back
/// (`findId(post.author)`); Monstache turns every string in the query that parses as an ObjectId
/// back into an ObjectId before querying, and an implementation should do the same.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupRequest {
    pub kind: LookupKind,
    /// Defaults to the database of the document being processed.
    pub database: String,
    /// Defaults to the collection of the document being processed.
    pub collection: String,
    /// The filter (`{"_id": id}` for `findId`), or the array of stages for `pipe`.
    pub query: Value,
    /// Projection from the `select` option (`{"age": 1, "_id": 0}`), empty when not given.
    pub select: Map<String, Value>,
    /// Sort keys in order, `1` ascending, `-1` descending (`find` only). Accepted both as an
    /// object (`{name: 1}`, what Monstache's code reads) and as an array (`["name", "-age"]`,
    /// what its docs show; a leading `-` means descending).
    pub sort: Vec<(String, i32)>,
    /// At most this many documents (`find` only); `None` for no limit.
    pub limit: Option<u64>,
    /// The script's own deadline: a lookup still running then is wasted work (the call will be
    /// interrupted as soon as the lookup returns), so implementations should bound their query
    /// by it (e.g. `maxTimeMS`).
    pub deadline: Instant,
}

/// Runs lookups for scripts. Implemented by the engine over the MongoDB driver; tests use an
/// in-memory implementation.
pub trait Lookup: Send + Sync {
    /// Runs one lookup and returns the documents found, converted to JSON as the engine converts
    /// the documents it indexes. For [`LookupKind::is_single`] kinds return at most one.
    ///
    /// # Errors
    /// Any failure to run the query. The script sees a thrown `Error` it may catch; if it does
    /// not, the document fails with a retriable [`crate::ScriptError::Lookup`].
    fn lookup(&self, request: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>>;
}

/// A lookup failure that retrying cannot change (a malformed query, a server's refusal of it, a
/// result too large to hand to a script). A [`Lookup`] returns it to say so: the script sees a
/// thrown `Error` as for any failure, but one it does not catch fails the document at once
/// ([`crate::ScriptError::Threw`], dead-lettered) instead of being retried as an outage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// The lookup used when the engine gives none: every call fails with a clear message.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLookup;

impl Lookup for NoLookup {
    fn lookup(&self, _request: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
        Err("lookups are not available in this context".into())
    }
}

/// Builds the request for `kind(query, options)` called while processing namespace `ns`.
/// `query_json` and `options_json` are the JSON texts of the script's arguments.
pub(crate) fn parse_request(
    kind_name: &str,
    ns: &str,
    query_json: &str,
    options_json: Option<&str>,
    deadline: Instant,
) -> Result<LookupRequest, String> {
    let kind = LookupKind::from_name(kind_name).ok_or_else(|| format!("unknown lookup {kind_name}"))?;
    let arg: Value = serde_json::from_str(query_json).map_err(|e| format!("{kind_name}: the query is not JSON: {e}"))?;
    let query = match kind {
        LookupKind::FindId => {
            let mut m = Map::new();
            m.insert("_id".to_owned(), arg);
            Value::Object(m)
        }
        LookupKind::FindOne | LookupKind::Find => match arg {
            Value::Object(_) => arg,
            _ => return Err(format!("{kind_name}: the query must be an object")),
        },
        LookupKind::Pipe => match arg {
            Value::Array(_) => arg,
            _ => return Err(format!("{kind_name}: the stages must be an array")),
        },
    };
    let (database, collection) = match ns.split_once('.') {
        Some((db, coll)) => (db.to_owned(), coll.to_owned()),
        None => (ns.to_owned(), String::new()),
    };
    let mut req = LookupRequest {
        kind,
        database,
        collection,
        query,
        select: Map::new(),
        sort: Vec::new(),
        limit: None,
        deadline,
    };
    if let Some(text) = options_json {
        let options: Value = serde_json::from_str(text).map_err(|e| format!("{kind_name}: the options are not JSON: {e}"))?;
        let Value::Object(options) = options else {
            return Err(format!("{kind_name}: the options must be an object"));
        };
        for (key, value) in &options {
            match (key.as_str(), value) {
                (_, Value::Null) => {}
                ("database", Value::String(s)) => req.database = s.clone(),
                ("collection", Value::String(s)) => req.collection = s.clone(),
                ("select", Value::Object(m)) => req.select = m.clone(),
                ("sort", v) => req.sort = parse_sort(kind_name, v)?,
                ("limit", Value::Number(n)) => {
                    let n = n.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0);
                    req.limit = n.map(|f| f as u64).filter(|n| *n > 0);
                    if n.is_none() {
                        return Err(format!("{kind_name}: `limit` must be a non-negative integer"));
                    }
                }
                ("database" | "collection", _) => return Err(format!("{kind_name}: `{key}` must be a string")),
                ("select", _) => return Err(format!("{kind_name}: `select` must be an object such as {{age: 1}}")),
                ("limit", _) => return Err(format!("{kind_name}: `limit` must be a number")),
                (other, _) => {
                    return Err(format!(
                        "{kind_name}: unknown option `{other}` (known: database, collection, select, sort, limit)"
                    ))
                }
            }
        }
    }
    if req.database.is_empty() || req.collection.is_empty() {
        return Err(format!("{kind_name}: no database and collection to search (set `database` and `collection`)"));
    }
    if !matches!(kind, LookupKind::Find) {
        // As in Monstache: sort and limit apply to `find` only.
        req.sort.clear();
        req.limit = None;
    }
    Ok(req)
}

fn parse_sort(kind_name: &str, v: &Value) -> Result<Vec<(String, i32)>, String> {
    let direction = |key: &str, d: &Value| -> Result<i32, String> {
        match d.as_f64() {
            Some(f) if f > 0.0 => Ok(1),
            Some(f) if f < 0.0 => Ok(-1),
            _ => match d.as_str() {
                Some("asc" | "ascending") => Ok(1),
                Some("desc" | "descending") => Ok(-1),
                _ => Err(format!("{kind_name}: sort direction for `{key}` must be 1 or -1")),
            },
        }
    };
    match v {
        Value::Object(m) => m.iter().map(|(k, d)| Ok((k.clone(), direction(k, d)?))).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(match s.strip_prefix('-') {
                    Some(field) => (field.to_owned(), -1),
                    None => (s.strip_prefix('+').unwrap_or(s).to_owned(), 1),
                }),
                // `[{name: 1}, {age: -1}]` or `[["name", 1]]` also read naturally.
                Value::Object(m) if m.len() == 1 => {
                    let (k, d) = m.iter().next().ok_or_else(|| format!("{kind_name}: empty sort entry"))?;
                    Ok((k.clone(), direction(k, d)?))
                }
                Value::Array(pair) if pair.len() == 2 && pair[0].is_string() => {
                    let k = pair[0].as_str().unwrap_or_default();
                    Ok((k.to_owned(), direction(k, &pair[1])?))
                }
                _ => Err(format!("{kind_name}: sort entries must be field names such as \"name\" or \"-age\"")),
            })
            .collect(),
        Value::String(s) => parse_sort(kind_name, &Value::Array(vec![Value::String(s.clone())])),
        _ => Err(format!("{kind_name}: `sort` must be an object such as {{name: 1}} or an array such as [\"name\"]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(kind: &str, q: &str, o: Option<&str>) -> Result<LookupRequest, String> {
        parse_request(kind, "test.posts", q, o, Instant::now())
    }

    #[test]
    fn find_id_defaults_to_the_documents_namespace() {
        let r = req("findId", r#""65a1b2c3d4e5f6a7b8c90001""#, None).expect("valid");
        assert_eq!(r.kind, LookupKind::FindId);
        assert_eq!((r.database.as_str(), r.collection.as_str()), ("test", "posts"));
        assert_eq!(r.query, json!({"_id": "65a1b2c3d4e5f6a7b8c90001"}));
    }

    #[test]
    fn options_override_database_collection_and_select() {
        let r = req("findId", "1", Some(r#"{"database":"other","collection":"users","select":{"age":1,"_id":0}}"#)).expect("valid");
        assert_eq!((r.database.as_str(), r.collection.as_str()), ("other", "users"));
        assert_eq!(Value::Object(r.select), json!({"age": 1, "_id": 0}));
    }

    #[test]
    fn sort_is_accepted_as_object_and_as_array() {
        // Scripts' objects keep their key order: the driver sends them as pairs (below).
        let r = req("find", "{}", Some(r#"{"sort":{"name":1},"limit":2}"#)).expect("object form");
        assert_eq!(r.sort, vec![("name".to_owned(), 1)]);
        assert_eq!(r.limit, Some(2));
        let r = req("find", "{}", Some(r#"{"sort":["name","-age","+x"]}"#)).expect("array form");
        assert_eq!(r.sort, vec![("name".to_owned(), 1), ("age".to_owned(), -1), ("x".to_owned(), 1)]);
        let r = req("find", "{}", Some(r#"{"sort":[["name",-1],{"age":1}]}"#)).expect("pairs");
        assert_eq!(r.sort, vec![("name".to_owned(), -1), ("age".to_owned(), 1)]);
    }

    #[test]
    fn sort_and_limit_apply_to_find_only() {
        let r = req("findOne", r#"{"a":1}"#, Some(r#"{"sort":["a"],"limit":3}"#)).expect("valid");
        assert!(r.sort.is_empty() && r.limit.is_none());
    }

    #[test]
    fn pipe_takes_an_array_of_stages() {
        let r = req("pipe", r#"[{"$match":{"foo":1}},{"$limit":1}]"#, None).expect("valid");
        assert_eq!(r.kind, LookupKind::Pipe);
        assert!(r.query.is_array());
        assert!(req("pipe", r#"{"$match":{}}"#, None).is_err());
    }

    #[test]
    fn bad_arguments_are_reported_with_the_function_name() {
        let e = req("find", "[1]", None).expect_err("array query");
        assert!(e.starts_with("find:"), "{e}");
        let e = req("find", "{}", Some(r#"{"limt":2}"#)).expect_err("typo");
        assert!(e.contains("unknown option `limt`"), "{e}");
        let e = req("find", "{}", Some(r#"{"sort":5}"#)).expect_err("bad sort");
        assert!(e.contains("`sort`"), "{e}");
        let e = parse_request("findOne", "nodot", "{}", None, Instant::now()).expect_err("no collection");
        assert!(e.contains("database and collection"), "{e}");
    }
}
