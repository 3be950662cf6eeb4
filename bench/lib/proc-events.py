#!/usr/bin/env python3
"""The kernel's process events (the netlink proc connector), for benchmarks.

Reports, with the kernel's own CLOCK_MONOTONIC timestamp of each event, the
new processes whose parent is a watched process, their exec of a program,
and the exits of the threads of a watched process. Benchmarks learn of a supervisor's new child this way
instead of polling /proc: no latency of a poll, and no poller taking the CPU
the supervisors need.

Protocol, one line each way: stdin `watch <pid> <pid>...` replaces the watched
set and is answered `ok`; stdout is `ready` once subscribed, then one JSON
object per event:
  {"what": "fork", "ts": ns, "parent": tgid, "pid": tgid}   (new processes only)
  {"what": "exec", "ts": ns, "pid": tgid}                   (of those new processes)
  {"what": "exit", "ts": ns, "pid": tgid, "tid": tid}
Needs CAP_NET_ADMIN (root); exits 2 with a message when it cannot subscribe.
"""
import json
import os
import select
import socket
import struct
import sys

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EV_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
NLMSG_DONE = 3


def main():
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        sock.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)
    except OSError as e:
        print(f"proc-events: cannot subscribe to the proc connector: {e}", file=sys.stderr)
        sys.exit(2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    watched = set()
    forked = set()
    stdin = sys.stdin.buffer.raw
    pending = b""
    while True:
        r, _, _ = select.select([sock, stdin], [], [])
        if sock in r:
            data = sock.recv(65536)
            off = 0
            while off + NLMSG_HDR.size <= len(data):
                length = NLMSG_HDR.unpack_from(data, off)[0]
                body = off + NLMSG_HDR.size + CN_MSG.size
                if body + EV_HDR.size <= len(data):
                    what, _cpu, ts = EV_HDR.unpack_from(data, body)
                    ev = body + EV_HDR.size
                    if what == PROC_EVENT_FORK:
                        _ppid, ptgid, cpid, ctgid = struct.unpack_from("=IIII", data, ev)
                        if ptgid in watched and cpid == ctgid:
                            forked.add(ctgid)
                            out.write(json.dumps({"what": "fork", "ts": ts, "parent": ptgid, "pid": ctgid}) + "\n")
                    elif what == PROC_EVENT_EXEC:
                        _pid, tgid = struct.unpack_from("=II", data, ev)
                        if tgid in forked:
                            forked.discard(tgid)
                            out.write(json.dumps({"what": "exec", "ts": ts, "pid": tgid}) + "\n")
                    elif what == PROC_EVENT_EXIT:
                        pid, tgid = struct.unpack_from("=II", data, ev)
                        if tgid in watched:
                            out.write(json.dumps({"what": "exit", "ts": ts, "pid": tgid, "tid": pid}) + "\n")
                off += max(NLMSG_HDR.size, (length + 3) & ~3)
            out.flush()
        if stdin in r:
            chunk = os.read(stdin.fileno(), 4096)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                words = line.decode().split()
                if words and words[0] == "watch":
                    watched = {int(w) for w in words[1:]}
                    forked = set()
                    out.write("ok\n")
                    out.flush()


if __name__ == "__main__":
    main()
