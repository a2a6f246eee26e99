"""Train one model over N processes with ``jax.distributed``: data parallel or FSDP.

Here, on one machine, the script is its own launcher: it starts N local CPU
processes with a coordinator on ``127.0.0.1`` (a free port), each with
``--devices-per-process`` simulated CPU devices, and waits for them::

    python examples/distributed_train.py --processes 2 --devices-per-process 2 --steps 20

Every process runs the same program (SPMD): it joins the others with
``jax.distributed.initialize``, builds the same params from the same seed, lays
a mesh over *all* processes' devices, and feeds only its own rows of each global
batch (``nj.sharding.local_batch_slice``); ``nj.sharding.shard_batch`` turns them
into one global array. The trainer's jitted step is unchanged: XLA inserts the
cross-process all-reduces (gloo on CPU, NCCL on GPU, ICI on TPU).

On a GPU or TPU cluster, replace the launcher: start one process per host (or
per GPU) with the cluster's tool and call the worker directly::

    # SLURM: srun --ntasks=$N python examples/distributed_train.py --worker
    # (jax.distributed.initialize() then reads the coordinator, the number of
    # processes and this process's id from SLURM, Open MPI, or the TPU pod metadata)
    python examples/distributed_train.py --worker \\
        --coordinator host0:1234 --num-processes 16 --process-id $RANK

Leave out ``--devices-per-process`` there: each process sees its own accelerators.
The batch is global: ``--batch 64`` over 16 processes feeds 4 rows per process.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing


def build(features: int = 32, hidden: int = 64, classes: int = 8):
    """The model, a trainer and its initial params: identical on every process (fixed seed)."""
    import jax
    import jax.numpy as jnp
    import optax

    import nnjax as nj
    from nnjax.training.losses import softmax_cross_entropy
    from nnjax.training.trainer import trainer

    model = nj.serial(
        nj.Dense(hidden), jax.nn.relu, nj.Dense(hidden), jax.nn.relu, head=nj.Dense(classes)
    )
    params, state = jax.jit(model.init)(
        jax.random.key(0), jax.ShapeDtypeStruct((1, features), jnp.float32)
    )
    tr = trainer(model, softmax_cross_entropy, optax.adam(1e-3))
    return model, tr, params, state


def global_batch(step: int, batch: int, features: int = 32, classes: int = 8):
    """Batch ``step`` of a synthetic task (a random linear teacher), the same on every process.

    A real loader reads only this process's rows; here every process makes the
    whole batch (it is small) and slices its rows.
    """
    import numpy as np

    teacher = np.random.default_rng(1234).standard_normal((features, classes))
    x = np.random.default_rng(step).standard_normal((batch, features)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def worker(args: argparse.Namespace) -> None:
    import jax

    if args.devices_per_process:
        jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    if args.num_processes != 1:  # None: let jax detect the cluster (SLURM, MPI, TPU pod)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import nnjax as nj
    import nnjax.sharding  # makes nj.sharding available

    _, tr, params, state = build()
    mesh = nj.sharding.mesh({"data": -1})  # every device of every process
    rules = {
        "dp": nj.sharding.data_parallel_rules(),
        "fsdp": nj.sharding.fsdp_rules(min_size=1024),
    }[args.mode]
    ts = nj.sharding.shard_train_state(tr.init(params, state), mesh, rules)
    rows = nj.sharding.local_batch_slice(mesh, args.batch)
    me = jax.process_index()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = global_batch(step, args.batch)
        batch = nj.sharding.shard_batch((x[rows], y[rows]), mesh)
        ts, metrics = tr.step(ts, batch, None)
        if me == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(metrics['loss']):.4f}", flush=True)
    if me == 0:
        print(
            f"{jax.process_count()} process(es), {jax.device_count()} device(s), mesh "
            f"{dict(mesh.shape)}, {args.mode}: {args.steps} steps in "
            f"{time.perf_counter() - t0:.2f} s",
            flush=True,
        )
    if args.checkpoint:
        path = nj.sharding.save_sharded(args.checkpoint, ts, keep=None)
        if me == 0:
            print(f"saved {path}", flush=True)
    if args.num_processes != 1:
        jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace) -> int:
    """Start ``args.processes`` local workers on CPU and wait; the exit code is the worst one."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    common = [
        "--worker",
        f"--coordinator={coordinator}",
        f"--num-processes={args.processes}",
        f"--devices-per-process={args.devices_per_process or 1}",
        f"--steps={args.steps}",
        f"--batch={args.batch}",
        f"--mode={args.mode}",
    ] + ([f"--checkpoint={args.checkpoint}"] if args.checkpoint else [])
    procs = [
        subprocess.Popen([sys.executable, __file__, *common, f"--process-id={i}"], env=env)
        for i in range(args.processes)
    ]
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        print(f"workers did not finish within {args.timeout} s", file=sys.stderr)
        return 1
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help="run one process (cluster launchers)")
    ap.add_argument("--processes", type=int, default=2, help="local processes to launch")
    ap.add_argument("--devices-per-process", type=int, default=None, help="CPU devices each")
    ap.add_argument("--coordinator", default=None, help="host:port of process 0 (worker)")
    ap.add_argument("--num-processes", type=int, default=None, help="(worker)")
    ap.add_argument("--process-id", type=int, default=None, help="(worker)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="global batch size")
    ap.add_argument("--mode", choices=("dp", "fsdp"), default="fsdp")
    ap.add_argument("--checkpoint", default=None, help="save the final state here")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.processes == 1:  # plain single-process run, no jax.distributed
        args.num_processes = 1
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
