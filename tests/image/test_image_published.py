"""The image run as the README says (`docker run -p 9001:8080`, here bound to 127.0.0.1) and called from the
host; and the proof, by inspection, that a container on that bridge has no way out."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from image.image_harness import (
    default_routes,
    gateway_of,
    invoke_until_loaded,
    routes_inside,
    source_nat_rules,
    subnet_of,
)

pytestmark = pytest.mark.image


def test_the_seed_event_is_answered_from_the_host_through_the_published_port(published_function, report):
    # WHEN the host sends the README's call: POST .../2015-03-31/functions/function/invocations (again while
    # the function answers that its model is still loading)
    cold = invoke_until_loaded(published_function, "rest-generate-seed-prompt")
    report["published_first_invoke_seconds"] = round(cold.seconds, 2)
    answer = cold.answer
    # THEN the function answers it
    assert answer.http_status == 200 and answer.status_code == 200, answer
    assert answer.body["generated_text"], answer


def test_an_oversized_body_from_the_host_is_a_413(published_function):
    answer = published_function.invoke("rest-generate-oversized-body")
    assert answer.status_code == 413, answer
    assert answer.body["error"] == "payload_too_large", answer


def test_the_port_is_published_on_the_hosts_loopback_only(published_function):
    bindings = published_function.attrs["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for bs in bindings.values() for b in bs} == {"127.0.0.1"}, bindings


def test_a_container_on_the_bridge_has_no_way_out(published_function, function_network, engine, report):
    # GIVEN the published container, on the engine's bridge network
    networks = published_function.attrs["NetworkSettings"]["Networks"]
    assert set(networks) == {function_network}, networks
    network = engine.client.networks.get(function_network)
    gateway, subnet = gateway_of(network), subnet_of(network)
    # WHEN its routing table is read inside it
    routes = routes_inside(published_function)
    # THEN its only way off its subnet is the bridge's gateway, the host, over IPv4 only
    assert default_routes(routes) == [f"ipv4 default via {gateway} dev eth0"], routes
    assert network.attrs["EnableIPv6"] is False
    # AND the host translates nothing from that subnet: the bridge masquerades nothing, and no NAT rule of the
    # host's (MASQUERADE, SNAT) would rewrite its packets, so nothing it sends past the host can be answered
    assert network.attrs["Options"].get("com.docker.network.bridge.enable_ip_masquerade") == "false", network.attrs
    rules, read = source_nat_rules(subnet)
    assert read, "neither iptables nor nft is installed: cannot read the host's NAT rules"
    assert rules == [], rules
    assert ipaddress.ip_address(gateway) in subnet
    # (Nor does the host forward it, when net.ipv4.ip_forward is 0: reported, the host's own business.)
    report["host_ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
