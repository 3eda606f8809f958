"""An ensemble's export: one ONNX graph holding every member, or one graph per member?

Both score the same chunk of slices (the members' slice logits); what differs is how many
sessions (or Triton models and requests) it takes and how the runtime schedules the work. K
seeded members (the CPU demo's ResNet-18 at 128^2 unless told otherwise) are exported both
ways; onnxruntime then scores chunks of slices with each, interleaved round by round so that
both see the same machine load, with the intra-op threads given.

    PYTHONPATH=src python benchmarks/ensemble_export.py --members 5 --size 128 --chunk 32 \
        --threads 1 --rounds 7 --json benchmarks/results/ensemble_export_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from brainmets import rundir
from brainmets.export import OPSET, _MemberSliceLogits, _onnx_model, _SliceLogits
from brainmets.model.resnet import BrainMetsNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Candidate, measure_in_turn, median_rate, paired_ratio  # noqa: E402


def _session(proto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def measure(members: int, size: int, chunk: int, threads: int, rounds: int, arch: str) -> dict:
    torch.set_num_threads(threads)
    nets = []
    for k in range(members):
        torch.manual_seed(k)
        nets.append(BrainMetsNet(arch).eval())
    started = time.perf_counter()
    one = _session(_onnx_model(_MemberSliceLogits(nets), size, OPSET), threads)
    one_export_s = time.perf_counter() - started
    started = time.perf_counter()
    each = [_session(_onnx_model(_SliceLogits(net), size, OPSET), threads) for net in nets]
    each_export_s = time.perf_counter() - started
    x = np.random.default_rng(0).standard_normal((chunk, 1, size, size)).astype(np.float32)
    joint = one.run(None, {"slices": x})[0]
    apart = np.stack([s.run(None, {"slices": x})[0] for s in each], axis=1)

    def one_graph() -> int:
        one.run(None, {"slices": x})
        return chunk

    def graph_per_member() -> int:
        for session in each:
            session.run(None, {"slices": x})
        return chunk

    candidates = {
        "one_graph": Candidate(one_graph, one_graph),
        "graph_per_member": Candidate(graph_per_member, graph_per_member),
    }
    rates = measure_in_turn(candidates, rounds, torch.device("cpu"))
    result = {
        "members": members,
        "arch": arch,
        "size": size,
        "chunk": chunk,
        "threads": threads,
        "rounds": rounds,
        "max_abs_diff_between_the_two": float(np.abs(joint - apart).max()),
        "export_seconds": {
            "one_graph": round(one_export_s, 1),
            "graph_per_member": round(each_export_s, 1),
        },  # fmt: skip
        "slices_per_second": {name: round(median_rate(r), 1) for name, r in rates.items()},
        "rates": rates,
        "one_graph_over_per_member": paired_ratio(rates, "one_graph", "graph_per_member"),
        "versions": rundir.versions("onnxruntime"),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.members, args.size, args.chunk, args.threads, args.rounds, args.arch)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
