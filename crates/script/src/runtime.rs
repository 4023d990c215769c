//! One JavaScript runtime: a QuickJS runtime and context holding `_`, the driver and every
//! compiled script. Each worker thread of the pool owns one (QuickJS runtimes are single
//! threaded); nothing here is shared between threads except the configuration and the
//! [`Lookup`].
//!
//! Every call runs under a deadline (QuickJS's interrupt handler, checked as the bytecode runs)
//! and the runtime's memory limit. After a failure the runtime stays usable: an interrupted or
//! thrown call unwinds like any exception. After running out of memory the runtime is rebuilt
//! from the sources, because whatever filled the heap may still be reachable from a closure;
//! that resets the closures' state on that worker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::convert::List;
use rquickjs::{Context, Ctx, Function, Object, Persistent, Value};

use crate::config::script_name;
use crate::json_out;
use crate::lookup::{parse_request, Lookup};
use crate::meta::Meta;
use crate::{Config, MapOutcome, ScriptError};

const UNDERSCORE_JS: &str = include_str!("js/underscore.js");
const DRIVER_JS: &str = include_str!("js/driver.js");

/// The deadline of the call in progress, read by the interrupt handler.
#[derive(Default)]
struct Guard {
    deadline: Cell<Option<Instant>>,
    fired: Cell<bool>,
}

/// What the native lookup function needs to know about the call in progress.
#[derive(Default)]
struct CallState {
    namespace: RefCell<String>,
    deadline: Cell<Option<Instant>>,
    lookup_error: RefCell<Option<String>>,
}

/// The result of one call into the driver, before it becomes a public outcome.
enum Raw {
    Drop,
    Keep,
    Replace(String, Option<String>),
    Bad(String),
    Input(String),
}

/// The driver's entry points, kept across calls (looking them up by name costs atom hashing).
struct Entry {
    map: Persistent<Function<'static>>,
    filter: Persistent<Function<'static>>,
    pipeline: Persistent<Function<'static>>,
}

#[derive(Clone, Copy)]
enum Which {
    Map,
    Filter,
    Pipeline,
}

pub(crate) struct JsRuntime {
    // Field order matters: values held from the context go first, then the context, then the
    // runtime.
    entry: Entry,
    ctx: Context,
    rt: rquickjs::Runtime,
    guard: Rc<Guard>,
    call: Rc<CallState>,
    config: Arc<Config>,
    lookup: Arc<dyn Lookup>,
}

impl JsRuntime {
    /// Builds a runtime and compiles every script of `config` into it.
    pub(crate) fn new(config: Arc<Config>, lookup: Arc<dyn Lookup>) -> Result<JsRuntime, ScriptError> {
        let internal = |e: rquickjs::Error| ScriptError::Internal(format!("failed to set up the JavaScript runtime: {e}"));
        let rt = rquickjs::Runtime::new().map_err(internal)?;
        rt.set_memory_limit(config.limits.memory_limit);
        rt.set_max_stack_size(config.limits.max_stack_size);
        let guard = Rc::new(Guard::default());
        let g = Rc::clone(&guard);
        rt.set_interrupt_handler(Some(Box::new(move || match g.deadline.get() {
            Some(d) if Instant::now() >= d => {
                g.fired.set(true);
                true
            }
            _ => false,
        })));
        let ctx = Context::full(&rt).map_err(internal)?;
        let call = Rc::new(CallState::default());
        load(&ctx, &call, &lookup, config.limits.timeout)?;
        let entry = ctx.with(|ctx| {
            let get = |name| get_driver_fn(&ctx, name).map(|f| Persistent::save(&ctx, f));
            Ok::<_, ScriptError>(Entry { map: get("map")?, filter: get("filter")?, pipeline: get("pipeline")? })
        })?;
        let runtime = JsRuntime { entry, ctx, rt, guard, call, config, lookup };
        runtime.compile_all()?;
        Ok(runtime)
    }

    /// Compiles every script of the configuration.
    fn compile_all(&self) -> Result<(), ScriptError> {
        for (kind, list) in [("script", &self.config.scripts), ("filter", &self.config.filters), ("pipeline", &self.config.pipelines)] {
            for source in list {
                let name = script_name(kind, source);
                self.compile(kind, source.namespace.as_deref().unwrap_or(""), &name, &source.source)?;
            }
        }
        Ok(())
    }

