#!/usr/bin/env python3
"""Stands in for systemd's popgate.socket in tests (no systemd as PID 1 there).

Binds a listening TCP socket on 127.0.0.1 (port 0: any) and holds it for its whole life, then
obeys lines on stdin, as systemd does for a socket-activated service:

  start   start COMMAND with the socket as fd 3 and LISTEN_FDS=1, LISTEN_PID=<its pid>,
          LISTEN_FDNAMES=NAME; prints the new pid
  stop    SIGTERM the oldest running process, wait for it to exit; prints its exit status

The first line printed is the port. argv: NAME COMMAND...
"""
import os
import signal
import socket
import subprocess
import sys

name, command = sys.argv[1], sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1024)
os.dup2(s.fileno(), 3)  # inheritable: fd 3 in every child
print(s.getsockname()[1], flush=True)

running = []
for line in sys.stdin:
    word = line.strip()
    if word == "start":
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES=name)
        # `exec` keeps the shell's pid, so LISTEN_PID=$$ names popgate itself.
        p = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"] + command,
            pass_fds=(3,),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        running.append(p)
        print(p.pid, flush=True)
    elif word == "stop" and running:
        p = running.pop(0)
        p.send_signal(signal.SIGTERM)
        print(p.wait(), flush=True)
for p in running:
    p.send_signal(signal.SIGTERM)
    p.wait()
