#!/usr/bin/env python3
"""A dashboard client of hubgate's gRPC API: subscribes to streams and prints each record.

    pip install -r examples/python/requirements.txt
    python examples/python/hubgate_client.py --target 127.0.0.1:50051 --stream air_quality

Each record is printed as one JSON line: stream, sequence, event time, and the fields that passed
the policy. Gaps (records the gateway no longer holds) are printed too. On a broken connection the
client reconnects and resumes after the last sequence it printed, so nothing is printed twice and
nothing held is missed.

The Python code for the API is generated from proto/ (grpcio-tools) into a cache folder on first
use, so it always matches the proto files of this checkout.
"""

import argparse
import importlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def generated_modules():
    """The generated `gateway_pb2` and `gateway_pb2_grpc` modules, made from proto/ if needed."""
    from grpc_tools import protoc

    out = Path(os.environ.get("HUBGATE_PY_GEN", Path(__file__).resolve().parent / "_generated"))
    proto = PROTO_ROOT / "hubgate" / "v1" / "gateway.proto"
    stamp = out / ".source-mtime"
    fresh = stamp.exists() and stamp.read_text() == str(proto.stat().st_mtime_ns)
    if not fresh:
        out.mkdir(parents=True, exist_ok=True)
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(proto),
            ]
        )
        if status != 0:
            sys.exit(f"could not generate the Python code from {proto}")
        stamp.write_text(str(proto.stat().st_mtime_ns))
    sys.path.insert(0, str(out))
    return (
        importlib.import_module("hubgate.v1.gateway_pb2"),
        importlib.import_module("hubgate.v1.gateway_pb2_grpc"),
    )


def value_of(value):
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None


def record_line(record):
    event_time = datetime.fromtimestamp(
        record.event_time.seconds + record.event_time.nanos / 1e9, tz=timezone.utc
    )
    line = {
        "stream": record.stream,
        "sequence": record.sequence,
        "event_time": event_time.isoformat(timespec="milliseconds"),
        "fields": {path: value_of(v) for path, v in sorted(record.fields.items())},
    }
    if record.origin:
        line["origin"] = record.origin
    return json.dumps(line, sort_keys=True)


def channel(args):
    if args.ca_file:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.ca_file).read_bytes())
        return grpc.secure_channel(args.target, credentials)
    return grpc.insecure_channel(args.target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the gateway's gRPC address")
    parser.add_argument(
        "--stream", action="append", default=[], help="a stream to follow (repeat; none: all)"
    )
    parser.add_argument(
        "--from",
        dest="start",
        default="live",
        help="where to start: live (default), oldest, or a sequence number",
    )
    parser.add_argument("--count", type=int, default=0, help="stop after this many records")
    parser.add_argument("--token-file", help="a file holding the bearer token (or HUBGATE_TOKEN)")
    parser.add_argument("--ca-file", help="CA certificate, for a gateway served over TLS")
    args = parser.parse_args()

    pb, pb_grpc = generated_modules()
    token = os.environ.get("HUBGATE_TOKEN")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    metadata = [("authorization", f"Bearer {token}")] if token else []

    def start_position():
        if args.start == "live":
            return pb.StartPosition(live=pb.Live())
        if args.start == "oldest":
            return pb.StartPosition(oldest=pb.Oldest())
        return pb.StartPosition(sequence=int(args.start))

    printed = 0
    resume = {}  # stream -> next sequence to ask for after a reconnect
    backoff = 0.5
    while True:
        request = pb.SubscribeRequest(
            streams=args.stream, start=start_position(), from_sequence=resume
        )
        try:
            with channel(args) as ch:
                stub = pb_grpc.GatewayStub(ch)
                if not resume:
                    # Where each stream stands now: after a reconnect, a stream that had no
                    # record yet resumes from here rather than from "live", which would skip
                    # what was kept meanwhile.
                    listed = stub.ListStreams(pb.ListStreamsRequest(), metadata=metadata)
                    for info in listed.streams:
                        if not args.stream or info.name in args.stream:
                            resume[info.name] = (
                                info.last_sequence + 1 if args.start == "live" else 0
                            )
                    resume = {name: seq for name, seq in resume.items() if seq > 0}
                for event in stub.Subscribe(request, metadata=metadata):
                    backoff = 0.5
                    which = event.WhichOneof("event")
                    if which == "record":
                        print(record_line(event.record), flush=True)
                        resume[event.record.stream] = event.record.sequence + 1
                        printed += 1
                        if args.count and printed >= args.count:
                            return 0
                    elif which == "gap":
                        gap = event.gap
                        resume[gap.stream] = gap.last_sequence + 1
                        print(
                            json.dumps(
                                {
                                    "gap": gap.stream,
                                    "first_sequence": gap.first_sequence,
                                    "last_sequence": gap.last_sequence,
                                }
                            ),
                            flush=True,
                        )
        except grpc.RpcError as err:
            code = err.code()
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                print(f"refused: {code.name}: {err.details()}", file=sys.stderr)
                return 2
            print(f"connection lost ({code.name}); retrying in {backoff:.1f} s", file=sys.stderr)
        time.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


if __name__ == "__main__":
    sys.exit(main())
