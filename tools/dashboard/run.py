"""A real run of monsoon for the dashboard picture, about ten minutes of load with the events the
dashboard exists for, with Prometheus scraping every 5 s; then render.py draws the dashboard
from that Prometheus.

Nothing here is faked: SecantusDB (MongoDB) and noida-db (Elasticsearch) from the project's
.venv, the monsoon binary given, a Prometheus built from its Go module
(tools/prometheus/build.sh) and, unless --standalone, a Kubernetes control plane from the
binaries of `make k8s-bins` (cluster.py): `monsoon operator` reconciles the SyncPipelines, and
cluster.py's small kubelet runs their worker Pods as `monsoon worker` processes. With
--standalone, one `monsoon run` of the `shop` pipeline instead (no operator series).
tools/dashboard/run.sh is the entry point.

The timeline (seconds after the start; --minutes scales the fractions):
  seed   150,000 orders and 2,000 customers, 2 orders whose `quantity` is text in an index that
         maps it as a number: the snapshot dead-letters them
  0      pipeline `shop` (shop.orders) is applied: snapshot, then the change stream; inserts,
         updates and deletes at a rate swinging between ~40 and ~200 events/s
  15 %   pipeline `customers` (shop.customers) is applied, naming a Secret that does not exist
         yet: it waits, Pending (operator only)
  25 %   5 more poison documents (inserted and updated): dead letters while streaming
  30 %   the Secret is created: the `customers` worker starts, snapshots, streams updates
  40 %   Elasticsearch stops for 60 s (noida-db down; less in a run under 5 minutes), the load goes on; then it starts again
         on the same data
  65 %   the workers are killed (SIGKILL) and restarted by the kubelet: they resume from their
         checkpoints and replay what was not checkpointed (stale writes, if any, show in
         "Stale writes share")
  80 %   hot documents: for 5 % of the run, bursts of updates to orders 0-19 (writes held
         behind their own in-flight write); order 7 is one of the poison documents, so each
         of its updates is dead-lettered again, as are the random updates that hit a poison
         document
  100 %  the load stops; the workers catch up; the pipelines are deleted (the operator stops
         their workers); a last scrape
"""

import argparse
import base64
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pymongo

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cluster  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


free_port = cluster.free_port


def wait_port(port, proc, what, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout} s")


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class Procs:
    """Every process this run starts, stopped at the end whatever happens."""

    def __init__(self, work):
        self.work = work
        self.running = {}

    def start(self, name, args, env=None):
        logf = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                             start_new_session=True)
        self.running[name] = p
        return p

    def stop(self, name, sig=signal.SIGTERM, timeout=30):
        p = self.running.pop(name, None)
        if p is None or p.poll() is not None:
            return None
        p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def stop_all(self):
        # The newest first: workers and the operator before the API server and etcd.
        for name in reversed(list(self.running)):
            self.stop(name)


