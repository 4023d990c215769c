"""A real Kubernetes control plane for the dashboard run, and a small kubelet that runs worker
pods as local `monsoon worker` processes, so the run goes through `monsoon operator` as in a
cluster: the operator turns a SyncPipeline into a StatefulSet, the controller manager makes its
Pod, the kubelet here runs the Pod's container arguments and environment, and the worker reports
through its checkpoint ConfigMap, from which the operator writes the pipeline's status.

The control plane is the one `crates/testkit/src/control_plane.rs` starts for the tests (the same
binaries from `make k8s-bins`, the same flags: own CA, RBAC, service-account signing, a
controller manager, no scheduler), written again here in Python because this tool is Python.
The kubelet is smaller than the tests' (`crates/monsoon/tests/operator_process.rs`): it binds no
Node and reports no Pod status (the operator reads the workers' reports from their ConfigMaps,
not from Pod status), and mounts nothing; each worker gets a token minted for its Pod's
ServiceAccount, so it has exactly the Role the operator made.
"""

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(d, *args):
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def bin_dir(root):
    """The directory tools/k8s/build.sh fills, found the way the tests find it."""
    if os.environ.get("MONSOON_K8S_BIN_DIR"):
        return Path(os.environ["MONSOON_K8S_BIN_DIR"])
    out = subprocess.run([str(root / "tools/k8s/build.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class Kube:
    """The API server's REST API with a client certificate or a token."""

    def __init__(self, server, ca, cert=None, key=None, token=None):
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(ca))
        if cert:
            self.ctx.load_cert_chain(str(cert), str(key))
        self.token = token

    def request(self, method, path, body=None, content_type="application/json", ok404=False):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"content-type": content_type, "accept": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                text = r.read()
                return json.loads(text) if text.strip().startswith(b"{") else text.decode()
        except urllib.error.HTTPError as e:
            if ok404 and e.code == 404:
                return None
            raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')[:500]}") from None

    def apply(self, path, obj, manager="monsoon-dashboard"):
        """Server-side apply of `obj` (a dict, or YAML bytes) at its object path."""
        return self.request("PATCH", f"{path}?fieldManager={manager}&force=true", obj,
                            content_type="application/apply-patch+yaml")


def kubeconfig(file, server, ca, user, credentials):
    file.write_text(
        f"apiVersion: v1\nkind: Config\nclusters:\n- name: monsoon-dashboard\n  cluster:\n    server: {server}\n"
        f"    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n{credentials}contexts:\n- name: {user}\n"
        f"  context:\n    cluster: monsoon-dashboard\n    user: {user}\ncurrent-context: {user}\n")


class ControlPlane:
    def __init__(self, procs, bins, work):
        self.procs, self.bins = procs, bins
        self.dir = work / "k8s"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"

    def path(self, name):
        return str(self.dir / name)

    def start(self):
        d = self.dir
        openssl(d, "req", "-x509", "-days", "2", "-subj", "/CN=monsoon dashboard cluster CA", "-keyout", "ca.key",
                "-out", "ca.pem", *EC_KEY)

        def issue(name, subject, ext):
            (d / f"{name}.ext").write_text(ext)
            openssl(d, "req", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", *EC_KEY)
            openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")

        issue("apiserver", "/CN=kube-apiserver",
              f"subjectAltName=IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,"
              "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
              "extendedKeyUsage=serverAuth\n")
        issue("admin", "/O=system:masters/CN=monsoon-dashboard-admin", "extendedKeyUsage=clientAuth\n")
        issue("controller-manager", "/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth\n")
        openssl(d, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
        openssl(d, "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        self.ca = d / "ca.pem"
        for user in ("admin", "controller-manager"):
            kubeconfig(d / f"{user}.kubeconfig", self.server, self.ca, user,
                       f"    client-certificate: {d / (user + '.pem')}\n    client-key: {d / (user + '.key')}\n")
        self.admin_kubeconfig = d / "admin.kubeconfig"
        self.admin = Kube(self.server, self.ca, d / "admin.pem", d / "admin.key")

        etcd_port, peer_port = free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        self.procs.start("etcd", [str(self.bins / "etcd"), "--name=monsoon-dashboard", f"--data-dir={self.path('etcd')}",
                                  f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                                  f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                                  f"--initial-cluster=monsoon-dashboard={peer_url}", "--unsafe-no-fsync=true",
                                  "--log-level=warn"])
        self.procs.start("kube-apiserver", [
            str(self.bins / "kube-apiserver"), f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none", f"--secure-port={self.port}",
            f"--cert-dir={self.path('apiserver-certs')}", f"--tls-cert-file={self.path('apiserver.pem')}",
            f"--tls-private-key-file={self.path('apiserver.key')}", f"--client-ca-file={self.ca}",
            "--authorization-mode=RBAC", f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self.path('sa.pub')}",
            f"--service-account-signing-key-file={self.path('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true", "--profiling=false", "--v=1"])
        self.wait(lambda: self.admin.request("GET", "/readyz") == "ok", "kube-apiserver /readyz")
        self.procs.start("kube-controller-manager", [
            str(self.bins / "kube-controller-manager"), f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--cert-dir={self.path('controller-manager-certs')}", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.path('sa.key')}", f"--root-ca-file={self.ca}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--leader-elect=false", "--profiling=false", "--v=1"])
        self.wait(lambda: self.admin.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", ok404=True),
                  "the controller manager (the default ServiceAccount)")

    def wait(self, check, what, timeout=180):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            for name in ("etcd", "kube-apiserver", "kube-controller-manager"):
                p = self.procs.running.get(name)
                if p is not None and p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}: see {self.procs.work / (name + '.log')}")
            try:
                if check():
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.3)
        raise SystemExit(f"{what} not ready within {timeout} s: {last}")

    def token_kubeconfig(self, ns, account):
        """A kubeconfig with a token minted for ServiceAccount `ns/account` (TokenRequest)."""
        tr = self.admin.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{account}/token",
                                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                 "spec": {"expirationSeconds": 7200}})
        file = self.dir / f"sa-{ns}-{account}.kubeconfig"
        kubeconfig(file, self.server, self.ca, account, f"    token: {tr['status']['token']}\n")
        return file


