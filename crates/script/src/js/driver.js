// monsoon's driver: registers the user's scripts and runs them per call, so that one call from
// Rust crosses into JavaScript once (parse the document, run every script in order, check the
// result, serialize). Loaded after `_` and before any user script. Calls return small arrays
// `[code, a, b]` that the Rust side decodes (see `runtime.rs`).
var __monsoon = (function () {
  'use strict';
  var tables = { script: {}, filter: {}, pipeline: {} };
  var chains = { script: {}, filter: {}, pipeline: {} };
  // The script running now: Rust reads it to name the script in an error.
  var state = { script: '' };

  function describe(v) {
    if (v === null) return 'null';
    var t = typeof v;
    if (t === 'string') return 'a string (' + JSON.stringify(v.length > 40 ? v.slice(0, 40) + '...' : v) + ')';
    if (t === 'number') return 'a number (' + v + ')';
    if (t === 'function') return 'a function';
    if (t !== 'object') return 'a ' + t;
    if (Array.isArray(v)) return 'an array';
    var tag = Object.prototype.toString.call(v).slice(8, -1);
    return tag === 'Object' ? 'an object' : 'a ' + tag;
  }
  // Monstache's definition of an object a mapping function may return: a non-primitive other
  // than Function, Array, String, Number, Boolean, Date, Error and RegExp.
  var objectProto = Object.prototype;
  function isDocument(v) {
    if (v === null || typeof v !== 'object') return false;
    if (Object.getPrototypeOf(v) === objectProto) return true; // the common case, fast
    if (Array.isArray(v)) return false;
    return !(v instanceof Date || v instanceof Error || v instanceof RegExp ||
      v instanceof String || v instanceof Number || v instanceof Boolean);
  }
  function chain(kind, ns) {
    var c = chains[kind][ns];
    if (c === undefined) {
      c = (tables[kind][''] || []).concat(ns === '' ? [] : (tables[kind][ns] || []));
      chains[kind][ns] = c;
    }
    return c;
  }

  return {
    state: state,
    describe: describe,
    // `factory` is the user's source wrapped as `function (module, exports) {...}`.
    register: function (kind, ns, name, factory) {
      var module = { exports: {} };
      state.script = name;
      var ret = factory.call(module.exports, module, module.exports);
      var fn = module.exports;
      if (typeof fn !== 'function' && typeof ret === 'function') fn = ret;
      if (typeof fn !== 'function') {
        throw new TypeError(name + ' must assign a function to module.exports, got ' + describe(fn));
      }
      (tables[kind][ns] = tables[kind][ns] || []).push({ fn: fn, name: name });
      chains[kind] = {};
    },
    // [0] drop, [1] keep the input, [2, doc, metaJson|null] replace, [3, what] bad return,
    // [4, why] unreadable input (map and filter).
    map: function (ns, json, udJson) {
      var c = chain('script', ns);
      state.script = c.length > 0 ? c[0].name : '';
      var doc, ud;
      try { doc = JSON.parse(json); ud = udJson == null ? {} : JSON.parse(udJson); } catch (e) { return [4, String(e)]; }
      if (!isDocument(doc)) return [4, 'the document is ' + describe(doc) + ', not an object'];
      var cur = doc, replaced = false;
      for (var i = 0; i < c.length; i++) {
        state.script = c[i].name;
        var r = c[i].fn.call(cur, cur, ns, ud);
        if (r === true) continue;
        if (!r) return [0];
        if (!isDocument(r)) return [3, describe(r)];
        cur = r;
        replaced = true;
      }
      if (!replaced) return [1];
      var meta = cur._meta_monstache;
      // Assigning undefined leaves the key out of JSON.stringify's output, and costs far less
      // than `delete` (which turns the object into a slower dictionary).
      if (meta !== undefined) cur._meta_monstache = undefined;
      // The document itself goes back: Rust writes its JSON (faster than JSON.stringify).
      return [2, cur, meta == null ? null : JSON.stringify(meta)];
    },
    // [0] ignore, [1] keep.
    filter: function (ns, json, udJson) {
      var c = chain('filter', ns);
      state.script = c.length > 0 ? c[0].name : '';
      var doc, ud;
      try { doc = JSON.parse(json); ud = udJson == null ? {} : JSON.parse(udJson); } catch (e) { return [4, String(e)]; }
      if (!isDocument(doc)) return [4, 'the document is ' + describe(doc) + ', not an object'];
      for (var i = 0; i < c.length; i++) {
        state.script = c[i].name;
        if (!c[i].fn.call(doc, doc, ns, ud)) return [0];
      }
      return [1];
    },
    // [2, stagesJson] or [3, what]: the global pipeline's stages, then the namespace's own.
    pipeline: function (ns, changeStream) {
      var c = chain('pipeline', ns), stages = [];
      for (var i = 0; i < c.length; i++) {
        state.script = c[i].name;
        var r = c[i].fn.call(undefined, ns, changeStream);
        if (!Array.isArray(r)) return [3, describe(r)];
        for (var j = 0; j < r.length; j++) {
          if (!isDocument(r[j])) return [3, 'an array whose element ' + j + ' is ' + describe(r[j])];
          stages.push(r[j]);
        }
      }
      return [2, JSON.stringify(stages)];
    }
  };
})();

// Lookups, as Monstache names them. The native side (`__monsoon_lookup`) takes and returns JSON
// text, as a pair [ok, json or message]; a failed lookup throws an Error the script may catch.
var findId, findOne, find, pipe;
(function (native) {
  'use strict';
  function call(kind, query, options) {
    if (query === undefined) throw new TypeError(kind + ' needs at least one argument');
    if (options !== null && typeof options === 'object' && options.sort !== null &&
        typeof options.sort === 'object' && !Array.isArray(options.sort)) {
      // Keep the sort keys' order: send `{a: 1, b: -1}` as `[["a", 1], ["b", -1]]`.
      var copy = {};
      for (var k in options) copy[k] = options[k];
      copy.sort = Object.keys(options.sort).map(function (key) { return [key, options.sort[key]]; });
      options = copy;
    }
    var r = native(kind, JSON.stringify(query),
      options === undefined || options === null ? null : JSON.stringify(options));
    if (!r[0]) throw new Error(kind + ' failed: ' + r[1]);
    return r[1] === null || r[1] === undefined ? null : JSON.parse(r[1]);
  }
  findId = function (id, options) { return call('findId', id, options); };
  findOne = function (query, options) { return call('findOne', query, options); };
  find = function (query, options) { return call('find', query, options); };
  pipe = function (stages, options) { return call('pipe', stages, options); };
})(__monsoon_lookup);
