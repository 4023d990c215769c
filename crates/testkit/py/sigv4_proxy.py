"""A reverse proxy that checks AWS Signature Version 4 the way Amazon OpenSearch Service's
front door does, in front of noida-db: the test double of AWS, not of Elasticsearch.

Every request's signature is recomputed with botocore's `SigV4Auth` (PyPI, installed by
`make venv`) from the known test secret, over the headers the request says it signed, its
path, query and body bytes as received (a gzip body as compressed). A request that does not
match gets 403 with AWS's message; one that matches is forwarded to the upstream unchanged
(minus the signature headers), and its answer returned.

    sigv4_proxy.py --port 0 --upstream http://127.0.0.1:9200 --region eu-west-1 --service es \
        --access-key AKID --secret-key SECRET [--session-token TOKEN]

With `--service aoss`, `x-amz-content-sha256` must be present and signed (Serverless requires
it). `--ecs-credentials SECONDS` also serves `/ecs-credentials` as the ECS container
credentials endpoint does: each fetch issues a new session token valid SECONDS, accepted until
it expires (the proxy then checks the session token, not `--session-token`).
Prints "ready <port>" once listening; one line per request on stderr ("verified ... token=...",
"rejected ...: why", "issued ..."); runs until killed.
"""
import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)
# Headers the proxy drops before forwarding: the signature's, and hop-by-hop ones.
DROPPED = {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256", "host", "connection", "content-length"}


def log(line):
    print(line, file=sys.stderr, flush=True)


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.issued = {}  # session token -> expiry (aware datetime)
        self.fetches = 0


def parse_authorization(value):
    """`AWS4-HMAC-SHA256 Credential=a/d/r/s/aws4_request, SignedHeaders=x;y, Signature=hex`."""
    algorithm, _, rest = value.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    fields = {}
    for part in rest.split(","):
        key, _, val = part.strip().partition("=")
        fields[key] = val
    if not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
        return None
    return fields


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state = None  # set by main

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=(("Content-Type", "application/json"),)):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def refuse(self, why, message=MISMATCH):
        log(f"rejected {self.command} {self.path}: {why}")
        self.answer(403, {"message": message})

    def serve_ecs_credentials(self):
        args = self.state.args
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=args.ecs_credentials)
        with self.state.lock:
            self.state.fetches += 1
            token = f"ecs-token-{self.state.fetches}"
            self.state.issued[token] = expiry
        log(f"issued {token} until {expiry.isoformat()}")
        self.answer(200, {
            "AccessKeyId": args.access_key,
            "SecretAccessKey": args.secret_key,
            "Token": token,
            "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        })

    def handle_any(self):
        args = self.state.args
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urllib.parse.urlsplit(self.path)
        if args.ecs_credentials and split.path == "/ecs-credentials":
            return self.serve_ecs_credentials()

        auth = parse_authorization(self.headers.get("Authorization", ""))
        if auth is None:
            return self.refuse("no SigV4 authorization header", "Missing Authentication Token")
        akid, date, region, service, terminal = (auth["Credential"].split("/") + [""] * 5)[:5]
        amz_date = self.headers.get("X-Amz-Date", "")
        signed = auth["SignedHeaders"].split(";")
        if akid != args.access_key:
            return self.refuse("unknown access key", "The security token included in the request is invalid.")
        if (region, service, terminal) != (args.region, args.service, "aws4_request") or date != amz_date[:8]:
            return self.refuse(f"credential scope {date}/{region}/{service}/{terminal}", "Credential should be scoped to a valid region and service.")
        if "host" not in signed or "x-amz-date" not in signed:
            return self.refuse("host and x-amz-date must be signed")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return self.refuse("bad x-amz-date")
        now = datetime.datetime.now(datetime.timezone.utc)
        if abs((now - when).total_seconds()) > 300:
            return self.refuse("x-amz-date too far from now", "Signature expired.")
        token = self.headers.get("X-Amz-Security-Token")
        if args.ecs_credentials:
            with self.state.lock:
                expiry = self.state.issued.get(token)
            if expiry is None or expiry <= now:
                return self.refuse(f"session token {token!r} unknown or expired", "The security token included in the request is expired")
        elif args.session_token is not None and token != args.session_token:
            return self.refuse("wrong or missing session token", "The security token included in the request is invalid.")
        if token is not None and "x-amz-security-token" not in signed:
            return self.refuse("x-amz-security-token not signed")
        body_sha256 = hashlib.sha256(body).hexdigest()
        declared = self.headers.get("X-Amz-Content-SHA256")
        if args.service == "aoss" and (declared is None or "x-amz-content-sha256" not in signed):
            return self.refuse("aoss needs a signed x-amz-content-sha256")
        if declared is not None and declared != body_sha256:
            return self.refuse("x-amz-content-sha256 does not match the body")

        # Recompute over exactly what the request says it signed.
        headers = {name: self.headers.get(name, "") for name in signed}
        request = AWSRequest(method=self.command, url=f"http://{self.headers.get('Host', '')}{split.path}", headers=headers, data=body)
        request.params = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(args.access_key, args.secret_key, token), args.service, args.region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected, auth["Signature"]):
            return self.refuse("signature mismatch")
        encoding = self.headers.get("Content-Encoding", "identity")
        # Issued (ECS) tokens are test values and name themselves; others are never printed.
        label = "none" if token is None else token if args.ecs_credentials else "static"
        log(f"verified {self.command} {split.path} encoding={encoding} token={label}")
        self.forward(body)

    def forward(self, body):
        upstream = urllib.parse.urlsplit(self.state.args.upstream)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in DROPPED}
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT") else None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        # The upstream's headers as they are (Content-Encoding included: noida-db gzips
        # answers for clients that accept it), minus hop-by-hop ones.
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive")]
        self.answer(response.status, data, kept)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--service", required=True, choices=["es", "aoss"])
    parser.add_argument("--access-key", required=True)
    parser.add_argument("--secret-key", required=True)
    parser.add_argument("--session-token")
    parser.add_argument("--ecs-credentials", type=int, default=0)
    args = parser.parse_args()
    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
