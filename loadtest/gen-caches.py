#!/usr/bin/env python3
"""Generate two fake Nix binary caches (A and B) plus request lists for wrk.

Copied from the project's shared loadtest-kit, with one fix: FileHash and
NarHash are valid Nix-base32 SHA-256 values (the kit's random 52-char
strings decode to more than 256 bits 15 times in 16; ncro, like Nix,
rejects such a narinfo). Store hashes, NAR names and lists are unchanged.

Layout (N = --per-class, default 20000):
  hashes [0, N)      -> only in cache A
  hashes [N, 2N)     -> in both A and B
  hashes [2N, 3N)    -> only in cache B
  hashes [3N, 4N)    -> in neither (for the 404 / negative path)

Each narinfo is a realistic uncompressed-NAR narinfo (~600-700 bytes) with
StorePath, URL, Compression: none, FileHash, FileSize, NarHash, NarSize,
References, Deriver and a dummy Sig (no public keys are configured, so the
signature is never verified; it is there so the body size is realistic).

Three extra store paths point at real NAR files of 1 MiB, 100 MiB and 1 GiB,
present in both caches (hard-linked).

Lists written to OUT/lists/ (one request path per line, shuffled):
  a-20k.txt        20k paths present in A (A-only + both)
  mixed-20k.txt    20k paths, 1/3 A-only, 1/3 both, 1/3 B-only
  a-only-20k.txt / b-only-20k.txt / both-20k.txt
  present-all.txt  all 3N present paths (for miss runs on a fresh proxy DB)
  absent-20k.txt   N paths in neither cache
  hot-512.txt      512 paths from mixed (fits a small in-memory LRU)
"""
import argparse
import base64
import hashlib
import os
import random

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
NAMES = ["glibc-2.40", "bash-5.2p37", "coreutils-9.5", "openssl-3.3.2",
         "python3-3.12.8", "zlib-1.3.1", "gcc-14.2.1-lib", "perl-5.40.0",
         "systemd-256.10", "libffi-3.4.6", "ncurses-6.5", "xz-5.6.3",
         "rust-1.83.0", "nodejs-22.12.0", "hello-2.12.1", "curl-8.11.1"]


def nix32(rng, n):
    return "".join(rng.choice(NIX32) for _ in range(n))


def sha256_nix32(rng):
    """A 52-char Nix-base32 SHA-256 that decodes: 52 chars carry 260 bits,
    so the first char (the top 5 bits) must be 0 or 1, or Nix (and ncro)
    reject the hash. Drawn as before and then masked, so the random stream,
    hence every store hash and list, is the same as the unmasked kit's."""
    s = nix32(rng, 52)
    return NIX32[NIX32.index(s[0]) & 1] + s[1:]


def narinfo(rng, h, all_hashes, url, nar_size):
    name = rng.choice(NAMES)
    refs = sorted({f"{rng.choice(all_hashes)}-{rng.choice(NAMES)}"
                   for _ in range(rng.randint(1, 6))})
    sig = base64.b64encode(rng.randbytes(64)).decode()
    return (
        f"StorePath: /nix/store/{h}-{name}\n"
        f"URL: {url}\n"
        f"Compression: none\n"
        f"FileHash: sha256:{sha256_nix32(rng)}\n"
        f"FileSize: {nar_size}\n"
        f"NarHash: sha256:{sha256_nix32(rng)}\n"
        f"NarSize: {nar_size}\n"
        f"References: {' '.join(refs)}\n"
        f"Deriver: {nix32(rng, 32)}-{name}.drv\n"
        f"Sig: fake-cache-1:{sig}\n"
    )


def write_big(path, size, rng):
    chunk = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-big", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    n = a.per_class
    seen = set()
    hashes = []
    while len(hashes) < 4 * n + 3:
        h = nix32(rng, 32)
        if h not in seen:
            seen.add(h)
            hashes.append(h)
    ca = os.path.join(a.out, "A")
    cb = os.path.join(a.out, "B")
    for d in (ca, cb):
        os.makedirs(os.path.join(d, "nar"), exist_ok=True)
        with open(os.path.join(d, "nix-cache-info"), "w") as f:
            f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    # One list for every reference draw (slicing it per narinfo made the
    # generator quadratic: --per-class 60000 ran for many minutes).
    present = hashes[:3 * n]
    for i in range(3 * n):
        h = hashes[i]
        body = narinfo(rng, h, present, f"nar/{nix32(rng, 52)}.nar",
                       rng.randint(10_000, 50_000_000))
        if i < 2 * n:
            with open(os.path.join(ca, f"{h}.narinfo"), "w") as f:
                f.write(body)
        if i >= n:
            with open(os.path.join(cb, f"{h}.narinfo"), "w") as f:
                f.write(body)
    # Big NARs, present in both caches.
    big = []
    for j, size in enumerate((1 << 20, 100 << 20, 1 << 30)):
        h = hashes[4 * n + j]
        nar_name = f"{nix32(rng, 52)}.nar"
        label = {1 << 20: "1m", 100 << 20: "100m", 1 << 30: "1g"}[size]
        pa = os.path.join(ca, "nar", nar_name)
        pb = os.path.join(cb, "nar", nar_name)
        if not a.no_big:
            write_big(pa, size, rng)
            if os.path.exists(pb):
                os.unlink(pb)
            os.link(pa, pb)
        body = narinfo(rng, h, present, f"nar/{nar_name}", size)
        for d in (ca, cb):
            with open(os.path.join(d, f"{h}.narinfo"), "w") as f:
                f.write(body)
        big.append((label, h, nar_name))
    ld = os.path.join(a.out, "lists")
    os.makedirs(ld, exist_ok=True)

    def wl(name, hs):
        hs = list(hs)
        rng.shuffle(hs)
        with open(os.path.join(ld, name), "w") as f:
            f.write("".join(f"/{h}.narinfo\n" for h in hs))

    a_only, both, b_only = hashes[:n], hashes[n:2 * n], hashes[2 * n:3 * n]
    absent = hashes[3 * n:4 * n]
    wl("a-only-20k.txt", a_only)
    wl("both-20k.txt", both)
    wl("b-only-20k.txt", b_only)
    wl("a-20k.txt", rng.sample(a_only + both, n))
    third = n // 3
    mixed = a_only[:third] + both[:third] + b_only[:n - 2 * third]
    wl("mixed-20k.txt", mixed)
    wl("hot-512.txt", rng.sample(mixed, 512))
    wl("present-all.txt", hashes[:3 * n])
    wl("absent-20k.txt", absent)
    with open(os.path.join(ld, "big-nars.txt"), "w") as f:
        for label, h, nar_name in big:
            f.write(f"{label} /{h}.narinfo /nar/{nar_name}\n")


if __name__ == "__main__":
    main()