    fn compile(&self, kind: &str, ns: &str, name: &str, source: &str) -> Result<(), ScriptError> {
        // The wrapper stays on the source's first line so that line numbers in errors match
        // the user's file; each script gets its own `module` and its own scope.
        let wrapped = format!("(function (module, exports) {{{source}\n;return module.exports;}})");
        self.begin(ns);
        let result = self.ctx.with(|ctx| {
            let factory: Value = eval(&ctx, &wrapped, name).map_err(|e| self.failure(&ctx, name, e))?;
            let register: Function = get_driver_fn(&ctx, "register")?;
            register.call::<_, ()>((kind, ns, name, factory)).map_err(|e| self.failure(&ctx, name, e))
        });
        self.end();
        result.map_err(|e| match e {
            ScriptError::Threw { message, stack, .. } => ScriptError::Compile {
                script: name.to_owned(),
                message: match stack.filter(|s| !s.trim().is_empty()) {
                    Some(s) => format!("{message} (at {})", s.lines().next().unwrap_or_default().trim()),
                    None => message,
                },
            },
            ScriptError::Timeout { timeout, .. } => ScriptError::Compile {
                script: name.to_owned(),
                message: format!("loading took longer than {timeout:?}"),
            },
            other => other,
        })
    }

    fn begin(&self, ns: &str) {
        let deadline = Instant::now() + self.config.limits.timeout;
        self.guard.fired.set(false);
        self.guard.deadline.set(Some(deadline));
        self.call.deadline.set(Some(deadline));
        self.call.lookup_error.replace(None);
        let mut current = self.call.namespace.borrow_mut();
        current.clear();
        current.push_str(ns);
    }

    fn end(&self) {
        self.guard.deadline.set(None);
        self.call.deadline.set(None);
    }

    /// Runs the `[[script]]`s for `ns` on one document.
    pub(crate) fn map(&mut self, ns: &str, doc: &str, update_desc: Option<&str>) -> Result<MapOutcome, ScriptError> {
        let raw = self.run(Which::Map, ns, |f| f.call((ns, doc, update_desc)))?;
        match raw {
            Raw::Drop => Ok(MapOutcome::Drop),
            Raw::Keep => Ok(MapOutcome::Keep),
            Raw::Replace(doc, meta) => {
                let meta = match meta {
                    Some(text) => Meta::from_json(&text).map_err(|reason| ScriptError::Meta { script: self.script_name(), reason })?,
                    None => Meta::default(),
                };
                Ok(MapOutcome::Replace { doc, meta })
            }
            Raw::Bad(got) => Err(ScriptError::BadReturn {
                script: self.script_name(),
                got,
                expected: "expected a document object, true (index the original) or false/null/undefined (drop it)",
            }),
            Raw::Input(message) => Err(ScriptError::Input { script: self.script_name(), message }),
        }
    }

    /// Runs the `[[filter]]`s for `ns` on one document.
    pub(crate) fn filter(&mut self, ns: &str, doc: &str, update_desc: Option<&str>) -> Result<bool, ScriptError> {
        let raw = self.run(Which::Filter, ns, |f| f.call((ns, doc, update_desc)))?;
        match raw {
            Raw::Drop => Ok(false),
            Raw::Keep => Ok(true),
            Raw::Input(message) => Err(ScriptError::Input { script: self.script_name(), message }),
            Raw::Replace(..) | Raw::Bad(_) => Err(ScriptError::Internal(format!("{}: unexpected filter result", self.script_name()))),
        }
    }

    /// Runs the `[[pipeline]]`s for `ns`: the global one's stages, then the namespace's.
    pub(crate) fn pipeline(&mut self, ns: &str, change_stream: bool) -> Result<Vec<serde_json::Value>, ScriptError> {
        let raw = self.run(Which::Pipeline, ns, |f| f.call((ns, change_stream)))?;
        match raw {
            Raw::Replace(stages, _) => serde_json::from_str(&stages)
                .map_err(|e| ScriptError::Internal(format!("{}: failed to read the stages back: {e}", self.script_name()))),
            Raw::Bad(got) => Err(ScriptError::BadReturn {
                script: self.script_name(),
                got,
                expected: "expected an array of aggregation stage objects",
            }),
            Raw::Drop | Raw::Keep | Raw::Input(_) => Err(ScriptError::Internal(format!("{}: unexpected pipeline result", self.script_name()))),
        }
    }

