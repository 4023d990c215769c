"""A DNS server for tests of `mongodb+srv://` connection strings: serves the SRV, TXT and A
records a managed MongoDB (Atlas) publishes, from a JSON zone given on the command line, and
answers everything else with NXDOMAIN. Built on dnslib (PyPI), installed by `make venv`.

    srv_dns.py --addr 127.0.0.153 --port 53 --zone '{"srv": {...}, "txt": {...}, "a": {...}}'

zone: {"srv": {name: [[priority, weight, port, target], ...]},
       "txt": {name: ["text", ...]}, "a": {name: "1.2.3.4"}}
Prints "ready" once listening; runs until killed.
"""
import argparse
import json
import sys
import time

from dnslib import QTYPE, RCODE, RR, A, SRV, TXT
from dnslib.server import BaseResolver, DNSServer


class Quiet:
    """dnslib logs every query by default; the tests read only the monsoon log."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class ZoneResolver(BaseResolver):
    def __init__(self, zone):
        self.srv = {k.rstrip(".").lower(): v for k, v in zone.get("srv", {}).items()}
        self.txt = {k.rstrip(".").lower(): v for k, v in zone.get("txt", {}).items()}
        self.a = {k.rstrip(".").lower(): v for k, v in zone.get("a", {}).items()}

    def resolve(self, request, handler):
        reply = request.reply()
        qname = request.q.qname
        name = str(qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        found = False
        if qtype in ("SRV", "ANY") and name in self.srv:
            for prio, weight, port, target in self.srv[name]:
                reply.add_answer(RR(qname, QTYPE.SRV, ttl=60, rdata=SRV(prio, weight, port, target)))
            found = True
        if qtype in ("TXT", "ANY") and name in self.txt:
            for text in self.txt[name]:
                reply.add_answer(RR(qname, QTYPE.TXT, ttl=60, rdata=TXT(text)))
            found = True
        if qtype in ("A", "ANY") and name in self.a:
            reply.add_answer(RR(qname, QTYPE.A, ttl=60, rdata=A(self.a[name])))
            found = True
        if not found and name not in self.srv and name not in self.txt and name not in self.a:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", default="127.0.0.153")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--zone", required=True)
    args = p.parse_args()
    resolver = ZoneResolver(json.loads(args.zone))
    servers = [
        DNSServer(resolver, address=args.addr, port=args.port, tcp=False, logger=Quiet()),
        DNSServer(resolver, address=args.addr, port=args.port, tcp=True, logger=Quiet()),
    ]
    for s in servers:
        s.start_thread()
    print("ready", flush=True)
    while all(s.isAlive() for s in servers):
        time.sleep(0.5)
    sys.exit(1)


if __name__ == "__main__":
    main()
