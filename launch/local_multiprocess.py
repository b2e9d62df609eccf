#!/usr/bin/env python3
"""Runs one command as N local JAX processes joined by `jax.distributed` (CPU testing).

Each process gets `--coordinator_address=localhost:PORT --num_processes=N
--process_id=I` appended to the command (flags `ankh3-train` understands) and
`XLA_FLAGS=--xla_force_host_platform_device_count=D`, so N processes x D devices form
one global CPU "pod":

  python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \\
      ankh3-train --gin_file=runs/demo.gin --gin.MODEL_DIR=/tmp/mp_demo \\
      --gin.ankh3_jax.partitioning.create_mesh.mesh_shape="(2, 4)"

Output of process I goes to stdout prefixed with `[I]`. SIGTERM and SIGINT are
forwarded to every process (a pre-emption of the whole job). Exits with the first
non-zero exit code (killing the other processes), else 0.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(index: int, stream, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"[{index}] {line}")
    out.flush()


def device_count_flags(xla_flags: str, devices: int) -> str:
  """`xla_flags` with its host device count (if any) replaced by `devices`."""
  kept = re.sub(r"--xla_force_host_platform_device_count(=\S*)?", "", xla_flags).split()
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def launch(command: list, num_processes: int, devices_per_process: int,
           port: int = 0, timeout: float = None) -> int:
  """Starts the processes, streams their output, returns the combined exit code."""
  port = port or free_port()
  procs, pumps = [], []
  for index in range(num_processes):
    env = dict(os.environ)
    env["XLA_FLAGS"] = device_count_flags(env.get("XLA_FLAGS", ""), devices_per_process)
    env.setdefault("JAX_PLATFORMS", "cpu")
    args = command + [f"--coordinator_address=localhost:{port}",
                      f"--num_processes={num_processes}", f"--process_id={index}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    pump = threading.Thread(target=_pump, args=(index, proc.stdout, sys.stdout), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
  code = 0
  try:
    for proc in procs:
      rc = proc.wait(timeout=timeout)
      if rc and not code:
        code = rc
        for other in procs:
          if other.poll() is None:
            other.kill()
  except subprocess.TimeoutExpired:
    code = 124
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for pump in pumps:
    pump.join(timeout=5)
  return code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds, then kill all")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="the command, after `--`")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given (put it after --)")
  return launch(command, args.num_processes, args.devices_per_process, args.port,
                args.timeout)


if __name__ == "__main__":
  sys.exit(main())