class Kubelet:
    """Runs each worker Pod of `namespace` as a `monsoon worker` process (restarted when it
    exits, as restartPolicy Always does; stopped with SIGTERM when its Pod goes), and keeps a
    Prometheus file_sd file naming each running worker's metrics port with the labels a
    PodMonitor gives (namespace, pod)."""

    SELECTOR = "app.kubernetes.io/name=monsoon-worker"

    def __init__(self, cp, procs, monsoon, namespace, sd_file):
        self.cp, self.procs, self.monsoon, self.ns, self.sd_file = cp, procs, monsoon, namespace, sd_file
        self.workers = {}  # pod uid -> (pod name, process name, port)
        self.backoff = {}  # pod uid -> (restarts, last start, when it may start again)
        self.write_sd()

    def write_sd(self):
        targets = [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": self.ns, "pod": pod}}
                   for pod, _, port in self.workers.values()]
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(targets))
        tmp.replace(self.sd_file)

    def sync(self):
        pods = self.cp.admin.request("GET", f"/api/v1/namespaces/{self.ns}/pods?labelSelector={self.SELECTOR}")["items"]
        live = {}
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            live[pod["metadata"]["uid"]] = pod
        for uid in list(self.workers):
            if uid not in live:
                name, proc, _ = self.workers.pop(uid)
                self.procs.stop(proc, timeout=40)
                self.write_sd()
        for uid, pod in live.items():
            if uid in self.workers:
                name, proc, port = self.workers[uid]
                p = self.procs.running.get(proc)
                if p is None or p.poll() is not None:
                    # The container restarts, with the kubelet's back-off: at once the first
                    # time, then 10 s doubling to 5 min; forgotten after 10 min of running.
                    restarts, started, allowed = self.backoff.get(uid, (0, 0.0, None))
                    now = time.time()
                    if allowed is None:
                        if now - started > 600:
                            restarts = 0
                        allowed = now + (0 if restarts == 0 else min(10 * 2 ** (restarts - 1), 300))
                        self.backoff[uid] = (restarts, started, allowed)
                    if now >= allowed:
                        self.procs.start(proc, *self.command(pod, port))
                        self.backoff[uid] = (restarts + 1, now, None)
                continue
            port = free_port()
            name = pod["metadata"]["name"]
            proc = f"worker-{name}"
            self.procs.start(proc, *self.command(pod, port))
            self.workers[uid] = (name, proc, port)
            self.backoff[uid] = (0, time.time(), None)
            self.write_sd()

    def command(self, pod, port):
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        c = spec["containers"][0]
        args = [a if not a.startswith("--http-addr=") else f"--http-addr=127.0.0.1:{port}" for a in c.get("args", [])]
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "info",
               "KUBECONFIG": str(self.cp.token_kubeconfig(self.ns, spec["serviceAccountName"]))}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = {"metadata.name": name, "metadata.namespace": self.ns}[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                r = e["valueFrom"]["secretKeyRef"]
                s = self.cp.admin.request("GET", f"/api/v1/namespaces/{self.ns}/secrets/{r['name']}")
                env[e["name"]] = base64.b64decode(s["data"][r["key"]]).decode()
            else:
                raise SystemExit(f"the dashboard's kubelet does not fill env {e['name']} of pod {name}")
        return [str(self.monsoon), *args], env

    def kill(self):
        """SIGKILL every worker (the container restarts at the next sync)."""
        for _, proc, _ in self.workers.values():
            p = self.procs.running.get(proc)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def stop(self):
        for uid in list(self.workers):
            _, proc, _ = self.workers.pop(uid)
            self.procs.stop(proc, timeout=40)
        self.write_sd()