    /// Calls driver function `which` under the call's limits and decodes its `[code, a, b]`.
    fn run<'a>(
        &mut self,
        which: Which,
        ns: &str,
        invoke: impl for<'js> FnOnce(Function<'js>) -> rquickjs::Result<Value<'js>> + 'a,
    ) -> Result<Raw, ScriptError> {
        self.begin(ns);
        let result = self.ctx.with(|ctx| {
            let entry = match which {
                Which::Map => &self.entry.map,
                Which::Filter => &self.entry.filter,
                Which::Pipeline => &self.entry.pipeline,
            };
            let f = entry.clone().restore(&ctx).map_err(|e| ScriptError::Internal(format!("the driver is gone: {e}")))?;
            match invoke(f).and_then(|v| decode(&ctx, &v)) {
                Ok(raw) => Ok(raw),
                Err(e) => Err(self.failure(&ctx, &current_script(&ctx), e)),
            }
        });
        self.end();
        if let Err(ScriptError::OutOfMemory { .. }) = &result {
            self.rebuild()?;
        }
        result
    }

    /// The script that ran last (the driver keeps its name until the next call): read only
    /// when a problem is reported.
    fn script_name(&self) -> String {
        self.ctx.with(|ctx| current_script(&ctx))
    }

    /// Classifies a failed call: deadline, memory, lookup, or a plain exception.
    fn failure(&self, ctx: &Ctx<'_>, script: &str, e: rquickjs::Error) -> ScriptError {
        let script = script.to_owned();
        let (message, stack) = exception_text(ctx, e);
        if self.guard.fired.get() {
            return ScriptError::Timeout { script, timeout: self.config.limits.timeout };
        }
        if message.contains("out of memory") {
            return ScriptError::OutOfMemory { script, limit: self.config.limits.memory_limit };
        }
        if let Some(lookup) = self.call.lookup_error.borrow_mut().take() {
            if message.contains(&lookup) {
                return ScriptError::Lookup { script, message: lookup };
            }
        }
        ScriptError::Threw { script, message, stack }
    }

    /// A new runtime compiled from the same sources (closures start afresh).
    pub(crate) fn fresh(&self) -> Result<JsRuntime, ScriptError> {
        JsRuntime::new(Arc::clone(&self.config), Arc::clone(&self.lookup))
    }

    /// Replaces this runtime with a fresh one.
    fn rebuild(&mut self) -> Result<(), ScriptError> {
        *self = self.fresh()?;
        Ok(())
    }

    /// Bytes the runtime's heap holds now (for tests and diagnostics).
    #[allow(dead_code)]
    pub(crate) fn heap_bytes(&self) -> i64 {
        self.rt.memory_usage().malloc_size
    }
}

/// Loads the native lookup, `_` and the driver into a fresh context.
fn load(ctx: &Context, call: &Rc<CallState>, lookup: &Arc<dyn Lookup>, timeout: Duration) -> Result<(), ScriptError> {
    ctx.with(|ctx| {
        let call = Rc::clone(call);
        let lookup = Arc::clone(lookup);
        let native = Function::new(ctx.clone(), move |kind: String, query: String, options: Option<String>| {
            List(native_lookup(&call, lookup.as_ref(), &kind, &query, options.as_deref(), timeout))
        })
        .map_err(|e| ScriptError::Internal(format!("failed to define the lookup functions: {e}")))?;
        ctx.globals()
            .set("__monsoon_lookup", native)
            .map_err(|e| ScriptError::Internal(format!("failed to define the lookup functions: {e}")))?;
        for (name, src) in [("underscore.js", UNDERSCORE_JS), ("driver.js", DRIVER_JS)] {
            eval(&ctx, src, name).map_err(|e| ScriptError::Internal(format!("failed to load {name}: {}", exception_text(&ctx, e).0)))?;
        }
        Ok(())
    })
}

fn eval<'js>(ctx: &Ctx<'js>, source: &str, filename: &str) -> rquickjs::Result<Value<'js>> {
    let mut options = EvalOptions::default();
    // Monstache's scripts are sloppy-mode ES5 (otto); our own files opt into strict mode.
    options.strict = false;
    options.filename = Some(filename.to_owned());
    ctx.eval_with_options(source, options)
}