class Noida:
    def __init__(self, procs, venv_bin, work):
        self.procs, self.bin, self.data = procs, venv_bin / "noida-db", work / "es-data"
        self.port = free_port()

    def start(self):
        p = self.procs.start("noida", [str(self.bin), "start", "--only", "elasticsearch",
                                       "--elasticsearch-port", str(self.port), "--data-dir", str(self.data)])
        wait_port(self.port, p, "noida-db")

    def stop(self):
        # `noida-db start` is a wrapper whose native child survives a SIGTERM to it: stop it
        # the documented way, then the wrapper.
        subprocess.run([str(self.bin), "down", "--data-dir", str(self.data)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.stop("noida")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def order(i, quantity=None):
    return {
        "_id": i,
        "sku": f"SKU-{i:08}",
        "customer": f"customer-{i % 997}",
        "status": "shipped" if i % 3 == 0 else "pending",
        "total": round(i * 1.25, 2),
        "quantity": (i % 17) if quantity is None else quantity,
        "paid": i % 2 == 0,
        "address": {"street": f"{i % 1000} Long Street", "city": "Springfield", "zip": f"{i % 99999:05}"},
        "tags": ["alpha", "beta", f"t{i % 10}"],
        "note": "The quick brown fox jumps over the lazy dog again and again.",
    }


def pipeline_spec(mongodb, es, namespaces, indexes=None):
    spec = {
        "mongodb": mongodb,
        "elasticsearch": {"urls": [es]},
        "namespaces": namespaces,
        "snapshot": True,
        "batch": {"maxDocs": 1000, "flushIntervalMs": 100, "concurrency": 4},
        "onHistoryLost": "Fail",
        "onDrop": "DeleteIndex",
        "deadLetter": {"index": "monsoon-deadletter"},
    }
    if indexes:
        spec["indexes"] = indexes
    return spec


class Standalone:
    """`monsoon run` of the `shop` pipeline (no operator)."""

    def __init__(self, args, procs, work, mongo_uri, es_url):
        self.procs, self.work = procs, work
        self.port = free_port()
        state = work / "state"
        state.mkdir()
        doc = {"apiVersion": "monsoon.dev/v1alpha1", "kind": "SyncPipeline", "metadata": {"name": "shop"},
               "spec": pipeline_spec({"uri": mongo_uri}, es_url, ["shop.orders"])}
        (state / "pipeline.yaml").write_text(json.dumps(doc, indent=2))  # JSON is YAML
        self.args = [args.monsoon, "run", "-f", str(state / "pipeline.yaml"), "--state-dir", str(state),
                     "--http-addr", f"127.0.0.1:{self.port}"]
        (work / "workers.json").write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{self.port}"], "labels": {"namespace": "shop", "pod": "shop-0"}}]))

    operator_target = None

    def start(self):
        self.procs.start("monsoon", self.args, env=dict(os.environ, RUST_LOG="info"))
        self.exited = None

    def sync(self):
        # Restarted 10 s after it exits, as a supervisor would (systemd's Restart=on-failure):
        # `monsoon run` exits when Elasticsearch cannot be reached at its start.
        p = self.procs.running.get("monsoon")
        if p is not None and p.poll() is not None:
            if self.exited is None:
                self.exited = time.time()
                log(f"monsoon exited with {p.returncode}; restarting in 10 s")
            elif time.time() - self.exited >= 10:
                self.start()

    def add_customers(self):
        pass

    def create_customers_secret(self):
        pass

    def stats_ports(self):
        return [self.port]

    def kill(self):
        self.procs.stop("monsoon", sig=signal.SIGKILL)
        self.start()

    def finish(self):
        return self.procs.stop("monsoon")


class Operator:
    """`monsoon operator` against a real control plane; worker Pods run by cluster.Kubelet."""

    def __init__(self, args, procs, work, mongo_uri, es_url):
        self.args, self.procs, self.work = args, procs, work
        self.mongo_uri, self.es_url = mongo_uri, es_url
        bins = cluster.bin_dir(ROOT)
        log(f"starting the control plane (etcd, kube-apiserver, kube-controller-manager from {bins})")
        self.cp = cluster.ControlPlane(procs, bins, work)
        self.cp.start()
        kube = self.kube = self.cp.admin
        kube.apply("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/syncpipelines.monsoon.dev",
                   (ROOT / "crds/syncpipeline.yaml").read_bytes())
        self.cp.wait(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in kube.request(
            "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/syncpipelines.monsoon.dev")
            ["status"].get("conditions", [])), "the SyncPipeline CRD")
        for ns in ("monsoon-system", "shop"):
            kube.apply(f"/api/v1/namespaces/{ns}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.cp.wait(lambda: kube.request("GET", "/api/v1/namespaces/shop/serviceaccounts/default", ok404=True),
                     "the shop namespace's default ServiceAccount")
        kube.apply("/api/v1/namespaces/shop/secrets/mongodb", self.secret("mongodb"))
        self.port = free_port()
        self.operator_target = f"127.0.0.1:{self.port}"
        self.kubelet = cluster.Kubelet(self.cp, procs, args.monsoon, "shop", work / "workers.json")

    def secret(self, name):
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                "data": {"uri": base64.b64encode(self.mongo_uri.encode()).decode()}}

    def pipeline(self, name, namespaces, secret, indexes=None):
        obj = {"apiVersion": "monsoon.dev/v1alpha1", "kind": "SyncPipeline", "metadata": {"name": name},
               "spec": pipeline_spec({"uriFrom": {"secretKeyRef": {"name": secret, "key": "uri"}}}, self.es_url,
                                     namespaces, indexes)}
        self.kube.apply(f"/apis/monsoon.dev/v1alpha1/namespaces/shop/syncpipelines/{name}", obj)

    def start(self):
        # The chart's Deployment arguments (charts/monsoon/templates), as a local process with
        # the admin's kubeconfig.
        self.procs.start("operator", [
            self.args.monsoon, "operator", f"--http-addr=127.0.0.1:{self.port}",
            "--worker-image=ghcr.io/monsoon-dev/monsoon:0.1.0", "--leader-election-lease-name=monsoon"],
            env=dict(os.environ, RUST_LOG="info", KUBECONFIG=str(self.cp.admin_kubeconfig),
                     POD_NAME="monsoon-0", POD_NAMESPACE="monsoon-system"))
        self.pipeline("shop", ["shop.orders"], "mongodb")

    def sync(self):
        p = self.procs.running.get("operator")
        if p is None or p.poll() is not None:
            raise SystemExit(f"the operator exited: see {self.work / 'operator.log'}")
        try:
            self.kubelet.sync()
        except RuntimeError as e:  # an API call failed: try again at the next sync
            log(f"kubelet: {e}")

    def add_customers(self):
        self.pipeline("customers", ["shop.customers"], "customers-mongodb", {"shop.customers": "customers"})

    def create_customers_secret(self):
        self.kube.apply("/api/v1/namespaces/shop/secrets/customers-mongodb", self.secret("customers-mongodb"))

    def stats_ports(self):
        return [port for _, _, port in self.kubelet.workers.values()]

    def kill(self):
        self.kubelet.kill()
        self.kubelet.sync()

    def finish(self):
        for name in ("shop", "customers"):
            self.kube.request("DELETE", f"/apis/monsoon.dev/v1alpha1/namespaces/shop/syncpipelines/{name}", ok404=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            self.kubelet.sync()
            left = self.kube.request("GET", "/apis/monsoon.dev/v1alpha1/namespaces/shop/syncpipelines")["items"]
            if not left and not self.kubelet.workers:
                break
            time.sleep(1)
        log(f"pipelines deleted; workers left: {len(self.kubelet.workers)}")
        self.kubelet.stop()
        time.sleep(10)  # the operator's pipelines-by-phase gauge drops to zero
        return self.procs.stop("operator")


PROMETHEUS = """global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  # The workers, with the labels a PodMonitor gives a worker pod's series (namespace, pod);
  # the dashboard selects by namespace and pipeline. The file is kept by the run.
  - job_name: monsoon-workers
    file_sd_configs:
      - files: ["{work}/workers.json"]
        refresh_interval: 5s
"""

OPERATOR_JOB = """  # The operator, as its ServiceMonitor would scrape it.
  - job_name: monsoon-operator
    static_configs:
      - targets: ["{target}"]
        labels: {{namespace: monsoon-system, pod: monsoon-0}}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--monsoon", help="the monsoon binary")
    ap.add_argument("--prometheus", required=True, help="the prometheus binary")
    ap.add_argument("--venv", default=str(ROOT / ".venv"), help="the project's venv with the stand-ins")
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the streaming load")
    ap.add_argument("--standalone", action="store_true", help="`monsoon run` instead of the operator")
    ap.add_argument("--out", default=str(ROOT / "docs/dashboard.png"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, TSDB)")
    ap.add_argument("--rerender", metavar="DIR", help="draw again from the TSDB of a run kept with --keep")
    args = ap.parse_args()
    if args.rerender:
        return rerender(args, Path(args.rerender))
    if not args.monsoon:
        ap.error("--monsoon is needed")

    venv_bin = Path(args.venv) / "bin"
    for b in ("secantusd-py", "noida-db"):
        if not (venv_bin / b).exists():
            raise SystemExit(f"{venv_bin / b} is missing: run `make venv`")
    work = Path(tempfile.mkdtemp(prefix="monsoon-dashboard-"))
    log(f"work directory {work}")
    procs = Procs(work)
    try:
        run(args, venv_bin, work, procs)
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def render(prom, work, out):
    window = json.loads((work / "window.json").read_text())
    log(f"rendering {out}")
    subprocess.run([sys.executable, str(HERE / "render.py"), "--prometheus", prom,
                    "--start", str(window["start"]), "--end", str(window["end"]),
                    "--events", str(work / "events.json"), "--note", window["note"], "--out", out], check=True)


def start_prometheus(args, procs, work):
    port = free_port()
    p = procs.start("prometheus", [args.prometheus, f"--config.file={work / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={work / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"])
    wait_port(port, p, "prometheus")
    return f"http://127.0.0.1:{port}"


def rerender(args, work):
    procs = Procs(work)
    try:
        render(start_prometheus(args, procs, work), work, args.out)
    finally:
        procs.stop_all()


def run(args, venv_bin, work, procs):
    total = args.minutes * 60
    # --- stand-ins
    mongo_port = free_port()
    p = procs.start("secantusd", [str(venv_bin / "secantusd-py"), "--port", str(mongo_port),
                                  "--storage-path", str(work / "mongo-data"),
                                  "--noop-heartbeat-seconds", "1", "--oplog-max-entries", "1000000"])
    wait_port(mongo_port, p, "secantusd-py")
    es = Noida(procs, venv_bin, work)
    es.start()
    mongo_uri = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
    log(f"MongoDB (SecantusDB) {mongo_uri}, Elasticsearch (noida-db) {es.url}")

    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=30000)
    orders = client.shop.orders
    customers = client.shop.customers
    # The index maps `quantity` as a number, so documents where it is text are refused (400).
    http("PUT", f"{es.url}/shop.orders", {"settings": {"number_of_replicas": 0},
                                          "mappings": {"properties": {"quantity": {"type": "long"}}}})
    seed = 150_000
    log(f"seeding {seed} orders and 2,000 customers")
    for start in range(0, seed, 1000):
        docs = [order(i) for i in range(start, start + 1000)]
        if start == 0:
            docs[7] = order(7, quantity="lots")
            docs[42] = order(42, quantity="a few")
        orders.insert_many(docs)
    customers.insert_many([{"_id": f"c{i}", "name": f"Customer {i}", "vip": i % 10 == 0, "visits": 0}
                           for i in range(2000)])

    mode = (Standalone if args.standalone else Operator)(args, procs, work, mongo_uri, es.url)
    config = PROMETHEUS.format(work=work)
    if mode.operator_target:
        config += OPERATOR_JOB.format(target=mode.operator_target)
    (work / "prometheus.yml").write_text(config)
    # Prometheus first, so its first scrapes see the snapshot.
    prom = start_prometheus(args, procs, work)
    log(f"Prometheus {prom}, scraping every 5 s")

    def stats():
        out = []
        for port in mode.stats_ports():
            try:
                out.append(http("GET", f"http://127.0.0.1:{port}/stats", timeout=3))
            except Exception:
                pass
        return out

    time.sleep(12)  # a few empty scrapes before the start: the panels begin at zero
    t0 = time.time()
    marks = []  # the run's events, drawn as annotations

    def mark(text):
        marks.append({"time": time.time(), "text": text})
        log(text)

    mode.start()
    mark("shop applied" if not args.standalone else "monsoon run starts")
    while True:
        mode.sync()
        s = stats()
        if s and all(x.get("phase") == "Streaming" for x in s):
            break
        if time.time() - t0 > 600:
            raise SystemExit("the snapshot did not end within 10 minutes")
        time.sleep(1)
    log(f"snapshot done in {time.time() - t0:.0f} s: {json.dumps(s)}")

    rng = random.Random(17)
    next_id = seed
    live = list(range(seed))
    at = {"customers": 0.15, "poison": 0.25, "secret": 0.30, "outage": 0.40, "kill": 0.65, "hot": 0.80}
    done = set()
    load_start = time.time()
    last_report = last_sync = 0.0
    outage_end = None
    while (elapsed := time.time() - load_start) < total:
        frac = elapsed / total
        if time.time() - last_sync >= 1:
            last_sync = time.time()
            mode.sync()
        if frac >= at["customers"] and "customers" not in done and not args.standalone:
            done.add("customers")
            mode.add_customers()
            mark("customers applied (no Secret)")
        if frac >= at["poison"] and "poison" not in done:
            done.add("poison")
            orders.insert_many([order(next_id + k, quantity=q) for k, q in enumerate(["many", "n/a", "12 boxes"])])
            live.extend(range(next_id, next_id + 3))
            next_id += 3
            orders.update_many({"_id": {"$in": [100, 200]}}, {"$set": {"quantity": "unknown"}})
            mark("poison docs")
        if frac >= at["secret"] and "secret" not in done and not args.standalone:
            done.add("secret")
            mode.create_customers_secret()
            mark("Secret created")
        if frac >= at["outage"] and "outage" not in done:
            done.add("outage")
            es.stop()
            mark("ES down")
            outage_end = time.time() + min(60, total * 0.2)
        if outage_end and time.time() >= outage_end:
            outage_end = None
            es.start()
            mark("ES up")
        if frac >= at["kill"] and "kill" not in done:
            done.add("kill")
            mode.kill()
            mark("kill -9")
        hot = at["hot"] <= frac < at["hot"] + 0.05
        if hot and "hot" not in done:
            done.add("hot")
            mark("hot docs")

        # Rate in events/s: a slow swing between ~40 and ~200, with a little noise.
        rate = 120 + 80 * math.sin(2 * math.pi * elapsed / 240) + rng.uniform(-15, 15)
        n = max(1, int(rate / 2))  # a batch every 0.5 s
        ops = []
        for _ in range(n):
            r = rng.random()
            if r < 0.45:
                ops.append(pymongo.InsertOne(order(next_id)))
                live.append(next_id)
                next_id += 1
            elif r < 0.90 or len(live) < 100:
                i = rng.randrange(20) if hot else rng.choice(live)
                ops.append(pymongo.UpdateOne({"_id": i}, {"$set": {
                    "status": rng.choice(["paid", "shipped", "delivered", "returned"]), "updatedAt": time.time()}}))
            else:
                k = rng.randrange(len(live))
                live[k], live[-1] = live[-1], live[k]
                ops.append(pymongo.DeleteOne({"_id": live.pop()}))
        tick = time.time()
        orders.bulk_write(ops, ordered=False)
        customers.bulk_write([pymongo.UpdateOne({"_id": f"c{rng.randrange(2000)}"}, {"$inc": {"visits": 1}})
                              for _ in range(max(1, n // 6))], ordered=False)
        if hot:
            for _ in range(5):
                orders.update_many({"_id": {"$lt": 20}}, {"$inc": {"views": 1}})
        if time.time() - last_report > 30:
            last_report = time.time()
            summary = [{k: v for k, v in x.items() if not isinstance(v, (dict, list))} for x in stats()]
            log(f"{elapsed:5.0f} s: ~{n * 2} order events/s; workers: {summary}")
        time.sleep(max(0.0, 0.5 - (time.time() - tick)))

    if outage_end:
        es.start()
        mark("ES up")
    mark("load stops")
    deadline = time.time() + 120
    while time.time() < deadline:
        mode.sync()
        s = stats()
        if s and all(x.get("inFlight") == 0 for x in s) and time.time() - load_start - total > 15:
            break
        time.sleep(2)
    time.sleep(30)  # a few idle scrapes: the panels end at rest
    if not args.standalone:
        mark("pipelines deleted")
    code = mode.finish()
    log(f"finished (exit {code})")
    time.sleep(6)
    end = time.time()
    note = ("worker and operator series from `monsoon operator` against a real kube-apiserver, its worker pods run as "
            "`monsoon worker` processes by tools/dashboard/cluster.py" if not args.standalone else
            "worker series from `monsoon run` (--standalone: no operator, so its panels have no data)")
    window = {"start": t0 - 10, "end": end, "note": note}
    (work / "window.json").write_text(json.dumps(window))
    (work / "events.json").write_text(json.dumps(marks))
    render(prom, work, args.out)
    procs.stop("prometheus")
    es.stop()
    procs.stop("secantusd")
    if args.keep:
        log(f"kept {work}; draw again with --rerender {work}")


if __name__ == "__main__":
    main()
