#!/usr/bin/env python3
# Setup steps of the pcg OpenStack test stack that talk to its APIs, run by start.sh with the
# admin credentials in the OS_* environment (keystoneauth, one process instead of many CLI calls):
#   catalog KEY=URL...   register the services and public/internal endpoints (idempotent)
#   wait-compute SECS    wait until nova-compute is up, in placement, and mapped to its cell
#   content IMAGE_FILE   create the flavors and the image the tests use (idempotent)
import os
import subprocess
import sys
import time

from keystoneauth1 import loading, session as ks_session

SERVICES = {
    "compute": ("nova", "compute"),
    "placement": ("placement", "placement"),
    "image": ("glance", "image"),
    "network": ("neutron", "network"),
}


def session():
    loader = loading.get_plugin_loader("password")
    auth = loader.load_from_options(
        auth_url=os.environ["OS_AUTH_URL"],
        username=os.environ["OS_USERNAME"],
        password=os.environ["OS_PASSWORD"],
        project_name=os.environ["OS_PROJECT_NAME"],
        user_domain_name=os.environ["OS_USER_DOMAIN_NAME"],
        project_domain_name=os.environ["OS_PROJECT_DOMAIN_NAME"],
    )
    return ks_session.Session(auth=auth)


def catalog(pairs):
    s = session()
    ks = os.environ["OS_AUTH_URL"]
    kw = dict(endpoint_override=ks, raise_exc=True)
    services = s.get("/services", **kw).json()["services"]
    endpoints = s.get("/endpoints", **kw).json()["endpoints"]
    for pair in pairs:
        kind, url = pair.split("=", 1)
        name, stype = SERVICES[kind]
        svc = next((x for x in services if x["type"] == stype), None)
        if svc is None:
            svc = s.post("/services", json={"service": {"name": name, "type": stype}}, **kw).json()["service"]
        for iface in ("public", "internal"):
            if not any(e["service_id"] == svc["id"] and e["interface"] == iface for e in endpoints):
                s.post("/endpoints", json={"endpoint": {
                    "service_id": svc["id"], "interface": iface, "url": url,
                    "region_id": "RegionOne"}}, **kw)


def wait_compute(secs, nova_manage):
    s = session()
    deadline = time.time() + float(secs)
    mapped = False
    while time.time() < deadline:
        try:
            rp = s.get("/resource_providers", endpoint_filter={"service_type": "placement"},
                       raise_exc=False)
            if rp.ok and rp.json().get("resource_providers"):
                # The compute node is known to placement; map it to its cell (the hypervisor
                # list and the scheduler both need the host mapping).
                if not mapped:
                    subprocess.run(nova_manage + ["cell_v2", "discover_hosts"], check=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    mapped = True
                hv = s.get("/os-hypervisors", endpoint_filter={"service_type": "compute"},
                           raise_exc=False)
                if hv.ok and hv.json().get("hypervisors"):
                    return
        except Exception as e:  # not up yet
            print("waiting for compute: %s" % e, file=sys.stderr)
        time.sleep(1)
    sys.exit("nova-compute did not come up within %s s" % secs)


def content(image_file):
    s = session()
    c = {"service_type": "compute"}
    flavors = s.get("/flavors", endpoint_filter=c).json()["flavors"]
    for name, ram, vcpus in (("pcg.tiny", 16, 1), ("pcg.small", 64, 1)):
        if not any(f["name"] == name for f in flavors):
            s.post("/flavors", endpoint_filter=c, json={"flavor": {
                "name": name, "ram": ram, "vcpus": vcpus, "disk": 0}})
    g = {"service_type": "image"}
    images = s.get("/v2/images", endpoint_filter=g).json()["images"]
    if not any(i["name"] == "pcg-image" and i["status"] == "active" for i in images):
        img = s.post("/v2/images", endpoint_filter=g, json={
            "name": "pcg-image", "disk_format": "raw", "container_format": "bare",
            "visibility": "public"}).json()
        with open(image_file, "rb") as f:
            s.put("/v2/images/%s/file" % img["id"], endpoint_filter=g, data=f.read(),
                  headers={"Content-Type": "application/octet-stream"})


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "catalog":
        catalog(sys.argv[2:])
    elif cmd == "wait-compute":
        wait_compute(sys.argv[2], sys.argv[3:])
    elif cmd == "content":
        content(sys.argv[2])
    else:
        sys.exit("unknown command %s" % cmd)
