//! `_` as scripts see it: each function against Underscore's documented behaviour, evaluated
//! through the public API (a global script that evaluates the expression it is handed).

use std::sync::OnceLock;

use monsoon_script::{Config, MapOutcome, ScriptSource, Scripts};
use serde_json::{json, Value};

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        Scripts::new(Config {
            scripts: vec![ScriptSource::global(
                "module.exports = function(doc) { var v = (0, eval)(doc.expr); return {v: v, undef: v === undefined}; }",
            )],
            workers: 1,
            ..Config::default()
        })
        .expect("compiles")
    })
}

/// Evaluates `expr` in a script and returns its JSON value (`"<undefined>"` for `undefined`).
fn js(expr: &str) -> Value {
    let doc = json!({ "expr": expr }).to_string();
    match scripts().map("t.t", &doc, None) {
        Ok(MapOutcome::Replace { doc, .. }) => {
            let v: Value = serde_json::from_str(&doc).expect("JSON");
            if v["undef"] == json!(true) {
                json!("<undefined>")
            } else {
                v["v"].clone()
            }
        }
        other => panic!("{expr}: {other:?}"),
    }
}

#[test]
fn omit_and_pick_take_keys_arrays_or_a_predicate() {
    assert_eq!(js(r#"_.omit({a: 1, b: 2, c: 3}, "a", "c")"#), json!({"b": 2}));
    assert_eq!(js(r#"_.omit({a: 1, b: 2, c: 3}, ["a", "b"])"#), json!({"c": 3}));
    assert_eq!(js(r#"_.omit({a: 1, b: 2, c: 3}, function(v) { return v > 1; })"#), json!({"a": 1}));
    assert_eq!(js(r#"_.omit(null, "a")"#), json!({}));
    assert_eq!(js(r#"var o = {a: 1}; _.omit(o, "a"); o"#), json!({"a": 1}), "omit copies");
    assert_eq!(js(r#"_.pick({a: 1, b: 2, c: 3}, "a", "c", "zz")"#), json!({"a": 1, "c": 3}));
    assert_eq!(js(r#"_.pick({a: 1, b: 2, c: 3}, ["b"])"#), json!({"b": 2}));
    assert_eq!(js(r#"_.pick({a: 1, b: 2, c: 3}, function(v, k) { return k !== "b"; })"#), json!({"a": 1, "c": 3}));
}

#[test]
fn extend_assign_and_defaults() {
    assert_eq!(js("_.extend({a: 1}, {b: 2}, {a: 3})"), json!({"a": 3, "b": 2}));
    assert_eq!(js("_.assign({a: 1}, null, {b: 2})"), json!({"a": 1, "b": 2}));
    assert_eq!(js("_.extendOwn({}, Object.create({inherited: 1}))"), json!({}));
    assert_eq!(js("_.extend({}, Object.create({inherited: 1}))"), json!({"inherited": 1}));
    assert_eq!(js("_.defaults({a: 1, u: undefined}, {a: 2, b: 2, u: 3})"), json!({"a": 1, "b": 2, "u": 3}));
}

#[test]
fn has_keys_values_pairs_invert_object() {
    assert_eq!(js(r#"[_.has({a: 1}, "a"), _.has({a: 1}, "toString"), _.has(null, "a")]"#), json!([true, false, false]));
    assert_eq!(js(r#"[_.has({a: {b: 1}}, ["a", "b"]), _.has({a: {}}, ["a", "b"])]"#), json!([true, false]));
    assert_eq!(js("_.keys({one: 1, two: 2})"), json!(["one", "two"]));
    assert_eq!(js("_.keys(5)"), json!([]));
    assert_eq!(js("_.values({one: 1, two: 2})"), json!([1, 2]));
    assert_eq!(js("_.pairs({one: 1, two: 2})"), json!([["one", 1], ["two", 2]]));
    assert_eq!(js("_.invert({a: 'x', b: 'y'})"), json!({"x": "a", "y": "b"}));
    assert_eq!(js("_.object([['a', 1], ['b', 2]])"), json!({"a": 1, "b": 2}));
    assert_eq!(js("_.object(['a', 'b'], [1, 2])"), json!({"a": 1, "b": 2}));
    assert_eq!(js("_.mapObject({a: 1, b: 2}, function(v) { return v * 10; })"), json!({"a": 10, "b": 20}));
    assert_eq!(js("_.allKeys(Object.create({p: 1}))"), json!(["p"]));
}

#[test]
fn each_and_map_over_arrays_and_objects() {
    assert_eq!(js("var s = []; _.each([1, 2], function(v, i, l) { s.push([v, i, l.length]); }); s"), json!([[1, 0, 2], [2, 1, 2]]));
    assert_eq!(js("var s = []; _.forEach({a: 1, b: 2}, function(v, k) { s.push(k + v); }); s"), json!(["a1", "b2"]));
    assert_eq!(js("var s = []; _.each([1], function() { s.push(this.x); }, {x: 'ctx'}); s"), json!(["ctx"]));
    assert_eq!(js("_.each([1, 2], function() {})"), json!([1, 2]), "each returns the list");
    assert_eq!(js("_.map([1, 2, 3], function(n) { return n * 3; })"), json!([3, 6, 9]));
    assert_eq!(js("_.map({one: 1, two: 2}, function(v, k) { return k + v; })"), json!(["one1", "two2"]));
    assert_eq!(js("_.map([{a: 1}, {a: 2}], 'a')"), json!([1, 2]), "property shorthand");
    assert_eq!(js("_.map(null, function(v) { return v; })"), json!([]));
    assert_eq!(js("_.reduce([1, 2, 3], function(m, n) { return m + n; }, 0)"), json!(6));
    assert_eq!(js("_.reduce([1, 2, 3], function(m, n) { return m + n; })"), json!(6));
    assert_eq!(js("_.reduceRight([[0, 1], [2, 3]], function(a, b) { return a.concat(b); }, [])"), json!([2, 3, 0, 1]));
}

#[test]
fn filter_reject_find_where_every_some() {
    assert_eq!(js("_.filter([1, 2, 3, 4], function(n) { return n % 2 == 0; })"), json!([2, 4]));
    assert_eq!(js("_.filter({a: 1, b: 2}, function(v) { return v > 1; })"), json!([2]));
    assert_eq!(js("_.reject([1, 2, 3, 4], function(n) { return n % 2 == 0; })"), json!([1, 3]));
    assert_eq!(js("_.find([1, 2, 3, 4], function(n) { return n > 2; })"), json!(3));
    assert_eq!(js("_.find([1, 2], function(n) { return n > 5; })"), json!("<undefined>"));
    assert_eq!(js("_.find([{a: 1, b: 1}, {a: 2, b: 2}], {b: 2})"), json!({"a": 2, "b": 2}), "matcher shorthand");
    assert_eq!(js("_.findIndex([4, 6, 8], function(n) { return n > 5; })"), json!(1));
    assert_eq!(js("_.findKey({a: 1, b: 2}, function(v) { return v === 2; })"), json!("b"));
    assert_eq!(js("_.where([{a: 1, b: 2}, {a: 1, b: 3}, {a: 2}], {a: 1})"), json!([{"a": 1, "b": 2}, {"a": 1, "b": 3}]));
    assert_eq!(js("_.findWhere([{a: 1, b: 2}, {a: 1, b: 3}], {b: 3})"), json!({"a": 1, "b": 3}));
    assert_eq!(js("[_.every([2, 4], function(n) { return n % 2 == 0; }), _.every([2, 3], function(n) { return n % 2 == 0; }), _.every([])]"), json!([true, false, true]));
    assert_eq!(js("[_.some([1, 2], function(n) { return n > 1; }), _.some([0, null]), _.any([])]"), json!([true, false, false]));
}

#[test]
fn contains_pluck_size_and_type_checks() {
    assert_eq!(js("[_.contains([1, 2, 3], 3), _.includes([1, 2], 5), _.contains({a: 'x'}, 'x'), _.contains([NaN], NaN), _.contains([1, 2, 3], 1, 1)]"), json!([true, false, true, true, false]));
    assert_eq!(js("_.pluck([{name: 'moe', age: 40}, {name: 'larry'}], 'name')"), json!(["moe", "larry"]));
    assert_eq!(js("[_.size([1, 2, 3]), _.size({a: 1, b: 2}), _.size(null), _.size('abc')]"), json!([3, 2, 0, 3]));
    assert_eq!(js("[_.isEmpty([]), _.isEmpty({}), _.isEmpty(''), _.isEmpty(null), _.isEmpty([1]), _.isEmpty({a: 1}), _.isEmpty('a')]"), json!([true, true, true, true, false, false, false]));
    assert_eq!(js("[_.isArray([]), _.isArray({length: 0}), _.isObject({}), _.isObject(function() {}), _.isObject(null), _.isObject('s')]"), json!([true, false, true, true, false, false]));
    assert_eq!(js("[_.isString('s'), _.isString(1), _.isNumber(1.5), _.isNumber(NaN), _.isNumber('1'), _.isBoolean(false), _.isFunction(_.map)]"), json!([true, false, true, true, false, true, true]));
    assert_eq!(js("[_.isDate(new Date()), _.isDate('2024-01-01'), _.isRegExp(/a/), _.isNull(null), _.isUndefined(undefined), _.isNaN(NaN), _.isNaN(undefined), _.isFinite(1), _.isFinite(Infinity)]"), json!([true, false, true, true, true, true, false, true, false]));
}

#[test]
fn clone_is_shallow() {
    assert_eq!(js("var o = {a: {b: 1}}; var c = _.clone(o); c.x = 1; c.a.b = 2; [o, c]"), json!([{"a": {"b": 2}}, {"a": {"b": 2}, "x": 1}]));
    assert_eq!(js("var a = [1, 2]; var c = _.clone(a); c.push(3); [a, c]"), json!([[1, 2], [1, 2, 3]]));
    assert_eq!(js("_.clone(5)"), json!(5));
}

#[test]
fn first_last_rest_initial_compact() {
    // `undefined` inside an array comes out as null.
    assert_eq!(js("[_.first([5, 4, 3]), _.first([5, 4, 3], 2), _.head([]), _.take([1, 2], 0)]"), json!([5, [5, 4], null, []]));
    assert_eq!(js("[_.last([5, 4, 3]), _.last([5, 4, 3], 2)]"), json!([3, [4, 3]]));
    assert_eq!(js("[_.rest([5, 4, 3]), _.rest([5, 4, 3], 2), _.initial([5, 4, 3]), _.initial([5, 4, 3], 2)]"), json!([[4, 3], [3], [5, 4], [5]]));
    assert_eq!(js("_.compact([0, 1, false, 2, '', 3, null])"), json!([1, 2, 3]));
    assert_eq!(js("_.map([[1, 2], [3, 4]], _.first)"), json!([1, 3]), "guard: map passes the index");
}

#[test]
fn uniq_flatten_without_and_set_operations() {
    assert_eq!(js("_.uniq([1, 2, 1, 4, 1, 3])"), json!([1, 2, 4, 3]));
    assert_eq!(js("_.uniq([1, 1, 2, 3, 3], true)"), json!([1, 2, 3]));
    assert_eq!(js("_.uniq([{id: 1}, {id: 2}, {id: 1, x: 1}], 'id')"), json!([{"id": 1}, {"id": 2}]));
    assert_eq!(js("_.flatten([1, [2], [3, [[4]]]])"), json!([1, 2, 3, 4]));
    assert_eq!(js("_.flatten([1, [2], [3, [[4]]]], true)"), json!([1, 2, 3, [[4]]]));
    assert_eq!(js("_.flatten([1, [2], [3, [[4]]]], 2)"), json!([1, 2, 3, [4]]));
    assert_eq!(js("_.without([1, 2, 1, 0, 3, 1, 4], 0, 1)"), json!([2, 3, 4]));
    assert_eq!(js("_.union([1, 2, 3], [101, 2, 1, 10], [2, 1])"), json!([1, 2, 3, 101, 10]));
    assert_eq!(js("_.intersection([1, 2, 3], [101, 2, 1, 10], [2, 1])"), json!([1, 2]));
    assert_eq!(js("_.difference([1, 2, 3, 4, 5], [5, 2, 10])"), json!([1, 3, 4]));
    assert_eq!(js("_.zip(['a', 'b'], [1, 2], [true, false])"), json!([["a", 1, true], ["b", 2, false]]));
    assert_eq!(js("[_.indexOf([1, 2, 3], 2), _.lastIndexOf([1, 2, 1], 1), _.indexOf([1], 9)]"), json!([1, 2, -1]));
    assert_eq!(js("[_.range(4), _.range(1, 4), _.range(0, 10, 5), _.range(0, -3)]"), json!([[0, 1, 2, 3], [1, 2, 3], [0, 5], [0, -1, -2]]));
    assert_eq!(js("_.chunk([1, 2, 3, 4, 5], 2)"), json!([[1, 2], [3, 4], [5]]));
}

#[test]
fn group_index_count_sort_partition() {
    assert_eq!(js("_.groupBy([1.3, 2.1, 2.4], function(n) { return Math.floor(n); })"), json!({"1": [1.3], "2": [2.1, 2.4]}));
    assert_eq!(js("_.groupBy(['one', 'two', 'three'], 'length')"), json!({"3": ["one", "two"], "5": ["three"]}));
    assert_eq!(js("_.indexBy([{id: 'a', v: 1}, {id: 'b', v: 2}], 'id')"), json!({"a": {"id": "a", "v": 1}, "b": {"id": "b", "v": 2}}));
    assert_eq!(js("_.countBy([1, 2, 3, 4, 5], function(n) { return n % 2 == 0 ? 'even' : 'odd'; })"), json!({"odd": 3, "even": 2}));
    assert_eq!(js("_.sortBy([1, 2, 3, 4, 5, 6], function(n) { return Math.sin(n); })"), json!([5, 4, 6, 3, 1, 2]));
    assert_eq!(js("_.pluck(_.sortBy([{n: 'b', i: 1}, {n: 'a', i: 2}, {n: 'b', i: 3}, {i: 4}, {n: 'a', i: 5}], 'n'), 'i')"), json!([2, 5, 1, 3, 4]), "stable, undefined last");
    assert_eq!(js("_.partition([0, 1, 2, 3, 4, 5], function(n) { return n % 2; })"), json!([[1, 3, 5], [0, 2, 4]]));
}

#[test]
fn max_min_and_utilities() {
    assert_eq!(js("[_.max([1, 5, 3]), _.min([4, 2, 8])]"), json!([5, 2]));
    assert_eq!(js("_.max([{name: 'moe', age: 40}, {name: 'curly', age: 60}], function(s) { return s.age; })"), json!({"name": "curly", "age": 60}));
    assert_eq!(js("_.min([{age: 40}, {age: 20}], 'age')"), json!({"age": 20}));
    assert_eq!(js("[_.max([]) === -Infinity, _.min({}) === Infinity]"), json!([true, true]));
    assert_eq!(js("var t = _.now(); typeof t === 'number' && t > 1.6e12"), json!(true));
    assert_eq!(js("[_.identity(3), _.constant('k')(), _.noop(), _.times(3, function(i) { return i * i; })]"), json!([3, "k", null, [0, 1, 4]]));
    assert_eq!(js("[_.property('a')({a: 7}), _.property(['a', 'b'])({a: {b: 8}}), _.propertyOf({a: 9})('a')]"), json!([7, 8, 9]));
    assert_eq!(js("[_.isMatch({a: 1, b: 2}, {a: 1}), _.matcher({a: 1})({a: 2})]"), json!([true, false]));
    assert_eq!(js("[_.isEqual({a: [1, {b: 2}]}, {a: [1, {b: 2}]}), _.isEqual({a: 1}, {a: 1, b: 2}), _.isEqual(NaN, NaN), _.isEqual(new Date(5), new Date(5))]"), json!([true, false, true, true]));
    assert_eq!(js("[_.get({a: {b: 1}}, ['a', 'b']), _.get({}, 'x', 'dflt'), _.result({f: function() { return this.v; }, v: 3}, 'f')]"), json!([1, "dflt", 3]));
    assert_eq!(js("_.escape('<a href=\"x\">&</a>')"), json!("&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"));
    assert_eq!(js("[_.uniqueId('c') !== _.uniqueId('c'), _.uniqueId('id_').indexOf('id_')]"), json!([true, 0]));
    assert_eq!(js("_.toArray({a: 1, b: 2})"), json!([1, 2]));
    assert_eq!(js("_.invoke([[3, 1], [2, 5]], 'sort')"), json!([[1, 3], [2, 5]]));
}

#[test]
fn wrapper_and_chaining() {
    assert_eq!(js("_({a: 1, b: 2}).omit('a')"), json!({"b": 2}));
    assert_eq!(js("_.chain([1, 2, 3, 4]).filter(function(n) { return n % 2 == 0; }).map(function(n) { return n * 10; }).value()"), json!([20, 40]));
    assert_eq!(js("_([3, 1, 2]).chain().sortBy(_.identity).first(2).value()"), json!([1, 2]));
}
