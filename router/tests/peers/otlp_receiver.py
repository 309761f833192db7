#!/usr/bin/env python3
"""An independent OTLP profiles receiver for the router's tests, built on the official
`opentelemetry-proto` and `grpcio` packages (PyPI), not on our code.

It serves gRPC (ProfilesService/Export) and HTTP/protobuf (POST /v1development/profiles),
decodes every request, checks the dictionary's indices, and writes one JSON line per request
to --out: resources, scopes, samples rebuilt into leaf-first function-name stacks, timestamps,
attributes, and any index error found.

--fail-first N answers the first N requests with UNAVAILABLE (gRPC) / 503 (HTTP).
--tls-cert/--tls-key serve both over TLS with that certificate chain and key (PEM).
"""
import argparse, gzip, json, ssl, sys, threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2 as service_pb2,
    profiles_service_pb2_grpc as service_grpc,
)

LOCK = threading.Lock()
STATE = {"seen": 0}


def any_value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def decode(request):
    """The request as plain data, with every dictionary index checked."""
    d = request.dictionary
    errors = []

    def at(table, index, what):
        if not 0 <= index < len(table):
            errors.append(f"{what} index {index} out of range ({len(table)})")
            return None
        return table[index]

    def attributes(indices, what):
        out = {}
        for i in indices:
            a = at(d.attribute_table, i, what + " attribute")
            if a is not None:
                out[at(d.string_table, a.key_strindex, "attribute key") or ""] = any_value(a.value)
        return out

    placeholders = {
        "string": len(d.string_table) > 0 and d.string_table[0] == "",
        "mapping": len(d.mapping_table) > 0 and d.mapping_table[0].ByteSize() == 0,
        "location": len(d.location_table) > 0 and d.location_table[0].ByteSize() == 0,
        "function": len(d.function_table) > 0 and d.function_table[0].ByteSize() == 0,
        "stack": len(d.stack_table) > 0 and d.stack_table[0].ByteSize() == 0,
        "attribute": len(d.attribute_table) > 0 and d.attribute_table[0].ByteSize() == 0,
    }
    resources = []
    for rp in request.resource_profiles:
        resource = {kv.key: any_value(kv.value) for kv in rp.resource.attributes}
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                samples = []
                for s in p.samples:
                    stack = at(d.stack_table, s.stack_index, "stack")
                    frames = []
                    for li in (stack.location_indices if stack else []):
                        loc = at(d.location_table, li, "location")
                        if loc is None:
                            continue
                        mapping = at(d.mapping_table, loc.mapping_index, "mapping")
                        name = ""
                        if loc.lines:
                            fn = at(d.function_table, loc.lines[0].function_index, "function")
                            if fn is not None:
                                name = at(d.string_table, fn.name_strindex, "function name") or ""
                        frames.append({
                            "name": name,
                            "address": loc.address,
                            "type": attributes(loc.attribute_indices, "location").get("profile.frame.type"),
                            "mapping_file": at(d.string_table, mapping.filename_strindex, "mapping file") if mapping else None,
                            "build_id": attributes(mapping.attribute_indices, "mapping").get("process.executable.build_id.gnu") if mapping else None,
                        })
                    samples.append({
                        "frames": frames,
                        "timestamps": list(s.timestamps_unix_nano),
                        "values": list(s.values),
                        "attributes": attributes(s.attribute_indices, "sample"),
                    })
                resources.append({
                    "resource": resource,
                    "scope": {"name": sp.scope.name, "version": sp.scope.version},
                    "sample_type": [d.string_table[p.sample_type.type_strindex], d.string_table[p.sample_type.unit_strindex]],
                    "period_type": [d.string_table[p.period_type.type_strindex], d.string_table[p.period_type.unit_strindex]],
                    "period": p.period,
                    "time_unix_nano": p.time_unix_nano,
                    "duration_nano": p.duration_nano,
                    "samples": samples,
                })
    return {"placeholders": placeholders, "errors": errors, "resources": resources}


def record(out, request, transport, headers):
    summary = decode(request)
    summary["transport"] = transport
    summary["headers"] = headers
    with LOCK:
        with open(out, "a") as f:
            f.write(json.dumps(summary) + "\n")


def should_fail(args):
    with LOCK:
        STATE["seen"] += 1
        return STATE["seen"] <= args.fail_first


class Servicer(service_grpc.ProfilesServiceServicer):
    def __init__(self, args):
        self.args = args

    def Export(self, request, context):
        if should_fail(self.args):
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver warming up")
        record(self.args.out, request, "grpc", {k: v for k, v in context.invocation_metadata()})
        return service_pb2.ExportProfilesServiceResponse()


def http_handler(args):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1development/profiles":
                self.send_response(404)
                self.end_headers()
                return
            if should_fail(args):
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self.end_headers()
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = service_pb2.ExportProfilesServiceRequest()
            request.ParseFromString(body)
            record(args.out, request, "http", {k.lower(): v for k, v in self.headers.items()})
            reply = service_pb2.ExportProfilesServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_grpc.add_ProfilesServiceServicer_to_server(Servicer(args), server)
    http = ThreadingHTTPServer(("127.0.0.1", args.http_port), http_handler(args))
    if args.tls_cert:
        chain, key = open(args.tls_cert, "rb").read(), open(args.tls_key, "rb").read()
        server.add_secure_port(f"127.0.0.1:{args.grpc_port}", grpc.ssl_server_credentials([(key, chain)]))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        http.socket = context.wrap_socket(http.socket, server_side=True)
    else:
        server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    server.start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
