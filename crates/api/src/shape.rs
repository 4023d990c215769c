//! The small languages of `spec.mappings`: dotted field paths, index templates
//! (`orders-{region}`) and MongoDB-style queries (`keep`, `deleteWhen`).
//!
//! Parsed here, once, for validation and for the engine: validation reports what is wrong
//! with the field named, and the engine evaluates the parsed forms per document.

use bson::Bson;
use serde_json::Value;

/// A dotted path into a document, e.g. `author.name`. It does not reach into arrays (except
/// in queries, which look into arrays of documents as MongoDB does).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parse `a.b.c`.
    ///
    /// # Errors
    /// An empty path or segment, or a segment starting with `$`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must name a field, e.g. `author.name`".into());
        }
        let parts: Vec<String> = text.split('.').map(str::to_owned).collect();
        if parts.iter().any(String::is_empty) {
            return Err(format!("`{text}` has an empty segment; write fields as `a.b.c`"));
        }
        if parts.iter().any(|p| p.starts_with('$')) {
            return Err(format!("`{text}`: field names starting with `$` are operators, not fields"));
        }
        Ok(Self(parts))
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// One piece of an index template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexPart {
    /// Literal text.
    Text(String),
    /// The (lower-cased) value of a document field.
    Field(FieldPath),
}

/// An index name, fixed or built from document fields: `orders-{region}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexTemplate(pub Vec<IndexPart>);

impl IndexTemplate {
    /// Parse a template. Text in braces names a field.
    ///
    /// # Errors
    /// Unbalanced braces, an empty or invalid field, or literal text Elasticsearch refuses
    /// in index names.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(IndexPart::Text(rest.to_owned()));
                    break;
                }
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(format!("`{text}` has a `}}` without its `{{`")),
                Some(i) => {
                    if i > 0 {
                        parts.push(IndexPart::Text(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let end = after.find('}').ok_or_else(|| format!("`{text}` has a `{{` without its `}}`"))?;
                    let field = FieldPath::parse(&after[..end]).map_err(|m| format!("`{text}`: {m}"))?;
                    parts.push(IndexPart::Field(field));
                    rest = &after[end + 1..];
                }
            }
        }
        let template = Self(parts);
        // Literal text must be valid where it stands; a field value is checked per document.
        let sample: String = template
            .0
            .iter()
            .map(|p| match p {
                IndexPart::Text(t) => t.as_str(),
                IndexPart::Field(_) => "x",
            })
            .collect();
        crate::check_index_name(&sample).map_err(|m| format!("`{text}` {m}"))?;
        Ok(template)
    }

    /// The name when the template has no fields.
    pub fn fixed(&self) -> Option<&str> {
        match self.0.as_slice() {
            [IndexPart::Text(t)] => Some(t),
            _ => None,
        }
    }
}

/// A MongoDB query, as `keep` and `deleteWhen` hold it.
#[derive(Clone, Debug, PartialEq)]
pub enum Query {
    /// Every one matches (`$and`, and the fields of one query object).
    And(Vec<Query>),
    /// At least one matches.
    Or(Vec<Query>),
    /// None matches.
    Nor(Vec<Query>),
    /// A condition on a field.
    Field(FieldPath, Cond),
}

/// A condition on one field's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Cond {
    /// Equal (an array field matches when an element is equal, or the array itself).
    Eq(Bson),
    /// Not equal.
    Ne(Bson),
    /// Greater than (same type class only, as MongoDB).
    Gt(Bson),
    /// Greater or equal.
    Gte(Bson),
    /// Less than.
    Lt(Bson),
    /// Less or equal.
    Lte(Bson),
    /// Equal to one of these.
    In(Vec<Bson>),
    /// Equal to none of these.
    Nin(Vec<Bson>),
    /// The field is present (`true`) or absent (`false`).
    Exists(bool),
    /// The inner condition does not hold.
    Not(Box<Cond>),
    /// Every condition holds (`{"$gte": 1, "$lt": 5}`).
    All(Vec<Cond>),
}

/// The operators [`Query::parse`] reads, for messages.
pub const QUERY_OPERATORS: &str = "$eq $ne $gt $gte $lt $lte $in $nin $exists $not $and $or $nor";

