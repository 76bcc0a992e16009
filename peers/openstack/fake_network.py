"""A stand-in for Neutron's core API: one shared network with one subnet, and ports with IPAM.

Nova's standard path to give a server an address is "create a port on the network, bind it, read
its fixed IPs back" through the network service. There is no Neutron on PyPI that runs without
agents, so this process answers exactly that part of the API (networks, subnets, ports, extension
and quota discovery) and nothing else: no routers, floating IPs (404, which Nova treats as "no L3
API"), security groups (always empty) or real packets. Addresses come from a real allocator, so
two servers never share one and a deleted server's address is freed.

Run: python fake_network.py <port>. It serves on 127.0.0.1 until SIGTERM. Tokens are not
validated: the peer is for tests on 127.0.0.1 only.
"""

from __future__ import annotations

import ipaddress
import json
import random
import signal
import sys
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NETWORK_NAME = "gb-shared"
CIDR = "10.20.0.0/16"
FIRST_HOST_OFFSET = 10  # leave the gateway and service addresses of the subnet alone
# query parameters that shape a listing rather than filter it
NON_FILTERS = {"fields", "limit", "marker", "page_reverse", "sort_key", "sort_dir"}


class Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        network_id, subnet_id = str(uuid.uuid4()), str(uuid.uuid4())
        net = ipaddress.ip_network(CIDR)
        self.gateway = str(next(net.hosts()))
        self.networks: dict[str, dict[str, Any]] = {
            network_id: {
                "id": network_id,
                "name": NETWORK_NAME,
                "status": "ACTIVE",
                "admin_state_up": True,
                "shared": True,
                "router:external": False,
                # without port security Nova applies no security groups, which this stand-in lacks
                "port_security_enabled": False,
                "subnets": [subnet_id],
                "mtu": 1450,
                "tenant_id": "",
                "project_id": "",
                "provider:network_type": "flat",
                "provider:physical_network": "physnet1",
                "description": "the peer's only network (stand-in for Neutron)",
            }
        }
        self.subnets: dict[str, dict[str, Any]] = {
            subnet_id: {
                "id": subnet_id,
                "name": f"{NETWORK_NAME}-v4",
                "network_id": network_id,
                "cidr": CIDR,
                "ip_version": 4,
                "gateway_ip": self.gateway,
                "enable_dhcp": False,
                "dns_nameservers": [],
                "host_routes": [],
                "allocation_pools": [],
                "tenant_id": "",
                "project_id": "",
            }
        }
        self.ports: dict[str, dict[str, Any]] = {}

    def allocate_ip(self, subnet: dict[str, Any]) -> str:
        used = {ip["ip_address"] for p in self.ports.values() for ip in p["fixed_ips"]}
        for i, addr in enumerate(ipaddress.ip_network(subnet["cidr"]).hosts()):
            if i + 1 >= FIRST_HOST_OFFSET and str(addr) not in used:
                return str(addr)
        raise ApiError(HTTPStatus.CONFLICT, "IpAddressGenerationFailure", "No more IP addresses")

    def create_port(self, body: dict[str, Any]) -> dict[str, Any]:
        network = self.networks.get(str(body.get("network_id")))
        if network is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "NetworkNotFound", "Network could not be found")
        subnet = self.subnets[network["subnets"][0]]
        port_id = str(uuid.uuid4())
        project = body.get("project_id") or body.get("tenant_id") or ""
        # Neutron's own OUI prefix, as Nova and guests expect to see
        mac = "fa:16:3e:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))  # noqa: S311
        port = {
            "id": port_id,
            "name": body.get("name", ""),
            "network_id": network["id"],
            "tenant_id": project,
            "project_id": project,
            "mac_address": mac,
            "admin_state_up": body.get("admin_state_up", True),
            "status": "ACTIVE",
            "device_id": body.get("device_id", ""),
            "device_owner": body.get("device_owner", ""),
            "fixed_ips": [{"subnet_id": subnet["id"], "ip_address": self.allocate_ip(subnet)}],
            "security_groups": [],
            "port_security_enabled": False,
            "binding:host_id": body.get("binding:host_id", ""),
            "binding:profile": body.get("binding:profile") or {},
            "binding:vnic_type": "normal",
            "binding:vif_type": "ovs" if body.get("binding:host_id") else "unbound",
            "binding:vif_details": {},
        }
        self.ports[port_id] = port
        return port

    def update_port(self, port_id: str, body: dict[str, Any]) -> dict[str, Any]:
        port = self.ports.get(port_id)
        if port is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "PortNotFound", f"Port {port_id} not found")
        for key, value in body.items():
            if key not in {"id", "fixed_ips", "network_id", "mac_address"}:
                port[key] = value
        port["binding:vif_type"] = "ovs" if port.get("binding:host_id") else "unbound"
        return port


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _matches(item: dict[str, Any], query: dict[str, list[str]]) -> bool:
    for key, wanted in query.items():
        if key in NON_FILTERS:
            continue
        if key == "fixed_ips":
            # Neutron's form: fixed_ips=ip_address=10.0.0.5 (or subnet_id=...)
            pairs = [w.split("=", 1) for w in wanted if "=" in w]
            if not all(any(ip.get(k) == v for ip in item.get("fixed_ips", [])) for k, v in pairs):
                return False
            continue
        if key not in item:
            return False
        value = item[key]
        as_text = str(value).lower() if isinstance(value, bool) else str(value)
        if as_text not in {w.lower() if isinstance(value, bool) else w for w in wanted}:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    store: Store
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}") if length else {}

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            status, body = self._dispatch(method, parts, query)
        except ApiError as exc:
            status = exc.status
            body = {"NeutronError": {"type": exc.kind, "message": exc.message, "detail": ""}}
        except (ValueError, KeyError) as exc:
            status = HTTPStatus.BAD_REQUEST
            body = {"NeutronError": {"type": "BadRequest", "message": str(exc), "detail": ""}}
        self._send(status, body)

    def _dispatch(
        self, method: str, parts: list[str], query: dict[str, list[str]]
    ) -> tuple[int, Any]:
        host = self.headers.get("Host", "127.0.0.1")
        if not parts:
            version = {"id": "v2.0", "status": "CURRENT"}
            version["links"] = [{"rel": "self", "href": f"http://{host}/v2.0/"}]  # type: ignore[assignment]
            return HTTPStatus.OK, {"versions": [version]}
        if parts[0] != "v2.0":
            raise ApiError(HTTPStatus.NOT_FOUND, "HTTPNotFound", "Unknown API version")
        parts = parts[1:]
        if not parts:
            names = ["networks", "subnets", "ports"]
            resources = [{"name": n[:-1], "collection": n, "links": []} for n in names]
            return HTTPStatus.OK, {"resources": resources}
        if parts and parts[-1].endswith(".json"):
            parts[-1] = parts[-1][: -len(".json")]
        collection, item_id = parts[0], (parts[1] if len(parts) > 1 else None)
        st = self.store
        with st.lock:
            if method == "GET" and collection == "extensions" and item_id is None:
                return HTTPStatus.OK, {"extensions": []}
            if method == "GET" and collection == "quotas" and item_id is not None:
                return HTTPStatus.OK, {"quota": {"port": -1, "network": -1, "subnet": -1}}
            if method == "GET" and collection == "security-groups":
                return HTTPStatus.OK, {"security_groups": []}
            tables = {"networks": st.networks, "subnets": st.subnets, "ports": st.ports}
            if collection not in tables or len(parts) > 2:
                raise ApiError(HTTPStatus.NOT_FOUND, "HTTPNotFound", f"No resource {collection}")
            table, singular = tables[collection], collection[:-1]
            if method == "GET" and item_id is None:
                return HTTPStatus.OK, {
                    collection: [i for i in table.values() if _matches(i, query)]
                }
            if method == "GET":
                if item_id not in table:
                    kind = f"{singular.title()}NotFound"
                    raise ApiError(HTTPStatus.NOT_FOUND, kind, f"{singular} {item_id} not found")
                return HTTPStatus.OK, {singular: table[item_id]}
            if collection == "ports" and method == "POST" and item_id is None:
                return HTTPStatus.CREATED, {"port": st.create_port(self._body()["port"])}
            if collection == "ports" and method == "PUT" and item_id is not None:
                return HTTPStatus.OK, {"port": st.update_port(item_id, self._body()["port"])}
            if collection == "ports" and method == "DELETE" and item_id is not None:
                if st.ports.pop(item_id, None) is None:
                    raise ApiError(HTTPStatus.NOT_FOUND, "PortNotFound", item_id)
                return HTTPStatus.NO_CONTENT, None
        raise ApiError(HTTPStatus.NOT_FOUND, "HTTPNotFound", f"{method} {collection} unsupported")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")


def main() -> None:
    port = int(sys.argv[1])
    Handler.store = Store()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
