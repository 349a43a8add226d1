#!/usr/bin/env python3
"""Stand-in for `ncro serve --config FILE`: runs the nix-harness's naive
merging proxy (`cachehttp.py proxy`) over the upstreams of an ncro config.

e2e_nix runs its Nix-client flow through this to show that the flow passes
with a proxy that routes correctly, so a failure with ncro is ncro's.

usage: reference-proxy.py CACHEHTTP_PY serve --config FILE
"""
import os
import sys
import tomllib

cachehttp = sys.argv[1]
with open(sys.argv[sys.argv.index("--config") + 1], "rb") as f:
    cfg = tomllib.load(f)
host, port = cfg["server"]["listen"].rsplit(":", 1)
args = [sys.executable, cachehttp, "proxy", "--host", host, "--port", port]
for up in cfg["upstreams"]:
    args += ["--upstream", up["url"]]
os.execv(sys.executable, args)