impl Query {
    /// Parse a query object. Values may use MongoDB Extended JSON (`{"$date": "2024-01-01T00:00:00Z"}`,
    /// `{"$oid": "…"}`).
    ///
    /// # Errors
    /// What is not a query, naming the path inside it.
    pub fn parse(value: &Value) -> Result<Self, String> {
        let Value::Object(map) = value else {
            return Err("must be a query object, e.g. `{\"status\": \"published\"}`".into());
        };
        let mut all = Vec::new();
        for (key, v) in map {
            all.push(match key.as_str() {
                "$and" | "$or" | "$nor" => {
                    let Value::Array(items) = v else {
                        return Err(format!("`{key}` takes a list of queries"));
                    };
                    if items.is_empty() {
                        return Err(format!("`{key}` takes a non-empty list of queries"));
                    }
                    let qs = items.iter().map(Self::parse).collect::<Result<Vec<_>, _>>().map_err(|m| format!("in `{key}`: {m}"))?;
                    match key.as_str() {
                        "$and" => Query::And(qs),
                        "$or" => Query::Or(qs),
                        _ => Query::Nor(qs),
                    }
                }
                op if op.starts_with('$') => return Err(format!("`{op}` is not supported at the top of a query; monsoon reads {QUERY_OPERATORS}")),
                field => {
                    let path = FieldPath::parse(field)?;
                    let cond = Cond::parse(v).map_err(|m| format!("`{field}`: {m}"))?;
                    Query::Field(path, cond)
                }
            });
        }
        Ok(if all.len() == 1 { all.remove(0) } else { Query::And(all) })
    }
}

fn bson(value: &Value) -> Result<Bson, String> {
    Bson::try_from(value.clone()).map_err(|e| format!("value {value} is not MongoDB Extended JSON: {e}"))
}

fn is_operator_object(v: &Value) -> Option<&serde_json::Map<String, Value>> {
    match v {
        Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.starts_with('$')) => {
            // Extended JSON values (`{"$date": …}`) are values, not operators.
            let ext = ["$date", "$oid", "$numberLong", "$numberDecimal", "$numberDouble", "$numberInt", "$binary", "$timestamp", "$regularExpression", "$minKey", "$maxKey", "$symbol", "$code"];
            (!m.keys().any(|k| ext.contains(&k.as_str()))).then_some(m)
        }
        _ => None,
    }
}

impl Cond {
    fn parse(v: &Value) -> Result<Self, String> {
        let Some(ops) = is_operator_object(v) else {
            if let Value::Object(m) = v {
                if m.keys().any(|k| k.starts_with('$')) && m.keys().any(|k| !k.starts_with('$')) {
                    return Err("mixes operators and fields; write `{\"$eq\": {…}}` to match a whole sub-document".into());
                }
            }
            return Ok(Cond::Eq(bson(v)?));
        };
        let mut conds = Vec::new();
        for (op, arg) in ops {
            let list = |arg: &Value| match arg {
                Value::Array(items) => items.iter().map(bson).collect::<Result<Vec<_>, _>>(),
                _ => Err(format!("`{op}` takes a list of values")),
            };
            conds.push(match op.as_str() {
                "$eq" => Cond::Eq(bson(arg)?),
                "$ne" => Cond::Ne(bson(arg)?),
                "$gt" => Cond::Gt(bson(arg)?),
                "$gte" => Cond::Gte(bson(arg)?),
                "$lt" => Cond::Lt(bson(arg)?),
                "$lte" => Cond::Lte(bson(arg)?),
                "$in" => Cond::In(list(arg)?),
                "$nin" => Cond::Nin(list(arg)?),
                "$exists" => match arg {
                    Value::Bool(b) => Cond::Exists(*b),
                    Value::Number(n) => Cond::Exists(n.as_f64() != Some(0.0)),
                    _ => return Err("`$exists` takes true or false".into()),
                },
                "$not" => {
                    if is_operator_object(arg).is_none() {
                        return Err("`$not` takes an operator object, e.g. `{\"$not\": {\"$gt\": 5}}`".into());
                    }
                    Cond::Not(Box::new(Cond::parse(arg)?))
                }
                other => return Err(format!("`{other}` is not supported; monsoon reads {QUERY_OPERATORS}")),
            });
        }
        Ok(if conds.len() == 1 { conds.remove(0) } else { Cond::All(conds) })
    }
}

/// Stages a snapshot read may run after monsoon's own `$match` (resume after the last `_id`)
/// and `$sort` (by `_id`): they must keep `_id` and the order.
pub const SNAPSHOT_STAGES: &[&str] = &["$match", "$project", "$addFields", "$set", "$unset", "$lookup", "$graphLookup", "$redact"];