fn get_driver_fn<'js>(ctx: &Ctx<'js>, name: &str) -> Result<Function<'js>, ScriptError> {
    let driver: Object = ctx
        .globals()
        .get("__monsoon")
        .map_err(|e| ScriptError::Internal(format!("the driver is missing: {e}")))?;
    driver.get(name).map_err(|e| ScriptError::Internal(format!("the driver has no {name}: {e}")))
}

fn current_script(ctx: &Ctx<'_>) -> String {
    let name = || -> rquickjs::Result<String> {
        let driver: Object = ctx.globals().get("__monsoon")?;
        let state: Object = driver.get("state")?;
        state.get("script")
    };
    name().unwrap_or_else(|_| "script".to_owned())
}

/// Decodes the driver's `[code, a, b]`. For a replaced document `a` is the document itself,
/// written as JSON here ([`json_out`]), or by `JSON.stringify` when it holds unusual values.
fn decode<'js>(ctx: &Ctx<'js>, v: &Value<'js>) -> Result<Raw, rquickjs::Error> {
    let arr = v.as_array().ok_or_else(|| rquickjs::Error::new_from_js("value", "array"))?;
    let code: i32 = arr.get(0)?;
    let a: Value = arr.get(1)?;
    let text = |a: Value<'js>| -> Result<String, rquickjs::Error> {
        if let Some(s) = a.as_string() {
            return s.to_string();
        }
        let mut out = String::with_capacity(1024);
        if json_out::write_document(&mut out, &a).is_ok() {
            return Ok(out);
        }
        match ctx.json_stringify(a)? {
            Some(s) => s.to_string(),
            None => Ok("null".to_owned()),
        }
    };
    Ok(match code {
        0 => Raw::Drop,
        1 => Raw::Keep,
        2 => Raw::Replace(text(a)?, arr.get::<Option<String>>(2)?),
        3 => Raw::Bad(text(a)?),
        4 => Raw::Input(text(a)?),
        code => return Err(rquickjs::Error::new_from_js_message("value", "result", format!("the driver returned code {code}"))),
    })
}

/// The message and stack of the pending exception (or of a non-exception error).
fn exception_text(ctx: &Ctx<'_>, e: rquickjs::Error) -> (String, Option<String>) {
    if !matches!(e, rquickjs::Error::Exception) {
        return (e.to_string(), None);
    }
    let value = ctx.catch();
    if let Some(exc) = value.as_exception() {
        let message = exc.message().unwrap_or_default();
        let name: Option<String> = exc.get("name").ok();
        let message = match name {
            Some(n) if !n.is_empty() && !message.starts_with(&n) => format!("{n}: {message}"),
            _ => message,
        };
        return (message, exc.stack());
    }
    // `throw "text"`, `throw {code: 1}`: show the value itself.
    let shown = ctx
        .json_stringify(value.clone())
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
        .unwrap_or_else(|| format!("{value:?}"));
    (format!("uncaught {shown}"), None)
}

fn native_lookup(
    call: &CallState,
    lookup: &dyn Lookup,
    kind: &str,
    query: &str,
    options: Option<&str>,
    timeout: Duration,
) -> (bool, Option<String>) {
    let deadline = call.deadline.get().unwrap_or_else(|| Instant::now() + timeout);
    let ns = call.namespace.borrow().clone();
    let fail = |message: String| {
        call.lookup_error.replace(Some(message.clone()));
        (false, Some(message))
    };
    let request = match parse_request(kind, &ns, query, options, deadline) {
        Ok(r) => r,
        // A bad argument is the script's own mistake: a plain error, not a retriable one.
        Err(message) => return (false, Some(message)),
    };
    match lookup.lookup(&request) {
        Ok(mut docs) => {
            let value = if request.kind.is_single() {
                if docs.is_empty() {
                    return (true, None);
                }
                docs.swap_remove(0)
            } else {
                serde_json::Value::Array(docs)
            };
            match serde_json::to_string(&value) {
                Ok(text) => (true, Some(text)),
                Err(e) => fail(format!("the result is not JSON: {e}")),
            }
        }
        // The query's own fault: a plain error, as a bad argument is.
        Err(e) if e.is::<crate::lookup::QueryError>() => (false, Some(e.to_string())),
        Err(e) => fail(e.to_string()),
    }
}
