#!/usr/bin/env python3
"""Writes a route database with N realistic routes, in the file format ncro
2.2 wrote and ncro reads (src/route/persist.rs): the footprint scenario
starts ncro on it and measures load time and RSS.

Each route names one of two upstreams and carries a narinfo of about 500
bytes like cache.nixos.org's (StorePath, URL, Compression, FileHash,
FileSize, NarHash, NarSize, 0-2 References, Deriver, Sig), valid Nix-base32
hashes throughout. Deterministic for a seed.

Usage: gen-routes.py DB_PATH [N] [--seed S] [--upstreams URL,URL]
Also writes every store hash, one per line, to DB_PATH.hashes.
"""
import argparse
import base64
import os
import random
import sqlite3
import time

ALPHA = "0123456789abcdfghijklmnpqrsvwxyz"
NAMES = ["hello-2.12.1", "glibc-2.39-52", "openssl-3.0.14", "python3-3.12.4",
         "gcc-13.3.0-lib", "zlib-1.3.1", "bash-5.2p32", "coreutils-9.5",
         "perl-5.38.2", "ncurses-6.4", "libffi-3.4.6", "xz-5.6.2-bin",
         "systemd-256.2", "curl-8.9.0", "rust-1.80.0", "nix-2.24.1"]

SCHEMA = """
CREATE TABLE routes (
    store_path TEXT PRIMARY KEY,
    upstream_url TEXT NOT NULL,
    latency_ms REAL NOT NULL DEFAULT 0,
    latency_ema REAL NOT NULL DEFAULT 0,
    query_count INTEGER NOT NULL DEFAULT 1,
    failure_count INTEGER NOT NULL DEFAULT 0,
    last_verified INTEGER NOT NULL DEFAULT 0,
    ttl INTEGER NOT NULL,
    nar_hash TEXT NOT NULL DEFAULT '',
    nar_size INTEGER NOT NULL DEFAULT 0,
    nar_url TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')),
    narinfo_bytes BLOB
);
CREATE INDEX idx_routes_ttl ON routes(ttl);
CREATE INDEX idx_routes_last_verified ON routes(last_verified);
CREATE INDEX idx_routes_nar_url ON routes(nar_url);
CREATE TABLE upstream_health (
    url TEXT PRIMARY KEY,
    ema_latency REAL NOT NULL DEFAULT 0,
    consecutive_fails INTEGER NOT NULL DEFAULT 0,
    total_queries INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE negative_cache (
    store_path TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX idx_negative_expires ON negative_cache(expires_at);
"""


def b32(rng, chars):
    return "".join(rng.choice(ALPHA) for _ in range(chars))


def sha256_b32(rng):
    # 52 characters carry 260 bits: the top 4 must be zero for a valid
    # SHA-256, so the first character is one of the first eight.
    return ALPHA[rng.randrange(8)] + b32(rng, 51)


def route(rng, i, now):
    h = b32(rng, 32)
    name = NAMES[i % len(NAMES)]
    file_hash = sha256_b32(rng)
    nar_hash = sha256_b32(rng)
    nar_size = rng.randrange(10_000, 50_000_000)
    refs = " ".join(f"{b32(rng, 32)}-{rng.choice(NAMES)}" for _ in range(rng.randrange(0, 3)))
    sig = base64.b64encode(rng.randbytes(64)).decode()
    url = f"nar/{file_hash}.nar.xz"
    narinfo = (
        f"StorePath: /nix/store/{h}-{name}\nURL: {url}\nCompression: xz\n"
        f"FileHash: sha256:{file_hash}\nFileSize: {nar_size // 3}\n"
        f"NarHash: sha256:{nar_hash}\nNarSize: {nar_size}\nReferences: {refs}\n"
        f"Deriver: {b32(rng, 32)}-{name}.drv\nSig: cache.nixos.org-1:{sig}\n"
    ).encode()
    verified = now - rng.randrange(0, 3000)
    return (h, verified, verified + 30 * 86400, f"sha256:{nar_hash}", nar_size, url, narinfo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("n", nargs="?", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--upstreams", default="http://127.0.0.1:18581,http://127.0.0.1:18582")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    ups = a.upstreams.split(",")
    now = int(time.time())
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(a.db + suffix):
            os.remove(a.db + suffix)
    c = sqlite3.connect(a.db)
    c.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
    total = 0
    with open(a.db + ".hashes", "w") as hashes:
        batch = []
        for i in range(a.n):
            h, verified, ttl, nh, ns, url, ni = route(rng, i, now)
            total += len(ni)
            hashes.write(h + "\n")
            batch.append((h, ups[i % len(ups)], 1.0 + i % 7, verified, ttl, nh, ns, url, ni))
            if len(batch) == 50_000:
                c.executemany(
                    "INSERT INTO routes (store_path, upstream_url, latency_ms, latency_ema, "
                    "last_verified, ttl, nar_hash, nar_size, nar_url, narinfo_bytes) "
                    "VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", batch)
                batch.clear()
        if batch:
            c.executemany(
                "INSERT INTO routes (store_path, upstream_url, latency_ms, latency_ema, "
                "last_verified, ttl, nar_hash, nar_size, nar_url, narinfo_bytes) "
                "VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", batch)
    c.commit()
    c.execute("PRAGMA journal_mode=WAL")
    c.close()
    print(f"{a.db}: {a.n} routes, narinfo {total / max(a.n, 1):.0f} bytes on average, "
          f"{os.path.getsize(a.db) / 1e6:.0f} MB; hashes in {a.db}.hashes")


if __name__ == "__main__":
    main()
