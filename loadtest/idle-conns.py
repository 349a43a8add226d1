#!/usr/bin/env python3
"""Opens N keep-alive connections to HOST:PORT, sends one request on each
(GET PATH, HTTP/1.1), reads each response, then holds them all idle until
its stdin closes (or HOLD seconds pass). Prints one line when every
connection has had its answer, so a caller can measure the server then.

Usage: idle-conns.py HOST PORT N [PATH] [HOLD_S]
Needs RLIMIT_NOFILE above N (the footprint script raises it).
"""
import resource
import selectors
import socket
import sys
import time


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/nix-cache-info"
    hold = float(sys.argv[5]) if len(sys.argv) > 5 else 600.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
    req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    conns, failed = [], 0
    t0 = time.monotonic()
    for _ in range(n):
        s = socket.socket()
        try:
            s.connect((host, port))
        except OSError:
            failed += 1
            s.close()
            continue
        s.setblocking(False)
        s.sendall(req)
        sel.register(s, selectors.EVENT_READ, bytearray())
        conns.append(s)
    answered = 0
    deadline = time.monotonic() + 60
    while answered < len(conns) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            buf = key.data
            chunk = key.fileobj.recv(65536)
            if not chunk:
                sel.unregister(key.fileobj)
                failed += 1
                answered += 1
                continue
            buf += chunk
            head, sep, body = bytes(buf).partition(b"\r\n\r\n")
            if not sep:
                continue
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(body) >= length:
                sel.unregister(key.fileobj)
                answered += 1
    print(f"open={len(conns) - failed} failed={failed} answered_in_s={time.monotonic() - t0:.2f}",
          flush=True)
    end = time.monotonic() + hold
    while time.monotonic() < end:
        # stdin closing (the caller is done) ends the hold early.
        if not sys.stdin.readline():
            break
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
