#!/usr/bin/env python3
"""The soak test's backends (scripts/bench/soak.sh), each appending one JSON line per request it
accepted to --log before it answers: {"time": unix seconds, "samples": N, "bytes": B,
"digest": sha1 of the decoded profile}. The soak script kills them (SIGKILL) and restarts them
on the same port to make the backends flap.

  peers.py datadog --port P --log FILE   a Datadog Agent: GET /info, POST /profiling/v1/input
                                         (multipart; the cpu.pprof part, zstd or gzip, is decoded
                                         and its cpu-samples summed)
  peers.py otlp --port P --log FILE      an OTLP profiles receiver over gRPC, on the official
                                         opentelemetry-proto and grpcio packages (the Python of
                                         scripts/setup.sh --test's otlp-peer environment); samples
                                         are timestamps, as the router sends them

Both print "ready" once they listen.
"""
import argparse, gzip, hashlib, json, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG_LOCK = threading.Lock()


def log_request(path, samples, size, payload):
    line = {"time": time.time(), "samples": samples, "bytes": size,
            "digest": hashlib.sha1(payload).hexdigest()}
    with LOG_LOCK, open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


# --- pprof, read with a minimal protobuf wire-format reader (no pprof package needed) ---

def varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(data):
    """(field number, wire type, value) of a message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            length, i = varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} in a pprof")
        yield number, wire, value


def int_list(wire, value):
    """A repeated int64 field's values, packed or not."""
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = varint(value, i)
        out.append(v)
    return out


def pprof_samples(profile):
    """The sum of the `cpu-samples` value over a pprof's samples."""
    strings, types, samples = [], [], []
    for number, wire, value in fields(profile):
        if number == 1:  # sample_type: ValueType { type = 1, unit = 2 }
            types.append(dict((n, v) for n, _, v in fields(value)).get(1, 0))
        elif number == 2:  # sample: Sample { location_id = 1, value = 2, ... }
            values = []
            for n, w, v in fields(value):
                if n == 2:
                    values += int_list(w, v)
            samples.append(values)
        elif number == 6:
            strings.append(value.decode())
    column = [strings[t] for t in types].index("cpu-samples")
    return sum(values[column] for values in samples)


def decompress(data):
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def multipart_part(content_type, body, name):
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    for part in body.split(b"--" + boundary):
        head, _, data = part.partition(b"\r\n\r\n")
        if f'name="{name}"'.encode() in head:
            return data[:-2] if data.endswith(b"\r\n") else data
    raise ValueError(f"no {name} part")


def serve_datadog(args):
    class Agent(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, body=b"", content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        return data
                    data += chunk
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self):
            if self.path == "/info":
                info = {"version": "7.60.0", "endpoints": ["/v0.4/traces", "/profiling/v1/input"]}
                self.reply(200, json.dumps(info).encode())
            else:
                self.reply(404)

        def do_POST(self):
            body = self.body()
            if self.path != "/profiling/v1/input":
                self.reply(404)
                return
            pprof = decompress(multipart_part(self.headers["Content-Type"], body, "cpu.pprof"))
            log_request(args.log, pprof_samples(pprof), len(body), pprof)
            self.reply(200, b"{}")

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Agent)
    print("ready", flush=True)
    server.serve_forever()


def serve_otlp(args):
    from concurrent import futures
    import grpc
    from opentelemetry.proto.collector.profiles.v1development import (
        profiles_service_pb2 as service_pb2,
        profiles_service_pb2_grpc as service_grpc,
    )

    class Receiver(service_grpc.ProfilesServiceServicer):
        def Export(self, request, context):
            samples = sum(len(s.timestamps_unix_nano)
                          for rp in request.resource_profiles
                          for sp in rp.scope_profiles
                          for p in sp.profiles
                          for s in p.samples)
            payload = request.SerializeToString(deterministic=True)
            log_request(args.log, samples, len(payload), payload)
            return service_pb2.ExportProfilesServiceResponse()

    limit = args.max_receive_mib * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", limit)])
    service_grpc.add_ProfilesServiceServicer_to_server(Receiver(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["datadog", "otlp"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-receive-mib", type=int, default=4,
                        help="OTLP: largest request accepted (the Collector's default is 4)")
    args = parser.parse_args()
    {"datadog": serve_datadog, "otlp": serve_otlp}[args.kind](args)


if __name__ == "__main__":
    sys.exit(main())