/// Parse aggregation stages (each an object with one `$` operator) whose operator is in
/// `allowed`. Values may use MongoDB Extended JSON.
///
/// # Errors
/// The stage (by position) that is not one, or whose operator is not allowed, and why.
pub fn stages(values: &[Value], allowed: &[&str], why: &str) -> Result<Vec<bson::Document>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let Value::Object(m) = v else {
                return Err(format!("stage {i} must be an object such as `{{\"$match\": {{…}}}}`"));
            };
            let (Some(op), 1) = (m.keys().next(), m.len()) else {
                return Err(format!("stage {i} must have exactly one operator, e.g. `{{\"$match\": {{…}}}}`"));
            };
            if !allowed.contains(&op.as_str()) {
                return Err(format!("stage {i} is `{op}`, which {why}; allowed: {}", allowed.join(" ")));
            }
            match Bson::try_from(v.clone()) {
                Ok(Bson::Document(d)) => Ok(d),
                Ok(_) => Err(format!("stage {i} must be an object")),
                Err(e) => Err(format!("stage {i} is not MongoDB Extended JSON: {e}")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stages_are_single_operator_objects_from_a_list() {
        let ok = stages(&[json!({"$match": {"a": 1}}), json!({"$lookup": {"from": "u", "localField": "u", "foreignField": "_id", "as": "user"}})], SNAPSHOT_STAGES, "x").expect("ok");
        assert_eq!(ok.len(), 2);
        let e = stages(&[json!({"$group": {"_id": "$a"}})], SNAPSHOT_STAGES, "would lose `_id` or the order").expect_err("refused");
        assert!(e.contains("stage 0 is `$group`, which would lose") && e.contains("$lookup"), "{e}");
        assert!(stages(&[json!({"$match": {}, "$project": {}})], SNAPSHOT_STAGES, "x").is_err());
        assert!(stages(&[json!([1])], SNAPSHOT_STAGES, "x").is_err());
    }

    #[test]
    fn field_paths() {
        assert_eq!(FieldPath::parse("a.b").expect("ok").segments(), ["a", "b"]);
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("$where").is_err());
    }

    #[test]
    fn index_templates() {
        let t = IndexTemplate::parse("orders-{region}").expect("ok");
        assert_eq!(t.0, vec![IndexPart::Text("orders-".into()), IndexPart::Field(FieldPath::parse("region").expect("p"))]);
        assert_eq!(t.fixed(), None);
        assert_eq!(IndexTemplate::parse("orders").expect("ok").fixed(), Some("orders"));
        assert_eq!(IndexTemplate::parse("{tenant.id}").expect("ok").0.len(), 1);
        for bad in ["orders-{region", "orders-}", "Orders-{x}", "a{}", "_x{y}", "a b{c}"] {
            assert!(IndexTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queries_parse_fields_operators_and_logic() {
        let q = Query::parse(&json!({"status": "published", "score": {"$gte": 10, "$lt": 20}})).expect("ok");
        let Query::And(parts) = q else { panic!("and") };
        assert_eq!(parts[0], Query::Field(FieldPath::parse("status").expect("p"), Cond::Eq(Bson::String("published".into()))));
        assert!(matches!(&parts[1], Query::Field(_, Cond::All(c)) if c.len() == 2));
        let q = Query::parse(&json!({"$or": [{"a": 1}, {"b": {"$exists": false}}]})).expect("ok");
        assert!(matches!(q, Query::Or(v) if v.len() == 2));
        let q = Query::parse(&json!({"at": {"$gt": {"$date": "2024-01-01T00:00:00Z"}}})).expect("ok");
        assert!(matches!(q, Query::Field(_, Cond::Gt(Bson::DateTime(_)))));
        let q = Query::parse(&json!({"sub": {"x": 1}})).expect("ok");
        assert!(matches!(q, Query::Field(_, Cond::Eq(Bson::Document(_)))));
    }

    #[test]
    fn queries_refuse_what_they_cannot_evaluate_with_the_reason() {
        for (q, says) in [
            (json!({"a": {"$regex": "x"}}), "`$regex` is not supported"),
            (json!({"$where": "1"}), "not supported at the top"),
            (json!({"a": {"$in": 3}}), "takes a list"),
            (json!({"a": {"$gt": 1, "b": 2}}), "mixes operators and fields"),
            (json!({"$or": []}), "non-empty list"),
            (json!("x"), "must be a query object"),
            (json!({"a": {"$not": 5}}), "`$not` takes an operator object"),
        ] {
            let e = Query::parse(&q).expect_err("refused");
            assert!(e.contains(says), "{q}: {e}");
        }
    }
}

/// One piece of a date format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DatePart {
    Year,
    ShortYear,
    Month,
    Day,
    DayOfYear,
    Hour,
}

/// A date format for index names (`spec.timeMachine.indexSuffix`): `%Y` year, `%y` two-digit
/// year, `%m` month, `%d` day, `%j` day of the year, `%H` hour (all zero-padded, UTC), `%%` a
/// percent sign, other text as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DateFormat(Vec<Result<DatePart, String>>);

impl DateFormat {
    /// Parse a format.
    ///
    /// # Errors
    /// An unknown `%` directive, a lone `%` at the end, text no index name may hold, or a
    /// format without any date part.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                literal.push(c);
                continue;
            }
            let part = match chars.next() {
                Some('%') => {
                    literal.push('%');
                    continue;
                }
                Some('Y') => DatePart::Year,
                Some('y') => DatePart::ShortYear,
                Some('m') => DatePart::Month,
                Some('d') => DatePart::Day,
                Some('j') => DatePart::DayOfYear,
                Some('H') => DatePart::Hour,
                Some(other) => return Err(format!("`%{other}` is not a date part monsoon writes; use %Y %y %m %d %j %H (or %% for a percent sign)")),
                None => return Err("ends with a lone `%`; write `%%` for a percent sign".into()),
            };
            if !literal.is_empty() {
                parts.push(Err(std::mem::take(&mut literal)));
            }
            parts.push(Ok(part));
        }
        if !literal.is_empty() {
            parts.push(Err(literal));
        }
        if !parts.iter().any(Result::is_ok) {
            return Err("holds no date part (%Y %y %m %d %j %H): every change would go to one index".into());
        }
        for text in parts.iter().filter_map(|p| p.as_ref().err()) {
            if text != &text.to_lowercase() || text.chars().any(|c| matches!(c, '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':')) {
                return Err(format!("text `{text}` cannot be part of an index name (lower-case, without `\\ / * ? \" < > | , # :` or spaces)"));
            }
        }
        Ok(Self(parts))
    }

    /// The date of `unix_seconds` (UTC) in this format.
    pub fn format(&self, unix_seconds: i64) -> String {
        let days = unix_seconds.div_euclid(86_400);
        let hour = unix_seconds.rem_euclid(86_400) / 3600;
        let (year, month, day) = civil_from_days(days);
        let day_of_year = days - days_from_civil(year, 1, 1) + 1;
        let mut out = String::with_capacity(16);
        for part in &self.0 {
            match part {
                Err(text) => out.push_str(text),
                Ok(DatePart::Year) => out.push_str(&format!("{year:04}")),
                Ok(DatePart::ShortYear) => out.push_str(&format!("{:02}", year.rem_euclid(100))),
                Ok(DatePart::Month) => out.push_str(&format!("{month:02}")),
                Ok(DatePart::Day) => out.push_str(&format!("{day:02}")),
                Ok(DatePart::DayOfYear) => out.push_str(&format!("{day_of_year:03}")),
                Ok(DatePart::Hour) => out.push_str(&format!("{hour:02}")),
            }
        }
        out
    }
}

