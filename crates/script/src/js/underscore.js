// monsoon's own `_`: the Underscore.js functions that Monstache scripts commonly use, written for
// monsoon (not Underscore's source). Semantics follow Underscore's documentation: collections are
// arrays (anything with a numeric `length`) or plain objects (their own enumerable keys).
// Loaded once per worker runtime, before any user script; `_` is a global.
var _ = (function () {
  'use strict';
  var hasOwn = Object.prototype.hasOwnProperty;
  var toStr = Object.prototype.toString;

  function _(obj) {
    if (obj instanceof _) return obj;
    if (!(this instanceof _)) return new _(obj);
    this._wrapped = obj;
  }

  function isArrayLike(o) {
    if (o == null || typeof o === 'function') return false;
    var n = o.length;
    return typeof n === 'number' && n >= 0 && n % 1 === 0;
  }
  function sameValueZero(a, b) { return a === b || (a !== a && b !== b); }
  function ownKeys(o) { return o == null ? [] : Object.keys(Object(o)); }

  function property(path) {
    if (Array.isArray(path)) {
      return function (o) {
        for (var i = 0; i < path.length; i++) { if (o == null) return undefined; o = o[path[i]]; }
        return o;
      };
    }
    return function (o) { return o == null ? undefined : o[path]; };
  }
  function isMatch(o, attrs) {
    var ks = ownKeys(attrs);
    if (o == null) return ks.length === 0;
    var obj = Object(o);
    for (var i = 0; i < ks.length; i++) {
      if (attrs[ks[i]] !== obj[ks[i]] || !(ks[i] in obj)) return false;
    }
    return true;
  }
  function matcher(attrs) { attrs = _.extendOwn({}, attrs); return function (o) { return isMatch(o, attrs); }; }
  function identity(v) { return v; }
  // The iteratee shorthands: a function, an object (matcher), or a property name / path.
  function cb(v, ctx) {
    if (v == null) return identity;
    if (typeof v === 'function') return ctx === undefined ? v : function (a, b, c) { return v.call(ctx, a, b, c); };
    if (typeof v === 'object' && !Array.isArray(v)) return matcher(v);
    return property(v);
  }
  function flat(input, depth, strict, out) {
    for (var i = 0; i < input.length; i++) {
      var v = input[i];
      if (isArrayLike(v) && (Array.isArray(v) || toStr.call(v) === '[object Arguments]')) {
        if (depth > 0 || depth === undefined) {
          flat(v, depth === undefined ? undefined : depth - 1, strict, out);
        } else {
          for (var j = 0; j < v.length; j++) out.push(v[j]);
        }
      } else if (!strict) {
        out.push(v);
      }
    }
    return out;
  }
  // The keys of pick/omit: strings (or numbers) as given, arrays flattened.
  function keyArgs(args, from) {
    var ks = [];
    for (var i = from; i < args.length; i++) {
      var a = args[i];
      if (Array.isArray(a)) flat(a, undefined, false, ks); else ks.push(a);
    }
    return ks;
  }

  // ---- objects ----
  _.keys = function (o) { return (o !== null && (typeof o === 'object' || typeof o === 'function')) ? Object.keys(o) : []; };
  _.allKeys = function (o) { var r = []; if (o !== null && typeof o === 'object') { for (var k in o) r.push(k); } return r; };
  _.values = function (o) { var ks = _.keys(o), r = new Array(ks.length); for (var i = 0; i < ks.length; i++) r[i] = o[ks[i]]; return r; };
  _.pairs = function (o) { var ks = _.keys(o), r = new Array(ks.length); for (var i = 0; i < ks.length; i++) r[i] = [ks[i], o[ks[i]]]; return r; };
  _.invert = function (o) { var r = {}, ks = _.keys(o); for (var i = 0; i < ks.length; i++) r[o[ks[i]]] = ks[i]; return r; };
  _.object = function (list, values) {
    var r = {};
    for (var i = 0; list && i < list.length; i++) {
      if (values) r[list[i]] = values[i]; else r[list[i][0]] = list[i][1];
    }
    return r;
  };
  _.mapObject = function (o, f, ctx) {
    f = cb(f, ctx);
    var ks = _.keys(o), r = {};
    for (var i = 0; i < ks.length; i++) r[ks[i]] = f(o[ks[i]], ks[i], o);
    return r;
  };
  function assigner(keysOf, defaultsOnly) {
    return function (target) {
      if (target == null || arguments.length < 2) return target;
      target = Object(target);
      for (var a = 1; a < arguments.length; a++) {
        var src = arguments[a];
        if (src == null) continue;
        var ks = keysOf(src);
        for (var i = 0; i < ks.length; i++) {
          var k = ks[i];
          if (!defaultsOnly || target[k] === undefined) target[k] = src[k];
        }
      }
      return target;
    };
  }
  _.extend = assigner(_.allKeys, false);
  _.extendOwn = _.assign = assigner(_.keys, false);
  _.defaults = assigner(_.allKeys, true);
  // pick / omit take keys (strings, or arrays of them, any depth) or a predicate (value, key, obj).
  _.pick = function (o, first) {
    var r = {};
    if (o == null) return r;
    o = Object(o);
    if (typeof first === 'function') {
      var f = cb(first, arguments[2]);
      for (var k in o) { if (f(o[k], k, o)) r[k] = o[k]; }
      return r;
    }
    var ks = keyArgs(arguments, 1);
    for (var i = 0; i < ks.length; i++) { if (ks[i] in o) r[ks[i]] = o[ks[i]]; }
    return r;
  };
  _.omit = function (o, first) {
    var r = {};
    if (o == null) return r;
    o = Object(o);
    var k;
    if (typeof first === 'function') {
      var f = cb(first, arguments[2]);
      for (k in o) { if (!f(o[k], k, o)) r[k] = o[k]; }
      return r;
    }
    var drop = Object.create(null), ks = keyArgs(arguments, 1);
    for (var i = 0; i < ks.length; i++) drop[ks[i]] = true;
    for (k in o) { if (drop[k] !== true) r[k] = o[k]; }
    return r;
  };
  _.has = function (o, path) {
    if (!Array.isArray(path)) return o != null && hasOwn.call(o, path);
    for (var i = 0; i < path.length; i++) {
      if (o == null || !hasOwn.call(o, path[i])) return false;
      o = o[path[i]];
    }
    return path.length > 0;
  };
  _.property = property;
  _.propertyOf = function (o) { return function (path) { return property(path)(o); }; };
  _.matcher = _.matches = matcher;
  _.isMatch = isMatch;
  _.clone = function (o) {
    if (!_.isObject(o)) return o;
    return Array.isArray(o) ? o.slice() : _.extend({}, o);
  };
  _.tap = function (o, f) { f(o); return o; };
  _.get = function (o, path, dflt) {
    var v = property(Array.isArray(path) ? path : [path])(o);
    return v === undefined ? dflt : v;
  };

  // ---- type checks ----
  _.isArray = Array.isArray;
  _.isObject = function (o) { var t = typeof o; return t === 'function' || (t === 'object' && o !== null); };
  _.isString = function (o) { return typeof o === 'string' || toStr.call(o) === '[object String]'; };
  _.isNumber = function (o) { return typeof o === 'number' || toStr.call(o) === '[object Number]'; };
  _.isBoolean = function (o) { return o === true || o === false || toStr.call(o) === '[object Boolean]'; };
  _.isFunction = function (o) { return typeof o === 'function'; };
  _.isDate = function (o) { return toStr.call(o) === '[object Date]'; };
  _.isRegExp = function (o) { return toStr.call(o) === '[object RegExp]'; };
  _.isError = function (o) { return toStr.call(o) === '[object Error]'; };
  _.isNull = function (o) { return o === null; };
  _.isUndefined = function (o) { return o === undefined; };
  _.isNaN = function (o) { return _.isNumber(o) && isNaN(o); };
  _.isFinite = function (o) { return typeof o !== 'symbol' && isFinite(o) && !isNaN(parseFloat(o)); };
  _.isArguments = function (o) { return toStr.call(o) === '[object Arguments]'; };
  _.isEmpty = function (o) {
    if (o == null) return true;
    if (isArrayLike(o) && (Array.isArray(o) || _.isString(o) || _.isArguments(o))) return o.length === 0;
    return _.keys(o).length === 0;
  };
  _.isEqual = function eq(a, b) {
    if (a === b) return a !== 0 || 1 / a === 1 / b;
    if (a == null || b == null) return false;
    if (a !== a) return b !== b;
    var ca = toStr.call(a);
    if (ca !== toStr.call(b)) return false;
    switch (ca) {
      case '[object String]': case '[object RegExp]': return '' + a === '' + b;
      case '[object Number]': return +a !== +a ? +b !== +b : (+a === 0 ? 1 / +a === 1 / b : +a === +b);
      case '[object Date]': case '[object Boolean]': return +a === +b;
    }
    if (typeof a !== 'object' || typeof b !== 'object') return false;
    if (Array.isArray(a)) {
      if (a.length !== b.length) return false;
      for (var i = 0; i < a.length; i++) { if (!eq(a[i], b[i])) return false; }
      return true;
    }
    var ka = Object.keys(a);
    if (ka.length !== Object.keys(b).length) return false;
    for (var j = 0; j < ka.length; j++) {
      if (!hasOwn.call(b, ka[j]) || !eq(a[ka[j]], b[ka[j]])) return false;
    }
    return true;
  };

  // ---- collections ----
  _.each = _.forEach = function (list, f, ctx) {
    f = cb(f, ctx);
    var i;
    if (isArrayLike(list)) { for (i = 0; i < list.length; i++) f(list[i], i, list); }
    else { var ks = _.keys(list); for (i = 0; i < ks.length; i++) f(list[ks[i]], ks[i], list); }
    return list;
  };
  _.map = _.collect = function (list, f, ctx) {
    f = cb(f, ctx);
    var r = [], i;
    if (isArrayLike(list)) { for (i = 0; i < list.length; i++) r.push(f(list[i], i, list)); }
    else { var ks = _.keys(list); for (i = 0; i < ks.length; i++) r.push(f(list[ks[i]], ks[i], list)); }
    return r;
  };
  _.reduce = _.foldl = _.inject = function (list, f, memo, ctx) {
    f = cb(f, ctx);
    var ks = isArrayLike(list) ? null : _.keys(list), n = (ks || list || []).length, i = 0;
    if (arguments.length < 3) { if (n === 0) return undefined; memo = list[ks ? ks[0] : 0]; i = 1; }
    for (; i < n; i++) { var k = ks ? ks[i] : i; memo = f(memo, list[k], k, list); }
    return memo;
  };
  _.reduceRight = _.foldr = function (list, f, memo, ctx) {
    f = cb(f, ctx);
    var ks = isArrayLike(list) ? null : _.keys(list), i = (ks || list || []).length - 1;
    if (arguments.length < 3) { if (i < 0) return undefined; memo = list[ks ? ks[i] : i]; i--; }
    for (; i >= 0; i--) { var k = ks ? ks[i] : i; memo = f(memo, list[k], k, list); }
    return memo;
  };
  function entries(list) {
    if (isArrayLike(list)) { var r = []; for (var i = 0; i < list.length; i++) r.push([i, list[i]]); return r; }
    return _.map(_.keys(list), function (k) { return [k, list[k]]; });
  }
  _.filter = _.select = function (list, f, ctx) {
    f = cb(f, ctx);
    var r = [];
    _.each(list, function (v, k, l) { if (f(v, k, l)) r.push(v); });
    return r;
  };
  _.reject = function (list, f, ctx) { f = cb(f, ctx); return _.filter(list, function (v, k, l) { return !f(v, k, l); }); };
  _.find = _.detect = function (list, f, ctx) {
    f = cb(f, ctx);
    var es = entries(list);
    for (var i = 0; i < es.length; i++) { if (f(es[i][1], es[i][0], list)) return es[i][1]; }
    return undefined;
  };
  _.findIndex = function (arr, f, ctx) {
    f = cb(f, ctx);
    for (var i = 0; arr && i < arr.length; i++) { if (f(arr[i], i, arr)) return i; }
    return -1;
  };
  _.findKey = function (o, f, ctx) {
    f = cb(f, ctx);
    var ks = _.keys(o);
    for (var i = 0; i < ks.length; i++) { if (f(o[ks[i]], ks[i], o)) return ks[i]; }
    return undefined;
  };
  _.where = function (list, attrs) { return _.filter(list, matcher(attrs)); };
  _.findWhere = function (list, attrs) { return _.find(list, matcher(attrs)); };
  _.every = _.all = function (list, f, ctx) {
    f = cb(f, ctx);
    var es = entries(list);
    for (var i = 0; i < es.length; i++) { if (!f(es[i][1], es[i][0], list)) return false; }
    return true;
  };
  _.some = _.any = function (list, f, ctx) {
    f = cb(f, ctx);
    var es = entries(list);
    for (var i = 0; i < es.length; i++) { if (f(es[i][1], es[i][0], list)) return true; }
    return false;
  };
  _.contains = _.includes = _.include = function (list, value, fromIndex) {
    var vs = isArrayLike(list) ? list : _.values(list);
    var start = typeof fromIndex === 'number' ? (fromIndex < 0 ? Math.max(0, vs.length + fromIndex) : fromIndex) : 0;
    for (var i = start; i < vs.length; i++) { if (sameValueZero(vs[i], value)) return true; }
    return false;
  };
  _.invoke = function (list, method) {
    var args = Array.prototype.slice.call(arguments, 2);
    return _.map(list, function (v) {
      var fn = typeof method === 'function' ? method : (v == null ? undefined : v[method]);
      return fn == null ? undefined : fn.apply(v, args);
    });
  };
  _.pluck = function (list, key) { return _.map(list, property(key)); };
  function extreme(list, f, ctx, better, start) {
    var best = start, bestScore = start;
    if (f == null || (typeof f === 'number' && list != null && typeof list[0] !== 'object')) {
      var vs = isArrayLike(list) ? list : _.values(list);
      for (var i = 0; i < vs.length; i++) { if (vs[i] != null && better(vs[i], best)) best = vs[i]; }
      return best;
    }
    f = cb(f, ctx);
    _.each(list, function (v, k, l) {
      var s = f(v, k, l);
      if (better(s, bestScore) || (s === start && best === start)) { best = v; bestScore = s; }
    });
    return best;
  }
  _.max = function (list, f, ctx) { return extreme(list, f, ctx, function (a, b) { return a > b; }, -Infinity); };
  _.min = function (list, f, ctx) { return extreme(list, f, ctx, function (a, b) { return a < b; }, Infinity); };
  _.sortBy = function (list, f, ctx) {
    f = cb(f, ctx);
    var i = 0;
    var decorated = _.map(list, function (v, k, l) { return { v: v, i: i++, c: f(v, k, l) }; });
    decorated.sort(function (a, b) {
      var x = a.c, y = b.c;
      if (x !== y) {
        if (x > y || x === undefined) return 1;
        if (x < y || y === undefined) return -1;
      }
      return a.i - b.i;
    });
    return _.pluck(decorated, 'v');
  };
  function grouper(into) {
    return function (list, f, ctx) {
      f = cb(f, ctx);
      var r = {};
      _.each(list, function (v, k, l) { into(r, v, f(v, k, l)); });
      return r;
    };
  }
  _.groupBy = grouper(function (r, v, k) { if (hasOwn.call(r, k)) r[k].push(v); else r[k] = [v]; });
  _.indexBy = grouper(function (r, v, k) { r[k] = v; });
  _.countBy = grouper(function (r, v, k) { if (hasOwn.call(r, k)) r[k]++; else r[k] = 1; });
  _.partition = function (list, f, ctx) {
    f = cb(f, ctx);
    var yes = [], no = [];
    _.each(list, function (v, k, l) { (f(v, k, l) ? yes : no).push(v); });
    return [yes, no];
  };
  _.size = function (o) { if (o == null) return 0; return isArrayLike(o) ? o.length : _.keys(o).length; };
  _.toArray = function (o) {
    if (!o) return [];
    if (Array.isArray(o)) return o.slice();
    if (_.isString(o)) return Array.from(String(o));
    if (isArrayLike(o)) return Array.prototype.slice.call(o);
    return _.values(o);
  };

  // ---- arrays ----
  _.first = _.head = _.take = function (arr, n, guard) {
    if (arr == null || arr.length < 1) return n == null || guard ? undefined : [];
    if (n == null || guard) return arr[0];
    return Array.prototype.slice.call(arr, 0, Math.max(0, n));
  };
  _.last = function (arr, n, guard) {
    if (arr == null || arr.length < 1) return n == null || guard ? undefined : [];
    if (n == null || guard) return arr[arr.length - 1];
    return Array.prototype.slice.call(arr, Math.max(0, arr.length - n));
  };
  _.initial = function (arr, n, guard) {
    return Array.prototype.slice.call(arr, 0, Math.max(0, arr.length - (n == null || guard ? 1 : n)));
  };
  _.rest = _.tail = _.drop = function (arr, n, guard) {
    return Array.prototype.slice.call(arr, n == null || guard ? 1 : n);
  };
  _.compact = function (arr) { return _.filter(arr, Boolean); };
  _.flatten = function (arr, depth) {
    if (depth === true) depth = 0; else if (depth === false || depth == null || depth === Infinity) depth = undefined;
    else if (depth <= 0) return Array.prototype.slice.call(arr);
    else depth = depth - 1;
    return flat(arr || [], depth, false, []);
  };
  _.uniq = _.unique = function (arr, isSorted, f, ctx) {
    if (typeof isSorted !== 'boolean') { ctx = f; f = isSorted; isSorted = false; }
    if (f != null) f = cb(f, ctx);
    var r = [], seen = [], last;
    for (var i = 0; arr && i < arr.length; i++) {
      var v = arr[i], c = f ? f(v, i, arr) : v;
      if (isSorted && !f) { if (!i || last !== c) r.push(v); last = c; }
      else if (!_.contains(seen, c)) { seen.push(c); r.push(v); }
    }
    return r;
  };
  _.without = function (arr) { var vs = Array.prototype.slice.call(arguments, 1); return _.difference(arr, vs); };
  _.difference = function (arr) {
    var rest = flat(Array.prototype.slice.call(arguments, 1), 0, true, []);
    return _.filter(arr, function (v) { return !_.contains(rest, v); });
  };
  _.union = function () { return _.uniq(flat(Array.prototype.slice.call(arguments), 0, true, [])); };
  _.intersection = function (arr) {
    var others = Array.prototype.slice.call(arguments, 1), r = [];
    for (var i = 0; arr && i < arr.length; i++) {
      var v = arr[i];
      if (_.contains(r, v)) continue;
      var inAll = true;
      for (var j = 0; j < others.length; j++) { if (!_.contains(others[j], v)) { inAll = false; break; } }
      if (inAll) r.push(v);
    }
    return r;
  };
  _.zip = function () {
    var arrs = Array.prototype.slice.call(arguments), n = _.max(_.pluck(arrs, 'length')), r = [];
    if (!(n > 0)) return [];
    for (var i = 0; i < n; i++) r.push(_.pluck(arrs, i));
    return r;
  };
  _.unzip = function (arrs) { return _.zip.apply(null, arrs || []); };
  _.indexOf = function (arr, v) { for (var i = 0; arr && i < arr.length; i++) { if (sameValueZero(arr[i], v)) return i; } return -1; };
  _.lastIndexOf = function (arr, v) { for (var i = arr ? arr.length - 1 : -1; i >= 0; i--) { if (sameValueZero(arr[i], v)) return i; } return -1; };
  _.range = function (start, stop, step) {
    if (stop == null) { stop = start || 0; start = 0; }
    if (!step) step = stop < start ? -1 : 1;
    var n = Math.max(Math.ceil((stop - start) / step), 0), r = new Array(n);
    for (var i = 0; i < n; i++, start += step) r[i] = start;
    return r;
  };
  _.chunk = function (arr, size) {
    if (size == null || size < 1) return [];
    var r = [];
    for (var i = 0; i < arr.length; i += size) r.push(Array.prototype.slice.call(arr, i, i + size));
    return r;
  };

  // ---- utilities ----
  _.identity = identity;
  _.constant = function (v) { return function () { return v; }; };
  _.noop = function () {};
  _.now = function () { return Date.now(); };
  _.times = function (n, f, ctx) { f = cb(f, ctx); var r = []; for (var i = 0; i < n; i++) r.push(f(i)); return r; };
  _.iteratee = cb;
  var idCounter = 0;
  _.uniqueId = function (prefix) { idCounter++; return (prefix == null ? '' : String(prefix)) + idCounter; };
  var escapes = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#x27;', '`': '&#x60;' };
  _.escape = function (s) { return s == null ? '' : String(s).replace(/[&<>"'`]/g, function (c) { return escapes[c]; }); };
  _.result = function (o, path, dflt) {
    var v = property(Array.isArray(path) ? path : [path])(o);
    if (v === undefined) v = dflt;
    return typeof v === 'function' ? v.call(o) : v;
  };

  // ---- wrapper and chaining: `_(doc).omit("a")`, `_.chain(xs).map(f).value()` ----
  _.chain = function (o) { var w = _(o); w._chain = true; return w; };
  _.prototype.value = _.prototype.valueOf = _.prototype.toJSON = function () { return this._wrapped; };
  _.prototype.chain = function () { return _.chain(this._wrapped); };
  _.each(_.keys(_), function (name) {
    var fn = _[name];
    if (typeof fn !== 'function' || name === 'chain') return;
    _.prototype[name] = function () {
      var args = [this._wrapped];
      Array.prototype.push.apply(args, arguments);
      var r = fn.apply(_, args);
      return this._chain ? _.chain(r) : r;
    };
  });
  _.VERSION = 'monsoon';
  return _;
})();
