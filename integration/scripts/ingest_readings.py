#!/usr/bin/env python3
"""A device team's client: puts JSON readings on a Strata node's ingest key with the official
Zenoh Python binding (pip install eclipse-zenoh==1.10.2).

    python3 ingest_readings.py tcp/127.0.0.1:7447 readings/py 100
    python3 ingest_readings.py quic/127.0.0.1:7457 readings/py 100 --tls certs/ca.pem certs/line-3-gw.pem certs/line-3-gw.key

Puts <count> valid readings {"value": i}, then one of each malformed kind, and prints what it
sent as JSON on stdout. With --tls, it is a client of a secured node (mutual TLS over QUIC)
with its own certificate, whose common name must be in the node's security.ingest_clients.

Two things a short-lived client must do, or its readings can vanish without an error:
- Wait until the publisher matches the node's ingest subscriber before the first put. A put
  made before the node's declaration reached this session is dropped here.
- Make one round trip to the node before closing. Zenoh closes a QUIC link at once, and what
  the link has not yet delivered is lost. A `get` on the same key comes back only after the
  node has taken in everything put before it, because the link keeps order. No node answers
  it (a secured node even refuses the query), but the end of the query still confirms
  delivery.
Both waits are bounded (WAIT_S); past either, the script exits with status 1 and says why.
"""
import json
import sys
import time

import zenoh

endpoint, stream, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
conf = zenoh.Config()
conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
conf.insert_json5("scouting/multicast/enabled", "false")
conf.insert_json5("scouting/gossip/enabled", "false")
if sys.argv[4:5] == ["--tls"]:
    ca, cert, key = sys.argv[5:8]
    conf.insert_json5("mode", '"client"')
    conf.insert_json5("transport/link/tls", json.dumps({
        "root_ca_certificate": ca, "connect_certificate": cert, "connect_private_key": key,
        "enable_mtls": True}))
else:
    conf.insert_json5("mode", '"peer"')

malformed = [
    b"not json at all",                       # not_json
    json.dumps({"ts_ms": 1}).encode(),        # missing_value
    json.dumps({"value": "hot"}).encode(),    # bad_value
    json.dumps({"value": 1, "unit": "C"}).encode(),  # unknown_field
    json.dumps([1, 2, 3]).encode(),           # not_an_object
    # too_large, twice: over the node's ingest.payload_bytes_max (64 KiB by default), and over
    # the protocol's largest message (4 MiB), which the node's transport refuses unread.
    json.dumps({"value": {"blob": "x" * 70_000}}).encode(),
    json.dumps({"value": {"blob": "x" * (5 * 1024 * 1024)}}).encode(),
]

WAIT_S = 10.0

with zenoh.open(conf) as session:
    key = f"strata/ingest/{stream}"
    publisher = session.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK)
    deadline = time.monotonic() + WAIT_S
    while not publisher.matching_status.matching:
        if time.monotonic() > deadline:
            sys.exit(f"no node takes readings on {key} via {endpoint} after {WAIT_S} s "
                     "(is the stream in the node's ingest.streams, and this client allowed?)")
        time.sleep(0.01)
    for i in range(count):
        publisher.put(json.dumps({"value": i, "ts_ms": 1764160000000 + i}))
    for payload in malformed:
        publisher.put(payload)
    # The delivery barrier: same key, same (default) priority, so the same ordered stream.
    started = time.monotonic()
    for _ in session.get(key, timeout=WAIT_S):
        pass
    if time.monotonic() - started >= WAIT_S:
        sys.exit(f"the node at {endpoint} did not confirm delivery within {WAIT_S} s")
    publisher.undeclare()
print(json.dumps({"valid": count, "malformed": len(malformed)}))