/// Year, month, day of the day `days` after 1970-01-01 (proleptic Gregorian; Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to `year-month-day` (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod date_format_tests {
    use super::DateFormat;

    #[test]
    fn formats_dates_of_cluster_times_in_utc() {
        let daily = DateFormat::parse("%Y-%m-%d").expect("parses");
        // 2023-11-14T22:13:20Z.
        assert_eq!(daily.format(1_700_000_000), "2023-11-14");
        assert_eq!(daily.format(0), "1970-01-01");
        // Leap day, and the last second of a year.
        assert_eq!(daily.format(1_709_164_800), "2024-02-29");
        assert_eq!(DateFormat::parse("%Y.%j.%H").expect("parses").format(1_704_067_199), "2023.365.23");
        assert_eq!(DateFormat::parse("%y%m-100%%").expect("parses").format(1_709_164_800), "2402-100%");
    }

    #[test]
    fn refuses_what_no_index_name_can_hold() {
        assert!(DateFormat::parse("%Y-%b").expect_err("unknown").contains("%b"));
        assert!(DateFormat::parse("%Y%").is_err());
        assert!(DateFormat::parse("daily").expect_err("no date").contains("no date part"));
        assert!(DateFormat::parse("%Y/%m").is_err());
        assert!(DateFormat::parse("%Y-W").is_err());
    }
}
